"""The model as a web page: the `web/` folder of an export, which draws faces in any browser with no Python and no
server code (pipeline.export writes it; `web.enabled=false` leaves it out), and finds, encodes and edits the faces of a
visitor's own picture without sending it anywhere.

    web/index.html, web/page.js     the page (pipeline/web/), unchanged: no build step
    web/model.json                  what the page needs to know: sizes, the mixture's weights, hair colours, sliders,
                                    where each tensor lies in prior.bin, the detector's settings
    web/prior.bin                   the stored mixture and each hair colour's Gaussian: means float32, Cholesky factors
                                    float16, lower triangle only (a quarter of prior.safetensors' float64 squares)
    web/decoder.onnx                the default decoder (z -> pixel means in [0, 1]); weights stored as float16 and
                                    cast to float32 inside the graph when that moves no pixel by more than 1/255
    web/ort/                        ONNX Runtime Web's WebAssembly build (npm onnxruntime-web, pinned by version and
                                    sha512; downloaded once into web.cache_dir, or taken from web.runtime=PATH); its
                                    .wasm gzipped (the page unpacks it: 3.8 MB to fetch instead of 14.8)
    for uploads, fetched by the page only when a visitor first chooses a picture (not when the export has no cascade):
    web/encoder.onnx                the encoder (pixels in [0, 1] -> codes), float16 weights as the decoder's
    web/opencv/opencv_js.js.gz      OpenCV.js (npm @opencvjs/web, pinned as the runtime is; gzipped), whose
                                    CascadeClassifier finds faces exactly as pipeline/faces.py does
    web/lbpcascade_animeface.xml    the detector's cascade, the export's own copy
"""
import base64
import copy
import gzip
import hashlib
import io
import json
import logging
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import requests
import torch
from onnx import helper, numpy_helper
from torch import nn

from pipeline.config import key
from pipeline.errors import PipelineError
from pipeline.images import to_uint8
from pipeline.io import atomic_write_bytes, optional_write
from pipeline.model import VAE, decode_means, encode_means
from pipeline.prior import sample_latents

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("web")
PAGE_FILES = ("index.html", "page.js")
WEB_FORMAT = "animeface-vae-web/2"
CASCADE_NAME = "lbpcascade_animeface.xml"
OPSET = 17
FP16_CHECK_CODES = 256  # prior draws decoded (and their faces encoded) both ways to decide the weights' precision
GZIP_LEVEL = 6  # files the page unpacks itself (DecompressionStream): gzip is the format every browser unpacks


@dataclass
class WebConfig:
    """conf/web/default.yaml: the export's web folder."""
    enabled: bool = key()
    runtime: str = key()
    runtime_integrity: str = key()
    detector: str = key()
    detector_integrity: str = key()
    cache_dir: str = key()
    precision: str = key(choices=("auto", "fp16", "fp32"))


@dataclass(frozen=True)
class NpmPackage:
    """A package the page runs, taken from npm's tarball pinned by integrity (or a local copy), and what of it the
    web folder holds: {path in the package: path in web/} (a .gz path: gzipped)."""
    what: str
    key: str  # its keys in the web config: KEY (URL, .tgz or folder) and KEY_integrity
    files: dict
    local: str  # what a local folder is, for the messages


RUNTIME = NpmPackage("ONNX Runtime Web", "runtime", {
    "dist/ort.wasm.min.js": "ort/ort.wasm.min.js", "dist/ort-wasm-simd-threaded.mjs": "ort/ort-wasm-simd-threaded.mjs",
    "dist/ort-wasm-simd-threaded.wasm": "ort/ort-wasm-simd-threaded.wasm.gz"},
    "onnxruntime-web-1.31.1.tgz or its dist folder")
DETECTOR = NpmPackage("OpenCV.js", "detector", {
    "lib/opencv_js.js": "opencv/opencv_js.js.gz", "LICENSE": "opencv/LICENSE"},
    "web-4.13.0-release.1.tgz (npm @opencvjs/web) or its package folder")
RUNTIME_FILES = tuple(Path(name).name for name in RUNTIME.files)


# ---------------------------------------------------------------- what the page runs, pinned

def package_files(cfg, package: NpmPackage) -> dict[str, bytes]:
    """The package's files the web folder holds, by their path in web/ (gzipped where that path ends in .gz): from
    web.KEY when it is a folder (an npm install's package folder, or the folder its files lie in) or a .tgz, else the
    pinned npm tarball (cached in web.cache_dir)."""
    source, integrity = str(cfg[package.key]), cfg[f"{package.key}_integrity"]
    if source.startswith(("http://", "https://")):
        files = from_tarball(cached_tarball(cfg, package), source, package)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = from_folder(path, package)
        elif path.is_file():
            data = path.read_bytes()
            check_integrity(data, integrity, str(path), package)
            files = from_tarball(data, str(path), package)
        else:
            raise PipelineError(f"web.{package.key}={path} does not exist: pass {package.local}, leave "
                                f"web.{package.key} at its registry URL, or {without(package)}")
    return {package.files[name]: gzip.compress(data, GZIP_LEVEL, mtime=0) if package.files[name].endswith(".gz")
            else data for name, data in files.items()}


def without(package: NpmPackage) -> str:
    return ("add cascade=false to export the page without uploads (or web.enabled=false: no page)"
            if package is DETECTOR else "add web.enabled=false to export without the page")


def from_folder(path: Path, package: NpmPackage) -> dict[str, bytes]:
    found = {name: next((p for p in (path / name, path / Path(name).name) if p.is_file()), None)
             for name in package.files}
    missing = [Path(name).name for name, p in found.items() if p is None]
    if missing:
        raise PipelineError(f"web.{package.key}={path} lacks {', '.join(missing)}: point it at {package.local}")
    return {name: p.read_bytes() for name, p in found.items()}


def cached_tarball(cfg, package: NpmPackage) -> bytes:
    url, integrity = str(cfg[package.key]), cfg[f"{package.key}_integrity"]
    path = Path(cfg.cache_dir).expanduser() / Path(url).name
    if path.is_file():
        data = path.read_bytes()
        if integrity_of(data) == integrity:
            return data
    log.info("downloading %s from %s (once; cached in %s)", package.what, url, path.parent)
    try:
        resp = requests.get(url, timeout=120)
        resp.raise_for_status()
    except requests.RequestException as err:
        raise PipelineError(f"could not download {package.what} from {url} ({err}); offline, pass a local copy "
                            f"(web.{package.key}=/path/to/{package.local}), or {without(package)}") from None
    check_integrity(resp.content, integrity, url, package)
    optional_write(lambda: atomic_write_bytes(path, resp.content), f"the {package.what} download")
    return resp.content


def integrity_of(data: bytes) -> str:
    """npm's integrity string of a file: sha512, base64."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def check_integrity(data: bytes, expected: str, source: str, package: NpmPackage) -> None:
    if integrity_of(data) != expected:
        raise PipelineError(f"{source} is not the pinned {package.what} (its integrity is {integrity_of(data)[:30]}"
                            f"..., expected {expected[:30]}...); nothing was used. Check web.{package.key} and "
                            f"web.{package.key}_integrity")


def from_tarball(data: bytes, source: str, package: NpmPackage) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            return {name: tar.extractfile(f"package/{name}").read() for name in package.files}
    except (tarfile.TarError, KeyError, AttributeError, OSError) as err:
        raise PipelineError(f"{source} is not {package.what}'s npm tarball ({err}): pass {package.local}") from None


# ---------------------------------------------------------------- the decoder and the encoder as ONNX

class PixelMeans(nn.Module):
    """z -> pixel means in [0, 1]: what decode_means computes, as one graph."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, z):
        return torch.sigmoid(self.model.decode(z))


class CodesOf(nn.Module):
    """pixels in [0, 1] (N x 3 x H x W) -> encoder means: what encode_means computes, as one graph."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.encode(pixels)[0]


def onnx_bytes(graph: nn.Module, example: torch.Tensor, names: tuple[str, str], what: str) -> bytes:
    """The TorchScript exporter: the torch.export one needs onnxscript besides onnx, for a graph this plain (convs,
    transposed convs, batch norms, SiLU) it gains nothing, and torch is pinned, so its deprecation notice is noise."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(graph.eval(), (example,), buffer, dynamo=False, input_names=[names[0]],
                              output_names=[names[1]], opset_version=OPSET,
                              dynamic_axes={names[0]: {0: "n"}, names[1]: {0: "n"}})
    except Exception as err:  # an operator ONNX cannot express: say which, and export the rest with web.enabled=false
        raise PipelineError(f"the {what} cannot be written as ONNX ({type(err).__name__}: {str(err)[:300]}); add "
                            "web.enabled=false to export everything but the web page") from None
    return buffer.getvalue()


def stored_as_fp16(graph_bytes: bytes) -> bytes:
    """The same graph with every float32 weight stored as float16 and cast back to float32 where it is used."""
    model = onnx.load_from_string(graph_bytes)
    graph = model.graph
    casts, halves = [], []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            halves.append(tensor)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}.fp16")
        halves.append(half)
        casts.append(helper.make_node("Cast", [half.name], [tensor.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{tensor.name}.cast"))
    del graph.initializer[:]
    graph.initializer.extend(halves)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def rounded_to_fp16(model: VAE) -> VAE:
    """A copy whose weights went through float16 and back: what the float16 graphs compute."""
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    return rounded.eval()


@dataclass
class Fp16Effect:
    """What rounding the weights to float16 does, in uint8 pixel levels: to the faces of FP16_CHECK_CODES prior draws
    (the decoder), to the reconstructions of those faces (the encoder), and the largest change of their codes."""
    faces: int
    reconstructions: int
    codes: float


def fp16_effect(model: VAE, prior: dict) -> Fp16Effect:
    z = sample_latents(prior, FP16_CHECK_CODES, model.latent_dim, torch.Generator().manual_seed(0))
    rounded = rounded_to_fp16(model)
    faces = to_uint8(decode_means(model, z))
    exact, approx = encode_means(model, faces), encode_means(rounded, faces)
    reconstructions = levels(to_uint8(decode_means(model, exact)), to_uint8(decode_means(model, approx)))
    return Fp16Effect(faces=levels(faces, to_uint8(decode_means(rounded, z))), reconstructions=reconstructions,
                      codes=float((exact - approx).abs().max()))


def levels(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def onnx_file(graph: bytes, error: int, precision: str, what: str) -> tuple[bytes, str]:
    """float16 weights when asked, or (auto) when they move no pixel by more than 1/255 (`error` levels)."""
    if precision == "auto":
        precision = "fp16" if error <= 1 else "fp32"
        if precision == "fp32":
            log.info("float16 weights move the %s's pixels by up to %d/255: it keeps float32", what, error)
    return (stored_as_fp16(graph) if precision == "fp16" else graph), precision


def decoder_file(model: VAE, effect: Fp16Effect | None, precision: str) -> tuple[bytes, str]:
    graph = onnx_bytes(PixelMeans(model), torch.zeros(2, model.latent_dim), ("z", "pixels"), "decoder")
    return onnx_file(graph, effect.faces if effect else 0, precision, "decoder")


def encoder_file(model: VAE, effect: Fp16Effect | None, precision: str) -> tuple[bytes, str, float]:
    """The encoder, and the largest change float16 weights make to a code (0 in float32)."""
    graph = onnx_bytes(CodesOf(model), torch.zeros(2, 3, model.image_size, model.image_size), ("pixels", "z"),
                       "encoder")
    data, precision = onnx_file(graph, effect.reconstructions if effect else 0, precision, "encoder")
    return data, precision, effect.codes if precision == "fp16" and effect else 0.0


# ---------------------------------------------------------------- what sampling needs, compact

class Packed:
    """A little-endian binary of arrays, each section 4-byte aligned, and where each lies."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, array: np.ndarray) -> dict:
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        where = {"offset": self.size, "length": int(array.size), "dtype": array.dtype.name}
        padding = -len(data) % 4
        self.parts.append(data + b"\0" * padding)
        self.size += len(data) + padding
        return where

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def lower_triangle(cholesky: torch.Tensor) -> np.ndarray:
    """The lower triangles of (... x D x D) factors, row by row, as float16."""
    rows, cols = np.tril_indices(cholesky.shape[-1])
    return cholesky.double().numpy()[..., rows, cols].astype(np.float16)


def mixture(packed: Packed, weights: torch.Tensor, means: torch.Tensor, cholesky: torch.Tensor) -> dict:
    """A K-component mixture for the page: weights in the manifest, means and factors in prior.bin."""
    return {"weights": [float(w) for w in weights], "means": packed.add(means.float().numpy()),
            "cholesky": packed.add(lower_triangle(cholesky))}


def sampling_files(model: VAE, prior: dict, hair: dict | None, sliders: dict, about: dict) -> dict[str, bytes]:
    packed = Packed()
    stored = mixture(packed, prior["weights"], prior["means"], prior["cholesky"])
    colours = {name: {"faces": c["faces"], **mixture(packed, torch.ones(1), c["mean"][None], c["cholesky"][None])}
               for name, c in (hair or {}).get("colours", {}).items()}
    manifest = {"format": WEB_FORMAT, "latent_dim": model.latent_dim, "image_size": model.image_size,
                "prior": stored, "hair": colours,
                "sliders": [{"name": name, "kind": s["kind"], "direction": [float(f"{v:.7g}") for v in s["direction"]]}
                            for name, s in sliders.items()], **about}
    return {"model.json": (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), "prior.bin": packed.bytes()}


def upload_files(cfg, model: VAE, effect: Fp16Effect | None, detector, cascade: bytes) -> tuple[dict, dict]:
    """What the page loads when a visitor first chooses a picture: the encoder, OpenCV.js and the cascade, and what
    model.json says of them (the crop config's detector settings: the page finds faces as pipeline/faces.py does)."""
    encoder, precision, code_error = encoder_file(model, effect, cfg.precision)
    files = {**package_files(cfg, DETECTOR), "encoder.onnx": encoder, CASCADE_NAME: cascade}
    settings = {"encoder": "encoder.onnx", "encoder_precision": precision, "encoder_code_error": round(code_error, 6),
                "opencv": DETECTOR.files["lib/opencv_js.js"], "cascade": CASCADE_NAME,
                **{k: detector[k] for k in ("scale_factor", "min_neighbors", "min_size", "margin", "max_pixels")}}
    return files, settings


def web_files(cfg, model: VAE, prior: dict, hair: dict | None, sliders: dict, about: dict, detector=None,
              cascade: bytes | None = None) -> dict[str, bytes]:
    """Every file of the web folder, by its path inside it (the runtime first: a missing one fails fast); uploads
    when the export carries the detector's `cascade` (`detector`: the crop config's settings)."""
    runtime = package_files(cfg, RUNTIME)
    effect = fp16_effect(model, prior) if cfg.precision != "fp32" else None  # what float16 weights would change
    uploads, upload = upload_files(cfg, model, effect, detector, cascade) if cascade is not None else ({}, None)
    decoder, precision = decoder_file(model, effect, cfg.precision)
    about = {**about, "precision": precision, "upload": upload}
    return {**sampling_files(model, prior, hair, sliders, about), "decoder.onnx": decoder,
            **{name: (PAGE_DIR / name).read_bytes() for name in PAGE_FILES}, **runtime, **uploads}
