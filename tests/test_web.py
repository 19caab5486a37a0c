"""The export's web page (pipeline/web.py, pipeline/web/): its files, its decoder against the run's pixels, and the
page itself in a real Chromium served by `python -m http.server`, with every request outside its origin blocked."""
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline import load
from pipeline.config import checked
from pipeline.errors import PipelineError
from pipeline.web import RUNTIME_FILES, WebConfig, lower_triangle, runtime_files
from tests import realdata
from tests.helpers import ROOT, export


def web_config(**changes):
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/web/default.yaml"),
                          {"cache_dir": str(realdata.cache_dir()), **changes})
    return checked(cfg, WebConfig)


@pytest.fixture(scope="session")
def runtime_cache():
    """The pinned ONNX Runtime Web tarball, downloaded once into the test cache; a skip when it cannot be had."""
    try:
        runtime_files(web_config())
    except PipelineError as err:
        pytest.skip(f"needs ONNX Runtime Web from the npm registry, fetched once: {err}")
    return realdata.cache_dir()


def web_export(runs, out, *args, check=True, cache=None):
    return export(runs, "+obs_std=0.1", f"out={out}", *args, check=check, web_cache=cache)


@pytest.fixture(scope="module")
def site(tiny_runs, runtime_cache, tmp_path_factory) -> Path:
    """The obs_std=0.1 tiny run exported with its web folder (read only)."""
    out = tmp_path_factory.mktemp("web") / "faces"
    web_export(tiny_runs, out, cache=runtime_cache)
    return out


def onnx_pixels(web: Path, codes: np.ndarray) -> np.ndarray:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(web / "decoder.onnx"), providers=["CPUExecutionProvider"])
    means = session.run(None, {"z": codes.astype(np.float32)})[0]
    return np.clip(np.round(means * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def test_the_export_writes_a_web_folder_that_holds_the_run(site, tiny_runs):
    web = site / "web"
    assert {str(p.relative_to(web)) for p in web.rglob("*") if p.is_file()} == {
        "index.html", "page.js", "model.json", "prior.bin", "decoder.onnx", *(f"ort/{n}" for n in RUNTIME_FILES)}
    model = load(site, device="cpu")
    codes = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    assert np.abs(onnx_pixels(web, codes).astype(int) - model.decode(codes).astype(int)).max() <= 1
    manifest = json.loads((web / "model.json").read_text())
    assert manifest["decoder"] == "sharp" and manifest["latent_dim"] == 32 and manifest["precision"] in ("fp16", "fp32")
    blob = (web / "prior.bin").read_bytes()

    def array(where, dtype):
        return np.frombuffer(blob, dtype, where["length"], where["offset"])
    prior = model.run.stored_prior()
    assert np.allclose(manifest["prior"]["weights"], prior["weights"].numpy())
    assert np.array_equal(array(manifest["prior"]["means"], np.float32), prior["means"].float().numpy().ravel())
    packed = array(manifest["prior"]["cholesky"], np.float16)
    assert np.array_equal(packed, lower_triangle(prior["cholesky"]).ravel())
    assert np.allclose(packed.astype(np.float64), lower_triangle(prior["cholesky"]).astype(np.float64).ravel())
    hair = model.run.hair()
    assert set(manifest["hair"]) == set(hair["colours"])
    assert [s["name"] for s in manifest["sliders"]] == model.sliders()
    first = manifest["sliders"][0]
    assert np.allclose(first["direction"], model.run.sliders()[0][first["name"]]["direction"].numpy(), atol=1e-6)
    assert "README" not in {p.name for p in web.iterdir()}


def test_the_web_folder_is_the_same_bytes_when_exported_again(site, tiny_runs, runtime_cache, tmp_path):
    again = tmp_path / "again"
    web_export(tiny_runs, again, cache=runtime_cache)
    files = {p.relative_to(site): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert files == {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}


def test_the_decoder_keeps_float32_when_asked_and_matches_all_the_same(tiny_runs, runtime_cache, tmp_path):
    web_export(tiny_runs, tmp_path / "fp32", "web.precision=fp32", cache=runtime_cache)
    web = tmp_path / "fp32" / "web"
    assert json.loads((web / "model.json").read_text())["precision"] == "fp32"
    codes = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    assert np.abs(onnx_pixels(web, codes).astype(int) -
                  load(tmp_path / "fp32", device="cpu").decode(codes).astype(int)).max() <= 1


def test_the_runtime_is_pinned_and_a_bad_one_is_one_line(tiny_runs, runtime_cache, tmp_path):
    tarball = next(Path(runtime_cache).glob("onnxruntime-web-*.tgz"))
    dist = tmp_path / "dist"
    dist.mkdir()
    with tarfile.open(tarball) as tar:
        for name in RUNTIME_FILES:
            (dist / name).write_bytes(tar.extractfile(f"package/dist/{name}").read())
    web_export(tiny_runs, tmp_path / "from-dist", f"web.runtime={dist}", cache=tmp_path / "empty-cache")
    assert (tmp_path / "from-dist" / "web" / "ort" / RUNTIME_FILES[-1]).read_bytes() == (dist / RUNTIME_FILES[-1]).read_bytes()
    (dist / RUNTIME_FILES[0]).unlink()
    forged = tmp_path / "forged.tgz"
    with tarfile.open(forged, "w:gz") as tar:
        info = tarfile.TarInfo("package/dist/ort.wasm.min.js")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"//"))
    for runtime, words in ((dist, f"web.runtime={dist} lacks ort.wasm.min.js"),
                           (forged, f"{forged} is not the pinned ONNX Runtime Web"),
                           (tmp_path / "nowhere", "does not exist"),
                           ("http://127.0.0.1:9/onnxruntime-web-1.31.1.tgz", "could not download ONNX Runtime Web")):
        proc = web_export(tiny_runs, tmp_path / "refused", f"web.runtime={runtime}", check=False,
                          cache=tmp_path / "empty-cache")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
        assert not (tmp_path / "refused").exists()
    export(tiny_runs, "+obs_std=0.1", f"out={tmp_path}/without")
    assert not (tmp_path / "without" / "web").exists()


def test_a_decoder_onnx_cannot_express_is_refused_in_one_line(tiny_runs, runtime_cache, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy_upsample", 17, "")
    monkeypatch.setattr(torch.onnx, "export", unsupported)
    proc = web_export(tiny_runs, tmp_path / "faces", check=False, cache=runtime_cache)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "aten::fancy_upsample" in proc.stderr
    assert "add web.enabled=false to export everything but the web page" in proc.stderr
    assert not (tmp_path / "faces").exists()


# --- in a real browser ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def served(folder: Path):
    """`python -m http.server` on a free port of 127.0.0.1, serving `folder`: a plain static host."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "-d", str(folder), "-b", "127.0.0.1", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def opened(browser, url: str, init_script: str | None = None):
    """A page at `url` with every request outside its origin blocked and recorded; waits for it to start."""
    page = browser.new_page(viewport={"width": 1300, "height": 950}, accept_downloads=True)
    page.left_origin, page.errors = [], []
    origin = url.split("/", 3)[:3]

    def guard(route):
        if route.request.url.split("/", 3)[:3] == origin:
            route.continue_()
        else:
            page.left_origin.append(route.request.url)
            route.abort()
    page.route("**/*", guard)
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready !== '0' || document.getElementById('message').textContent",
                           timeout=120_000)
    return page


@pytest.mark.slow
def test_the_page_draws_the_run_s_pixels_offline_from_a_plain_static_host(browser, site, tmp_path):
    model = load(site, device="cpu")
    codes = np.random.default_rng(2).standard_normal((6, 32)).astype(np.float32)
    with served(site / "web") as url:
        page = opened(browser, url)
        assert page.text_content("#message") == "" and page.get_attribute("body", "data-ready") == "1"
        decoded = np.array(page.evaluate("codes => window.decodeCodes(codes)", codes.tolist()), np.int64)
        assert decoded.shape == (6, 64 * 64 * 3)
        assert np.abs(decoded.reshape(6, 64, 64, 3) - model.decode(codes).astype(np.int64)).max() <= 2
        assert page.locator("#grid canvas").count() == 64 and "1 thread(s)" in page.text_content("#about")
        first = page.evaluate("document.querySelector('#grid canvas').toDataURL()")
        page.click("#resample")
        page.wait_for_function(f"document.querySelector('#grid canvas').toDataURL() !== {first!r}")
        colour = model.hair_colours()[0]
        page.click(f"#hair button:text-is('{colour}')")
        page.wait_for_function(f"document.querySelector('#hair button.on').textContent === {colour!r}")
        page.eval_on_selector("#sliders input", "s => { s.value = 2; s.dispatchEvent(new Event('input')); }")
        page.click("#grid canvas:nth-child(1)")
        page.click("#grid canvas:nth-child(5)")
        page.wait_for_function("document.querySelectorAll('#strip canvas').length === 10")
        with page.expect_download() as download:
            page.click("#save")
        grid = Image.open(download.value.path())
        assert grid.size == (8 * 66 + 2, 8 * 66 + 2) and page.text_content("#message") == ""
        assert page.left_origin == [] and page.errors == []
        page.close()


@pytest.mark.slow
def test_the_page_draws_codes_from_the_run_s_own_distributions(browser, site):
    """Its own random numbers, the same distribution: a hair colour's Gaussian (mean and covariance) and the
    mixture's mean, from 4,000 draws."""
    run = load(site, device="cpu").run
    with served(site / "web") as url:
        page = opened(browser, url)
        colour = next(iter(run.hair()["colours"]))
        drawn = np.array(page.evaluate("c => window.sampledCodes(4000, 7, 1, c)", colour))
        again = np.array(page.evaluate("c => window.sampledCodes(4000, 7, 1, c)", colour))
        mixture = np.array(page.evaluate("() => window.sampledCodes(4000, 3, 1, null)"))
        cooler = np.array(page.evaluate("c => window.sampledCodes(4000, 7, 0.5, c)", colour))
        page.close()
    assert np.array_equal(drawn, again)  # seeded
    own = run.hair()["colours"][colour]
    mean, covariance = own["mean"].numpy(), (own["cholesky"] @ own["cholesky"].T).numpy()
    spread = np.sqrt(np.diag(covariance) / len(drawn))
    assert np.all(np.abs(drawn.mean(0) - mean) < 5 * spread)
    assert np.linalg.norm(np.cov(drawn.T) - covariance) < 0.1 * np.linalg.norm(covariance)
    assert np.allclose(np.cov(cooler.T), covariance / 4, rtol=0, atol=0.1 * np.abs(covariance).max())
    prior = run.stored_prior()
    expected = (prior["weights"][:, None] * prior["means"]).sum(0).numpy()
    total = np.sqrt(np.diag(np.cov(mixture.T)) / len(mixture))
    assert np.all(np.abs(mixture.mean(0) - expected) < 5 * total)


@pytest.mark.slow
def test_the_page_says_in_one_line_what_is_wrong(browser, site, tmp_path):
    with served(site / "web") as url:
        page = opened(browser, url, "delete window.WebAssembly")
        assert page.text_content("#message").startswith("This browser has no WebAssembly")
        page.close()
    page = opened(browser, (site / "web" / "index.html").as_uri())
    assert "must be served, not opened as a file" in page.text_content("#message")
    page.close()
    for missing, words in (("decoder.onnx", "decoder.onnx could not be loaded (404"),
                           ("ort/ort.wasm.min.js", "ort/ort.wasm.min.js could not be loaded"),
                           ("prior.bin", "prior.bin could not be loaded (404"),
                           ("ort/ort-wasm-simd-threaded.wasm", "ort/ort-wasm-simd-threaded.wasm could not be loaded (404")):
        copy = shutil.copytree(site / "web", tmp_path / missing.replace("/", "-"))
        (copy / missing).unlink()
        with served(copy) as url:
            page = opened(browser, url)
            assert page.text_content("#message").startswith(words) and page.locator("#grid canvas").count() == 0
            page.close()
    damaged = shutil.copytree(site / "web", tmp_path / "damaged")
    (damaged / "decoder.onnx").write_bytes(b"not a model")
    with served(damaged) as url:
        page = opened(browser, url)
        assert page.text_content("#message").startswith("decoder.onnx could not be started")
        page.close()
