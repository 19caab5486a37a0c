"""The export's web page (pipeline/web.py, pipeline/web/): its files, its decoder against the run's pixels, and the
page itself in a real Chromium served by `python -m http.server`, with every request outside its origin blocked."""
import contextlib
import gzip
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
from pipeline.web import DETECTOR, RUNTIME, RUNTIME_FILES, WebConfig, lower_triangle, package_files
from tests import realdata
from tests.helpers import ROOT, export


def web_config(**changes):
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/web/default.yaml"),
                          {"cache_dir": str(realdata.cache_dir()), **changes})
    return checked(cfg, WebConfig)


@pytest.fixture(scope="session")
def runtime_cache():
    """The pinned ONNX Runtime Web and OpenCV.js tarballs, downloaded once into the test cache; a skip when they cannot
    be had."""
    try:
        for package in (RUNTIME, DETECTOR):
            package_files(web_config(), package)
    except PipelineError as err:
        pytest.skip(f"needs ONNX Runtime Web and OpenCV.js from the npm registry, fetched once: {err}")
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
        "index.html", "page.js", "model.json", "prior.bin", "decoder.onnx", *RUNTIME.files.values(), "encoder.onnx",
        *DETECTOR.files.values(), "lbpcascade_animeface.xml"}
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
    web_export(tiny_runs, tmp_path / "fp32", "web.precision=fp32", "cascade=false", cache=runtime_cache)
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
    web_export(tiny_runs, tmp_path / "from-dist", f"web.runtime={dist}", "cascade=false", cache=tmp_path / "empty-cache")
    wasm = tmp_path / "from-dist" / "web" / "ort" / f"{RUNTIME_FILES[-1]}.gz"
    assert gzip.decompress(wasm.read_bytes()) == (dist / RUNTIME_FILES[-1]).read_bytes()
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
        proc = web_export(tiny_runs, tmp_path / "refused", f"web.runtime={runtime}", "cascade=false", check=False,
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
                           ("ort/ort-wasm-simd-threaded.wasm.gz", "ort/ort-wasm-simd-threaded.wasm.gz could not be loaded (404")):
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


# --- a visitor's own picture ----------------------------------------------------------------------------------

def onnx_codes(web: Path, tiles: np.ndarray) -> np.ndarray:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(web / "encoder.onnx"), providers=["CPUExecutionProvider"])
    pixels = tiles.transpose(0, 3, 1, 2).astype(np.float32) / 255
    return session.run(None, {"pixels": pixels})[0]


def test_uploads_get_the_encoder_opencv_js_and_the_export_s_cascade(site, tiny_runs, runtime_cache, tmp_path):
    web = site / "web"
    upload = json.loads((web / "model.json").read_text())["upload"]
    crop = OmegaConf.load(ROOT / "conf/crop/default.yaml")
    assert {k: upload[k] for k in ("scale_factor", "min_neighbors", "min_size", "margin", "max_pixels")} == \
        {k: crop[k] for k in ("scale_factor", "min_neighbors", "min_size", "margin", "max_pixels")}
    assert (web / upload["cascade"]).read_bytes() == (site / "lbpcascade_animeface.xml").read_bytes()
    with tarfile.open(next(Path(runtime_cache).glob("web-*.tgz"))) as tar:
        assert gzip.decompress((web / upload["opencv"]).read_bytes()) == \
            tar.extractfile("package/lib/opencv_js.js").read()
    model = load(site, device="cpu")
    tiles = model.sample(12, seed=3)
    codes = onnx_codes(web, tiles)
    assert upload["encoder_precision"] in ("fp16", "fp32")
    assert np.abs(codes - model.encode(tiles)).max() <= max(1e-4, 2 * upload["encoder_code_error"])
    recon = onnx_pixels(web, codes).astype(int)
    assert np.abs(recon - model.reconstruct(tiles).astype(int)).max() <= 1
    web_export(tiny_runs, tmp_path / "plain", "cascade=false", cache=runtime_cache)
    plain = tmp_path / "plain" / "web"
    assert json.loads((plain / "model.json").read_text())["upload"] is None
    assert not (plain / "encoder.onnx").exists() and not (plain / "opencv").exists()


@pytest.fixture(scope="module")
def anime_site(tiny_runs, runtime_cache, cascade, tmp_path_factory) -> Path:
    """The obs_std=0.1 tiny run exported with its web folder and the real detector (read only)."""
    out = tmp_path_factory.mktemp("web") / "anime"
    export(tiny_runs, "+obs_std=0.1", f"out={out}", f"crop.cascade={cascade}", web_cache=runtime_cache)
    return out


def recorded(page) -> list:
    """Every request the page makes from now on (to see that none carries a body)."""
    requests = []
    page.on("request", lambda request: requests.append(request))
    return requests


def choose_picture(page, path: Path) -> str:
    """Upload `path` through the file input; the state #uploads ends in (done or error)."""
    page.evaluate("document.getElementById('uploads').dataset.state = 'waiting'")
    page.set_input_files("#picture", str(path))
    page.wait_for_function("['done', 'error'].includes(document.getElementById('uploads').dataset.state)",
                           timeout=120_000)
    return page.get_attribute("#uploads", "data-state")


def canvas_pixels(page, selector: str) -> np.ndarray:
    data = page.evaluate("""s => Array.from(document.querySelectorAll(s)).map(
        c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data))""", selector)
    return np.array(data, np.int64).reshape(len(data), 64, 64, 4)[..., :3]


def iou(a, b) -> float:
    width = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    height = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return width * height / (a[2] * a[3] + b[2] * b[3] - width * height)


@pytest.mark.slow
def test_the_page_finds_and_encodes_the_faces_pipeline_faces_finds(browser, anime_site, illustrations, cascade):
    """Every fourth of the 160 illustrations (bench/web_upload.py runs all): the same boxes in the same order, crops
    within 2/255 of the crop stage's, codes within 0.01 of load().encode (measured: bench/RESULTS.md), and
    reconstructions within 2/255 of load().reconstruct; no request carries a body, none leaves the origin."""
    from pipeline.faces import face_tiles, load_cascade
    from pipeline.images import load_image
    model = load(anime_site, device="cpu")
    detector, crop = load_cascade(cascade), OmegaConf.load(ROOT / "conf/crop/default.yaml")
    pictures = sorted(p for p in illustrations.rglob("*") if p.is_file())[::4]
    with served(anime_site / "web") as url:
        page = opened(browser, url)
        requests = recorded(page)
        with_faces = 0
        for picture in pictures:
            faces = face_tiles(detector, *load_image(picture, crop.max_pixels), crop)
            state = choose_picture(page, picture)
            if not faces:
                assert state == "error" and page.text_content("#message").startswith(f"No face found in {picture.name}")
                assert page.locator("#uploads figure").count() == 0
                continue
            with_faces += 1
            assert state == "done", page.text_content("#message")
            boxes = [list(map(int, b.split(","))) for b in page.eval_on_selector_all(
                "#uploads figure", "fs => fs.map(f => f.dataset.box)")]
            assert len(boxes) == len(faces) and all(iou(b, f["box"]) >= 0.9 for b, f in zip(boxes, faces)), picture
            tiles = np.stack([f["tile"] for f in faces])
            assert np.abs(canvas_pixels(page, "#uploads canvas.crop") - tiles).max() <= 2, picture
            codes = np.array([f["code"] for f in page.evaluate("window.uploadedFaces()")])
            assert np.abs(codes - model.encode(tiles)).max() <= 0.01, picture
            assert np.abs(canvas_pixels(page, "#uploads canvas.reconstruction") - model.reconstruct(tiles)).max() <= 2
        assert with_faces >= 10 and page.errors == [] and page.left_origin == []
        assert requests and all(r.post_data_buffer is None and r.method in ("GET", "HEAD") for r in requests)
        page.close()


@pytest.mark.slow
def test_an_uploaded_face_is_edited_like_any_face_of_the_grid(browser, anime_site, illustrations):
    picture = next(p for p in sorted(illustrations.rglob("*")) if p.name.startswith("Himegoto_Casting_Malloc"))
    with served(anime_site / "web") as url:
        page = opened(browser, url)
        requests = recorded(page)
        loads = [r.url for r in requests]
        assert not [u for u in loads if "opencv" in u or "encoder" in u]  # the first grid waits for neither
        assert choose_picture(page, picture) == "done" and page.locator("#uploads figure").count() == 2
        assert "never leaves this browser" in page.text_content("#privacy")
        page.click("#uploads figure:nth-child(1)")
        page.wait_for_function("document.querySelectorAll('#variations canvas').length === 8")

        def face():
            return page.evaluate("document.getElementById('edit-face').toDataURL()")
        plain = face()
        assert page.text_content("#edit-label").startswith(f"{picture.name}, face 1")
        colour = load(anime_site, device="cpu").hair_colours()[0]
        page.click(f"#hair button:text-is('{colour}')")  # the chip recolours it
        page.wait_for_function(f"document.getElementById('edit-label').textContent.endsWith('towards {colour} hair')")
        recoloured = face()
        assert recoloured != plain
        page.eval_on_selector("#sliders input", "s => { s.value = 2; s.dispatchEvent(new Event('input')); }")
        page.wait_for_function(f"document.getElementById('edit-face').toDataURL() !== {recoloured!r}")
        page.click("#variations canvas:nth-child(3)")  # a variation becomes the face edited
        page.wait_for_function("document.getElementById('edit-label').textContent.startsWith('variation 3 of ')")
        page.click("#uploads figure:nth-child(2)")  # A: the upload's second face; B: a face of the grid
        page.click("#grid canvas:nth-child(7)")
        page.wait_for_function("document.querySelectorAll('#strip canvas').length === 10")
        assert page.text_content("#message") == "" and page.errors == [] and page.left_origin == []
        assert [r for r in requests if r.post_data_buffer is not None or r.method not in ("GET", "HEAD")] == []
        page.close()


def broken_copy(site: Path, tmp_path: Path, name: str, data: bytes | None) -> Path:
    copy = shutil.copytree(site / "web", tmp_path / name.replace("/", "-") / str(len(data or b"")))
    if data is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(data)
    return copy


@pytest.mark.slow
def test_bad_pictures_and_files_are_one_line_and_the_page_keeps_working(browser, anime_site, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    header = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + (30000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0"
    (tmp_path / "bomb.png").write_bytes(header + b"\0" * 64)  # says 30000 x 30000; never decoded
    Image.new("RGB", (300, 200), (120, 180, 90)).save(tmp_path / "meadow.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 40, 40)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:60])
    with served(anime_site / "web") as url:
        page = opened(browser, url)
        for name, words in (("notes.png", "notes.png is not a picture this page can read: choose a JPEG, PNG, WebP or GIF"),
                            ("bomb.png", "bomb.png is 30000 x 30000 (900,000,000 pixels), over this page's limit of "
                                         "64,000,000"),
                            ("meadow.jpg", "No face found in meadow.jpg: the detector (lbpcascade_animeface) finds "
                                           "anime faces at least 24 px across, looking at the viewer; try a larger or "
                                           "clearer picture"),
                            ("cut.png", "cut.png could not be decoded as a PNG")):
            assert choose_picture(page, tmp_path / name) == "error"
            message = page.text_content("#message")
            assert message.startswith(words) and "\n" not in message, message
            assert page.locator("#uploads figure").count() == 0
        first = page.evaluate("document.querySelector('#grid canvas').toDataURL()")
        page.click("#resample")  # the page keeps working
        page.wait_for_function(f"document.querySelector('#grid canvas').toDataURL() !== {first!r}")
        assert page.errors == []
        page.close()
    face = Image.new("RGB", (8, 8))  # any picture: the files fail before a face is looked for
    face.save(tmp_path / "any.png")
    for name, data, words in (("opencv/opencv_js.js.gz", None, "opencv/opencv_js.js.gz could not be loaded (404"),
                              ("opencv/opencv_js.js.gz", gzip.compress(b"export default 1 +;"),
                               "opencv/opencv_js.js.gz is damaged"),
                              ("encoder.onnx", None, "encoder.onnx could not be loaded (404"),
                              ("encoder.onnx", b"not a model", "encoder.onnx could not be started"),
                              ("lbpcascade_animeface.xml", b"<opencv_storage></opencv_storage>",
                               "lbpcascade_animeface.xml is damaged")):
        with served(broken_copy(anime_site, tmp_path, name, data)) as url:
            page = opened(browser, url)
            assert choose_picture(page, tmp_path / "any.png") == "error"
            assert page.text_content("#message").startswith(words), page.text_content("#message")
            assert page.locator("#grid canvas").count() == 64
            page.close()
