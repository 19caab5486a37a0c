"""The model as a web page: the `web/` folder of an export, which draws faces in any browser with no Python and no
server code (pipeline.export writes it; `web.enabled=false` leaves it out).

    web/index.html, web/page.js     the page (pipeline/web/), unchanged: no build step
    web/model.json                  what the page needs to know: sizes, the mixture's weights, hair colours, sliders,
                                    where each tensor lies in prior.bin
    web/prior.bin                   the stored mixture and each hair colour's Gaussian: means float32, Cholesky factors
                                    float16, lower triangle only (a quarter of prior.safetensors' float64 squares)
    web/decoder.onnx                the default decoder (z -> pixel means in [0, 1]); weights stored as float16 and
                                    cast to float32 inside the graph when that moves no pixel by more than 1/255
    web/ort/                        ONNX Runtime Web's WebAssembly build (npm onnxruntime-web, pinned by version and
                                    sha512; downloaded once into web.cache_dir, or taken from web.runtime=PATH)
"""
import base64
import copy
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
from pipeline.model import VAE, decode_means
from pipeline.prior import sample_latents

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("web")
PAGE_FILES = ("index.html", "page.js")
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
WEB_FORMAT = "animeface-vae-web/1"
OPSET = 17
FP16_CHECK_CODES = 256  # prior draws decoded both ways to decide the decoder's precision


@dataclass
class WebConfig:
    """conf/web/default.yaml: the export's web folder."""
    enabled: bool = key()
    runtime: str = key()
    runtime_integrity: str = key()
    cache_dir: str = key()
    precision: str = key(choices=("auto", "fp16", "fp32"))


# ---------------------------------------------------------------- ONNX Runtime Web, pinned

def runtime_files(cfg) -> dict[str, bytes]:
    """ONNX Runtime Web's three WebAssembly-build files: from web.runtime when it is a folder (e.g. an npm install's
    node_modules/onnxruntime-web/dist) or a .tgz, else the pinned npm tarball (cached in web.cache_dir)."""
    source = str(cfg.runtime)
    if source.startswith(("http://", "https://")):
        return from_tarball(cached_tarball(cfg), source)
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [name for name in RUNTIME_FILES if not (path / name).is_file()]
        if missing:
            raise PipelineError(f"web.runtime={path} lacks {', '.join(missing)}: point it at onnxruntime-web's dist "
                                "folder (npm install onnxruntime-web, then node_modules/onnxruntime-web/dist)")
        return {name: (path / name).read_bytes() for name in RUNTIME_FILES}
    if path.is_file():
        data = path.read_bytes()
        check_integrity(data, cfg.runtime_integrity, str(path))
        return from_tarball(data, str(path))
    raise PipelineError(f"web.runtime={path} does not exist: pass onnxruntime-web's dist folder or its npm tarball, "
                        "leave web.runtime at its registry URL, or add web.enabled=false to export without the page")


def cached_tarball(cfg) -> bytes:
    path = Path(cfg.cache_dir).expanduser() / Path(str(cfg.runtime)).name
    if path.is_file():
        data = path.read_bytes()
        if integrity(data) == cfg.runtime_integrity:
            return data
    log.info("downloading ONNX Runtime Web from %s (once; cached in %s)", cfg.runtime, path.parent)
    try:
        resp = requests.get(str(cfg.runtime), timeout=120)
        resp.raise_for_status()
    except requests.RequestException as err:
        raise PipelineError(f"could not download ONNX Runtime Web from {cfg.runtime} ({err}); offline, pass a local "
                            "copy (web.runtime=/path/to/onnxruntime-web-1.31.1.tgz or its dist folder), or add "
                            "web.enabled=false to export without the page") from None
    check_integrity(resp.content, cfg.runtime_integrity, str(cfg.runtime))
    optional_write(lambda: atomic_write_bytes(path, resp.content), "the ONNX Runtime Web download")
    return resp.content


def integrity(data: bytes) -> str:
    """npm's integrity string of a file: sha512, base64."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def check_integrity(data: bytes, expected: str, source: str) -> None:
    if integrity(data) != expected:
        raise PipelineError(f"{source} is not the pinned ONNX Runtime Web (its integrity is {integrity(data)[:30]}..., "
                            f"expected {expected[:30]}...); nothing was used. Check web.runtime and "
                            "web.runtime_integrity")


def from_tarball(data: bytes, source: str) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            return {name: tar.extractfile(f"package/dist/{name}").read() for name in RUNTIME_FILES}
    except (tarfile.TarError, KeyError, AttributeError, OSError) as err:
        raise PipelineError(f"{source} is not onnxruntime-web's npm tarball ({err}): pass the .tgz from the npm "
                            "registry or its dist folder") from None


# ---------------------------------------------------------------- the decoder as ONNX

class PixelMeans(nn.Module):
    """z -> pixel means in [0, 1]: what decode_means computes, as one graph."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, z):
        return torch.sigmoid(self.model.decode(z))


def onnx_bytes(model: VAE) -> bytes:
    """The TorchScript exporter: the torch.export one needs onnxscript besides onnx, for a graph this plain (convs,
    transposed convs, batch norms, SiLU) it gains nothing, and torch is pinned, so its deprecation notice is noise."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(PixelMeans(model).eval(), (torch.zeros(2, model.latent_dim),), buffer, dynamo=False,
                              input_names=["z"], output_names=["pixels"], opset_version=OPSET,
                              dynamic_axes={"z": {0: "n"}, "pixels": {0: "n"}})
    except Exception as err:  # an operator ONNX cannot express: say which, and export the rest with web.enabled=false
        raise PipelineError(f"the decoder cannot be written as ONNX ({type(err).__name__}: {str(err)[:300]}); add "
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


def fp16_error(model: VAE, prior: dict) -> int:
    """The largest change, in uint8 pixel levels, that rounding the decoder's weights to float16 makes to the faces
    of FP16_CHECK_CODES draws of the prior."""
    z = sample_latents(prior, FP16_CHECK_CODES, model.latent_dim, torch.Generator().manual_seed(0))
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    exact, approx = to_uint8(decode_means(model, z)), to_uint8(decode_means(rounded.eval(), z))
    return int((exact.int() - approx.int()).abs().max())


def decoder_file(model: VAE, prior: dict, precision: str) -> tuple[bytes, str]:
    graph = onnx_bytes(model)
    if precision == "auto":
        error = fp16_error(model, prior)
        precision = "fp16" if error <= 1 else "fp32"
        if precision == "fp32":
            log.info("float16 weights move pixels by up to %d/255: the web decoder keeps float32", error)
    return (stored_as_fp16(graph) if precision == "fp16" else graph), precision


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


def web_files(cfg, model: VAE, prior: dict, hair: dict | None, sliders: dict, about: dict) -> dict[str, bytes]:
    """Every file of the web folder, by its path inside it (the runtime first: a missing one fails fast)."""
    runtime = {f"ort/{name}": data for name, data in runtime_files(cfg).items()}
    decoder, precision = decoder_file(model, prior, cfg.precision)
    return {**sampling_files(model, prior, hair, sliders, {**about, "precision": precision}),
            "decoder.onnx": decoder, **{name: (PAGE_DIR / name).read_bytes() for name in PAGE_FILES}, **runtime}
