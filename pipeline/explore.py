"""Stage 6: a trained model in the browser: sample, steer, interpolate, and encode your own picture.

    python -m pipeline.explore +obs_std=0.1     # the newest obs_std=0.1 run (ckpt=... as in pipeline.sample)
    make explore

Starts a local web app (one static page, pipeline/explore.html, with no script, font or image fetched
from anywhere else) on 127.0.0.1 and prints its URL as the last line. Each model is loaded once and stays
in memory; the principal directions of a run's codes are computed once and stored in its folder
(directions.pt, beside prior.pt).
"""
import asyncio
import base64
import io
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import uvicorn
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from pipeline.attributes import SLIDER_RANGE, SLIDERS_NAME, make_slider, slider_value
from pipeline.config import Paths, checked, key
from pipeline.errors import PipelineError, WriteError, exit_on_error
from pipeline.faces import (CascadeError, DetectorConfig, face_tiles, load_cascade, only_detector_keys,
                            resolve_cascade)
from pipeline.hair import PALETTE
from pipeline.images import load_image, on_white, to_uint8
from pipeline.io import after_write_error, optional_write
from pipeline.prior import sample_latents
from pipeline.runs import Run, find_checkpoint, list_runs, pick_device
from pipeline.stored import save_stored

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("explore.html")
DIRECTIONS_NAME = "directions.pt"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ExploreConfig:
    host: str = key()
    port: int = key(low=0, high=65535)
    max_upload_mb: float = key(low=0.001)
    grid: int = key(low=1, high=256)
    directions: int = key(low=1)
    strip: int = key(low=3, high=15)
    nearest: int = key(low=1, high=64)
    interp_steps: int = key(low=2, high=32)


@dataclass
class ExploreJob:
    """conf/explore.yaml's keys (obs_std is appended with +obs_std=..., as for pipeline.sample)."""
    paths: Paths = key(default=Paths)
    crop: DetectorConfig = key(default=DetectorConfig)
    explore: ExploreConfig = key(default=ExploreConfig)
    ckpt: str | None = key()
    device: str = key()
    obs_std: float | None = key(low=1e-6, default=None)


class BadRequest(PipelineError):
    """Something the page sent that cannot be served: shown in the page as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def png_data_url(image01: torch.Tensor) -> str:
    """A 3 x H x W image in [0, 1] as a data: URL (shown and downloaded by the page as it is)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image01).permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def codes_from(value, latent_dim: int, what: str = "z") -> torch.Tensor:
    """A code (or a list of codes) the page sent back, checked for size and finite numbers."""
    try:
        z = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError):
        raise BadRequest(f"{what} must be a list of {latent_dim} numbers") from None
    z = z.reshape(1, -1) if z.dim() == 1 else z
    if z.dim() != 2 or z.shape[1] != latent_dim or not torch.isfinite(z).all():
        raise BadRequest(f"{what} must hold codes of {latent_dim} finite numbers (this run's latent size)")
    return z


def principal_directions(run: Run, prior: dict | None) -> dict:
    """Principal components of the run's codes: the encoder means of its training faces, or (without
    them) draws of its stored prior. Computed once and stored in the run folder."""
    path = run.ckpt_path.parent / DIRECTIONS_NAME
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("step") == run.ckpt["step"]:
            return stored
    if run.has_split("train"):
        codes, source = run.encode(run.split("train")), "encoder means of the training faces"
    else:
        generator = torch.Generator().manual_seed(0)
        codes = sample_latents(prior, 20000, run.model.latent_dim, generator)
        source = f"20,000 draws of the {'stored prior' if prior else 'N(0, I) prior'} (training faces not found)"
    log.info("principal directions of %s (%d codes), stored once in %s", source, len(codes), path)
    mean = codes.mean(0)
    _, singular, vh = torch.linalg.svd(codes - mean, full_matrices=False)
    directions = {"mean": mean, "directions": vh, "std": singular / math.sqrt(max(len(codes) - 1, 1)),
                  "variance": (singular ** 2 / (singular ** 2).sum()), "source": source, "step": run.ckpt["step"]}
    # a read-only folder (an export as it was handed over) or a full disk: explored all the same
    optional_write(lambda: save_stored(path, directions), "the principal directions")
    return directions


class LoadedRun:
    """One run, loaded once: its model, its stored prior, its principal directions, its training faces."""

    def __init__(self, ckpt: Path, device: torch.device, settings, data_dir="data"):
        self.run = Run(ckpt, device, data_dir=data_dir)
        self.settings = settings
        self.latent_dim = self.run.model.latent_dim
        self.prior_note = ""
        try:
            self.prior, self.prior_name = self.run.prior("default", 100, 0)
        except PipelineError as err:  # an old run without prior.pt whose training split is gone
            self.prior, self.prior_name, self.prior_note = None, "normal", str(err)
            log.warning("%s: sampling from N(0, I) instead", err)
        self.pca = principal_directions(self.run, self.prior)
        try:
            self.hair, self.hair_note = self.run.hair(), ""
        except PipelineError as err:  # an old run without hair.pt whose training split is gone
            self.hair, self.hair_note = {"colours": {}, "not_offered": {}}, f"hair colours: not available ({err})"
            log.warning("%s", self.hair_note)
        self._train = None
        self._strip = {}
        self.lock = threading.Lock()

    def describe(self) -> dict:
        run = self.run
        return {"obs_std": run.obs_std, "step": run.ckpt["step"], "folder": str(run.ckpt_path.parent),
                "prior": self.prior_name, "prior_note": self.prior_note, "latent_dim": self.latent_dim,
                "directions_from": self.pca["source"], "nearest": run.has_split("train"),
                "decoders": self.decoders(),
                "hair": list(self.hair["colours"]), "hair_not_offered": self.hair["not_offered"],
                "hair_note": self.hair_note, **self.slider_list(),
                "nearest_note": "" if run.has_split("train") else
                f"nearest training faces: not available, {run.split_problem('train')}"}

    def decoders(self) -> list[str]:
        return ["sharp", "elbo"] if self.run.sharp_model is not None else ["elbo"]

    def model_for(self, decoder: str | None, noise: bool = False):
        """The decoder asked for: sharp, elbo, or (None / auto) the run's default, as pipeline.sample's."""
        decoder = self.run.decoder_name if decoder in (None, "", "auto") else decoder
        if decoder not in ("sharp", "elbo"):
            raise BadRequest(f"decoder={decoder!r}: use sharp or elbo")
        if decoder == "sharp" and self.run.sharp_model is None:
            raise BadRequest("this run has no sharp decoder (trained with sharp.epochs=0 or before it existed): "
                             "use the ELBO decoder")
        if decoder == "sharp" and noise:
            raise BadRequest("pixel noise is a draw from p(x|z), the ELBO decoder's likelihood: switch the decoder "
                             "to ELBO, or turn the noise off")
        return self.run.sharp_model if decoder == "sharp" else self.run.elbo_model

    def images(self, z: torch.Tensor, noise: bool = False, seed: int = 0, decoder: str | None = None) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        model = self.model_for(decoder, noise)
        return [png_data_url(image) for image in self.run.decode(z, noise, generator, model=model)]

    def both(self, z: torch.Tensor) -> dict:
        """The same codes through each decoder the run has, side by side."""
        return {name: self.images(z, decoder=name) for name in self.decoders()}

    def sample(self, seed: int, prior: str, temperature: float, noise: bool, n: int, decoder: str | None,
               hair: str | None = None) -> dict:
        generator = torch.Generator().manual_seed(seed)
        distribution = self.run.hair_prior(hair) if hair else self.prior if prior == "default" else None
        z = sample_latents(distribution, n, self.latent_dim, generator, temperature)
        name = f"hair={hair}" if hair else self.prior_name if prior == "default" else "normal"
        return {"codes": z.tolist(), "images": self.images(z, noise, seed, decoder), "prior": name}

    def steered(self, z: torch.Tensor, offsets, named: dict | None = None) -> torch.Tensor:
        """z moved along the first principal directions by `offsets` (in standard deviations of the codes) and
        along named sliders (hair colours, sliders made from examples) by `named` (in mean differences)."""
        offsets = torch.tensor([float(v) for v in offsets][: self.settings.directions])
        k = len(offsets)
        return self.run.steered(z + (offsets * self.pca["std"][:k]) @ self.pca["directions"][:k], named or {})

    def slider_list(self) -> dict:
        sliders, warning = self.run.sliders()
        rows = [{"name": s["name"], "kind": s["kind"],
                 "made_from": f"{s['faces']} training faces" if s["kind"] == "colour" else
                 f"{s['has']} faces that have it, {s['lacks']} that lack it"} for s in sliders.values()]
        return {"sliders": rows, "sliders_note": warning}

    def make_slider(self, name, has: torch.Tensor, lacks: torch.Tensor) -> dict:
        """A slider from marked faces, saved in the run folder's sliders.json and offered from now on."""
        with self.lock:
            sliders, _ = self.run.sliders()
            slider = make_slider(name, has, lacks, taken={*sliders, *PALETTE})
            with after_write_error(f"the slider {name!r} was not saved (the run's other sliders are as they were) "
                                   "and the explorer goes on; once that is fixed, make it again"):
                self.run.add_slider(slider)
        log.info("slider %r made from %d + %d faces, saved in %s", name, len(has), len(lacks),
                 self.run.ckpt_path.parent / SLIDERS_NAME)
        return self.slider_list()

    def strip(self, decoder: str | None = None) -> list[dict]:
        """What each direction does: the mean code moved from -2.5 to +2.5 standard deviations along it."""
        self.model_for(decoder)
        decoder = self.run.decoder_name if decoder in (None, "", "auto") else decoder  # one cache entry per model
        with self.lock:
            if decoder not in self._strip:
                k = min(self.settings.directions, self.latent_dim)
                steps = torch.linspace(-2.5, 2.5, self.settings.strip)
                rows = []
                for i in range(k):
                    z = self.pca["mean"] + steps[:, None] * self.pca["std"][i] * self.pca["directions"][i]
                    rows.append({"direction": i + 1, "variance": float(self.pca["variance"][i]),
                                 "images": self.images(z, decoder=decoder)})
                self._strip[decoder] = rows
        return self._strip[decoder]

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, decoder: str | None = None) -> list[str]:
        t = torch.linspace(0, 1, self.settings.interp_steps)[:, None]
        return self.images(a * (1 - t) + b * t, decoder=decoder)

    def train_faces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split (uint8) and each face's squared norm, read on first use."""
        with self.lock:
            if self._train is None:
                if not self.run.has_split("train"):
                    raise BadRequest(self.describe()["nearest_note"], 404)
                faces = torch.from_numpy(self.run.split("train")).flatten(1)
                norms = torch.cat([chunk.float().div(255).square().sum(1) for chunk in faces.split(4096)])
                self._train = faces, norms
        return self._train

    def nearest(self, z: torch.Tensor, decoder: str | None = None) -> dict:
        """The training faces closest in pixels to the decoded face (memorisation at a glance)."""
        faces, norms = self.train_faces()
        face = self.run.decode(z, model=self.model_for(decoder))[0]
        query = face.flatten()
        dots = torch.cat([chunk.float().div(255) @ query for chunk in faces.split(4096)])
        distance = (norms - 2 * dots + query.square().sum()).clamp(min=0).sqrt()
        best = distance.topk(min(self.settings.nearest, len(faces)), largest=False)
        side = self.run.model.image_size
        tiles = faces[best.indices].reshape(-1, 3, side, side).float().div(255)
        return {"images": [png_data_url(t) for t in tiles], "distances": [round(float(d), 2) for d in best.values],
                "face": png_data_url(face)}


class Explorer:
    """What the page can show: the newest run of each trained obs_std (and the run it opened on), each
    loaded on first use and kept; the crop stage's detector for uploads."""

    def __init__(self, cfg, first: Path, device: torch.device):
        self.cfg, self.device = cfg, device
        newest = {}
        for entry in list_runs(cfg.paths.output_dir):
            if entry["obs_std"] is not None:
                newest.setdefault(float(entry["obs_std"]), entry["ckpt"])
        ckpts = [first, *(c for c in newest.values() if c.resolve() != first.resolve())]
        self.ckpts = {str(i): ckpt for i, ckpt in enumerate(ckpts)}
        self.obs_stds = {ckpt: obs_std for obs_std, ckpt in newest.items()}
        self.loaded: dict[str, LoadedRun] = {}
        self.lock = threading.Lock()
        self.get("0")  # the first run is ready before the server starts
        self.detector, self.uploads_off = self.find_detector()

    def get(self, run_id) -> LoadedRun:
        run_id = str(run_id)
        if run_id not in self.ckpts:
            raise BadRequest(f"run={run_id!r} is not one of this explorer's runs ({', '.join(self.ckpts)})", 404)
        with self.lock:
            if run_id not in self.loaded:
                self.loaded[run_id] = LoadedRun(self.ckpts[run_id], self.device, self.cfg.explore,
                                                self.cfg.paths.data_dir)
        return self.loaded[run_id]

    def runs(self) -> list[dict]:
        rows = []
        for run_id, ckpt in self.ckpts.items():
            info = self.loaded[run_id].describe() if run_id in self.loaded else {
                "obs_std": self.obs_stds[ckpt], "folder": str(ckpt.parent)}  # run "0" is always loaded
            rows.append({"id": run_id, **info})
        return rows

    def compare(self, z_list) -> list[dict]:
        """The same codes decoded by every run of the page (one per trained obs_std)."""
        rows = []
        for run_id in self.ckpts:
            loaded = self.get(run_id)
            try:
                z = codes_from(z_list, loaded.latent_dim)
            except BadRequest:
                rows.append({"run": run_id, "obs_std": loaded.run.obs_std, "images": [],
                             "note": f"latent size {loaded.latent_dim} differs: the codes do not apply"})
                continue
            rows.append({"run": run_id, "obs_std": loaded.run.obs_std, "images": loaded.images(z), "note": ""})
        return sorted(rows, key=lambda r: r["obs_std"])

    def find_detector(self):
        """The crop stage's detector for uploads, found before the page opens (crop.cascade, its cached copy,
        an export folder's copy, then the pinned download); without one, the reason the page shows."""
        copies = [c for c in (self.get("0").run.cascade_copy,) if c is not None]
        try:
            return load_cascade(resolve_cascade(self.cfg.crop, copies, timeout=10)), ""
        except CascadeError as err:
            note = f"Uploads are off: {err}; then start pipeline.explore again."
            log.warning("%s", note)
            return None, note

    def upload(self, run_id, name: str, data: bytes, decoder: str | None = None) -> dict:
        """The faces of an uploaded picture beside their reconstructions (and their codes, to steer)."""
        loaded = self.get(run_id)
        loaded.model_for(decoder)
        tiles, note = self.faces_in(name, data, loaded.run.model.image_size)
        z = loaded.run.encode(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))
        return {"name": name, "note": note, "codes": z.tolist(), "recons": loaded.images(z, decoder=decoder),
                "faces": [png_data_url(torch.from_numpy(t).permute(2, 0, 1).float().div(255)) for t in tiles]}

    def faces_in(self, name: str, data: bytes, side: int) -> tuple[np.ndarray, str]:
        crop = self.cfg.crop
        try:
            rgb, alpha = load_image(io.BytesIO(data), crop.max_pixels)
        except Image.DecompressionBombError as err:
            raise BadRequest(f"{name} is too large to open safely ({err}); the limit is crop.max_pixels") from None
        except ValueError as err:
            raise BadRequest(f"{name}: {err}; pick a smaller picture") from None
        except Exception as err:  # anything PIL cannot decode
            raise BadRequest(f"{name} is not a picture this app can read ({type(err).__name__}); "
                             "upload a PNG, JPEG, GIF, WebP or BMP") from None
        faces = face_tiles(self.detector, rgb, alpha, OmegaConf.merge(crop, {"size": side}))
        if faces:
            return np.stack([f["tile"] for f in faces]), f"{len(faces)} face(s) found by the crop stage's detector"
        height, width = rgb.shape[:2]
        if max(height, width) <= 4 * side and max(height, width) <= 1.25 * min(height, width):
            tile = Image.fromarray(on_white(rgb, alpha)).resize((side, side), Image.Resampling.LANCZOS)
            tile = np.array(tile)[None]
            return tile, "no face found by the detector; a small square picture is taken as one face tile"
        raise BadRequest(f"no face found in {name}: the detector (lbpcascade_animeface) finds anime faces "
                         f"seen from the front, at least crop.min_size={crop.min_size} px; try another picture "
                         "or a square face tile")


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def number(body: dict, name: str, kind, low, high, default):
    try:
        value = kind(body.get(name, default))
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}={value} is out of range [{low}, {high}]")
    return value


def endpoint(handler):
    """An API route: JSON in, JSON out; bad input and failures become {"error": ...}, never a traceback."""
    async def route(request: Request):
        try:
            return JSONResponse(await handler(request.app.state.explorer, request))
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except WriteError as err:  # 507 Insufficient Storage: the server's disk, not the request
            log.warning("%s", err)
            return JSONResponse({"error": str(err)}, status_code=507)
        except PipelineError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except Exception as err:
            log.exception("request %s failed", request.url.path)
            return JSONResponse({"error": f"the server could not do this ({type(err).__name__}: {err}); "
                                          "the terminal running pipeline.explore has the details"}, status_code=500)
    return route


async def runs_route(explorer: Explorer, request: Request):
    first = explorer.get("0")
    return {"runs": explorer.runs(), "directions": min(explorer.cfg.explore.directions, first.latent_dim),
            "grid": explorer.cfg.explore.grid, "max_upload_mb": explorer.cfg.explore.max_upload_mb,
            "uploads_off": explorer.uploads_off}


async def sample_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    loaded = explorer.get(body.get("run", "0"))
    prior = body.get("prior", "default")
    if prior not in ("default", "normal"):
        raise BadRequest(f"prior={prior!r}: use default (the run's stored prior) or normal")
    hair = body.get("hair") or None  # one not offered: pipeline.attributes.conditioned's message, a 400
    args = (number(body, "seed", int, 0, 2 ** 63 - 1, 0), prior, number(body, "temperature", float, 0, 3, 1.0),
            bool(body.get("noise", False)), number(body, "n", int, 1, 256, explorer.cfg.explore.grid),
            body.get("decoder"), hair)
    return await run_in_threadpool(loaded.sample, *args)


async def steer_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    loaded = explorer.get(body.get("run", "0"))
    z = codes_from(body.get("z"), loaded.latent_dim)
    offsets = body.get("offsets", [])
    if not isinstance(offsets, list) or not all(isinstance(v, (int, float)) and abs(v) <= SLIDER_RANGE
                                                for v in offsets):
        raise BadRequest(f"offsets must be a list of numbers from -{SLIDER_RANGE} to {SLIDER_RANGE} (standard "
                         "deviations along each slider's direction; the sliders go from -3 to 3)")
    named = body.get("named", {})
    if not isinstance(named, dict):
        raise BadRequest("named must be an object: {slider name: value}")
    named = {name: slider_value(name, value) for name, value in named.items()}
    moved = loaded.steered(z, offsets, named)
    images = await run_in_threadpool(loaded.images, moved, False, 0, body.get("decoder"))
    return {"code": moved[0].tolist(), "images": images}


async def directions_route(explorer: Explorer, request: Request):
    loaded = explorer.get(request.query_params.get("run", "0"))
    rows = await run_in_threadpool(loaded.strip, request.query_params.get("decoder"))
    return {"rows": rows, "source": loaded.pca["source"]}


async def interpolate_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    loaded = explorer.get(body.get("run", "0"))
    a, b = codes_from(body.get("a"), loaded.latent_dim, "a"), codes_from(body.get("b"), loaded.latent_dim, "b")
    return {"images": await run_in_threadpool(loaded.interpolate, a, b, body.get("decoder"))}


async def nearest_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    loaded = explorer.get(body.get("run", "0"))
    return await run_in_threadpool(loaded.nearest, codes_from(body.get("z"), loaded.latent_dim), body.get("decoder"))


async def sliders_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    loaded = explorer.get(body.get("run", "0"))
    has, lacks = (marked_codes(body.get(side), loaded.latent_dim, side) for side in ("has", "lacks"))
    return await run_in_threadpool(loaded.make_slider, body.get("name"), has, lacks)


def marked_codes(value, latent_dim: int, side: str) -> torch.Tensor:
    return codes_from(value, latent_dim, side) if value else torch.zeros(0, latent_dim)


async def decoders_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    loaded = explorer.get(body.get("run", "0"))
    return await run_in_threadpool(loaded.both, codes_from(body.get("z"), loaded.latent_dim))


async def compare_route(explorer: Explorer, request: Request):
    body = await json_body(request)
    return {"rows": await run_in_threadpool(explorer.compare, body.get("z"))}


async def upload_route(explorer: Explorer, request: Request):
    name = request.query_params.get("name") or "the picture"
    if explorer.uploads_off:
        raise BadRequest(explorer.uploads_off, 503)
    limit = int(explorer.cfg.explore.max_upload_mb * 2 ** 20)
    too_big = BadRequest(f"{name} is over the upload limit of {explorer.cfg.explore.max_upload_mb:g} MB "
                         "(explore.max_upload_mb)", 413)
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    if not data:
        raise BadRequest(f"{name} is empty")
    return await run_in_threadpool(explorer.upload, request.query_params.get("run", "0"), name, bytes(data),
                                   request.query_params.get("decoder"))


async def page(request: Request):
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def make_app(explorer: Explorer) -> Starlette:
    api = {"runs": (runs_route, "GET"), "sample": (sample_route, "POST"), "steer": (steer_route, "POST"),
           "directions": (directions_route, "GET"), "interpolate": (interpolate_route, "POST"),
           "nearest": (nearest_route, "POST"), "compare": (compare_route, "POST"), "upload": (upload_route, "POST"),
           "decoders": (decoders_route, "POST"), "sliders": (sliders_route, "POST")}
    routes = [Route("/", page), *(Route(f"/api/{name}", endpoint(handler), methods=[method])
                                  for name, (handler, method) in api.items())]
    app = Starlette(routes=routes)
    app.state.explorer = explorer
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so a busy port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PipelineError(f"cannot serve on {host}:{port} ({err.strerror}); choose another port, e.g. "
                            f"explore.port={port + 1 if port else 7861}, or explore.port=0 for any free one") from None
    return sock


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve until Ctrl-C; the URL is printed (last line) once the server accepts connections."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(url, flush=True)
    threading.Thread(target=announce, daemon=True).start()
    asyncio.run(server.serve(sockets=[sock]))


def explore(cfg: DictConfig) -> None:
    if cfg.explore.host not in LOCAL_HOSTS:
        log.warning("explore.host=%s: the explorer is reachable from other machines on that network, with no "
                    "login; use explore.host=127.0.0.1 unless you mean to share it", cfg.explore.host)
    first = find_checkpoint(cfg.paths.output_dir, obs_std=cfg.get("obs_std"), ckpt=cfg.ckpt)
    sock = bind(cfg.explore.host, cfg.explore.port)
    explorer = Explorer(cfg, first, pick_device(str(cfg.device)))
    log.info("exploring %s (obs_std=%g); %d run(s) to choose from", first, explorer.get("0").run.obs_std,
             len(explorer.ckpts))
    serve(make_app(explorer), sock)


@hydra.main(config_path="../conf", config_name="explore", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    explore(checked(only_detector_keys(cfg), ExploreJob))


if __name__ == "__main__":
    main()
