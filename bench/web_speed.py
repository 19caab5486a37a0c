"""How fast an export's web page draws faces, and finds and encodes the faces of a picture, in headless Chromium on
this machine, against the same work in PyTorch and OpenCV in this process (the baseline: what `load(DIR).decode`
costs for the same 64 codes, and `pipeline.faces` + `load(DIR).encode` + `decode` for the same picture).

    .venv/bin/python bench/web_speed.py EXPORT_FOLDER [--loads 5] [--grids 20] [--uploads 5] [--screenshot docs/web.jpg]
        [--upload-screenshot docs/web-upload.jpg]

Serves EXPORT_FOLDER/web on 127.0.0.1 twice: as a plain static host (no cross-origin-isolation headers: WebAssembly
gets one thread) and with COOP/COEP headers (threads allowed). For each: --loads fresh page loads, timed from
navigation until the first grid of 64 faces is drawn, then --grids redraws of a 64-face grid (decode + paint).
On the plain host, uploads of two pictures made from ../shared/data/illustrations (a 1000 x 1000 one with one face,
a 2000 x 1500 one with several): the first (which loads OpenCV.js, the cascade and the encoder), then --uploads more
of each, timed from choosing the file to its reconstructions shown. Prints the folder's size, what the first load
fetches and what the detector adds.
"""
import argparse
import functools
import http.server
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline import load
from pipeline.faces import face_tiles, load_cascade
from pipeline.images import load_image

ROOT = Path(__file__).resolve().parents[1]
ILLUSTRATIONS = ROOT.parent / "shared" / "data" / "illustrations"

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


class Handler(http.server.SimpleHTTPRequestHandler):
    isolated = False

    def end_headers(self):
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def served(folder: Path, isolated: bool):
    handler = type("Served", (Handler,), {"isolated": isolated})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def spread(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms (n={len(ms)})"


def page_timings(browser, url: str, loads: int, grids: int, screenshot: str | None) -> dict:
    first, ready, redraw, threads = [], [], [], None
    for load_no in range(loads):
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready !== '0'", timeout=120_000)
        ready.append((time.perf_counter() - start) * 1000)
        if page.get_attribute("body", "data-ready") != "1":
            raise SystemExit(f"the page did not start: {page.text_content('#message')}")
        first.append(page.evaluate("window.timings.firstGrid"))
        threads = page.text_content("#about").rsplit(",", 1)[-1].strip()
        if load_no == 0:
            redraw = [page.evaluate("window.drawGrid()") for _ in range(grids)]
            if screenshot:  # with A -> B chosen, so the strip shows too
                page.click("#grid canvas:nth-child(2)")
                page.click("#grid canvas:nth-child(13)")
                page.wait_for_function("document.querySelectorAll('#strip canvas').length > 0")
                page.screenshot(path=screenshot, type="jpeg", quality=85, full_page=True)
        page.close()
    return {"ready": ready, "first": first, "redraw": redraw, "threads": threads}


def pictures(cascade, folder: Path) -> dict[str, Path]:
    """A 1000 x 1000 picture with one face (the first illustration whose centre square holds exactly one) and a
    2000 x 1500 one with several (four illustrations with faces, one per quadrant), written into `folder`."""
    crop = OmegaConf.load(ROOT / "conf/crop/default.yaml")
    found = {}
    for path in sorted(p for p in ILLUSTRATIONS.rglob("*") if p.is_file()):
        picture = Image.open(path).convert("RGB")
        side = min(picture.size)
        square = picture.crop(((picture.width - side) // 2, (picture.height - side) // 2,
                               (picture.width + side) // 2, (picture.height + side) // 2)).resize((1000, 1000))
        if "one" not in found and len(face_tiles(cascade, np.asarray(square), None, crop)) == 1:
            found["one"] = square
        elif len(found.get("several", [])) < 4 and face_tiles(cascade, np.asarray(picture.resize((1000, 750))), None,
                                                              crop):
            found.setdefault("several", []).append(picture.resize((1000, 750)))
        if "one" in found and len(found.get("several", [])) == 4:
            break
    sheet = Image.new("RGB", (2000, 1500), "white")
    for i, quarter in enumerate(found["several"]):
        sheet.paste(quarter, ((i % 2) * 1000, (i // 2) * 750))
    paths = {"1000x1000, one face": folder / "one.jpg", "2000x1500, several faces": folder / "several.jpg"}
    found["one"].save(paths["1000x1000, one face"], quality=92)
    sheet.save(paths["2000x1500, several faces"], quality=92)
    return paths


def python_upload(export: Path, cascade, path: Path, repeats: int) -> tuple[int, list[float]]:
    """The baseline: the same picture through pipeline.faces, load().encode and decode, in this process."""
    model, crop = load(export, device="cpu"), OmegaConf.load(ROOT / "conf/crop/default.yaml")
    times, count = [], 0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        faces = face_tiles(cascade, *load_image(path, crop.max_pixels), crop)
        model.reconstruct(np.stack([f["tile"] for f in faces]))
        times.append((time.perf_counter() - start) * 1000)
        count = len(faces)
    return count, times[1:]


def upload_timings(browser, url: str, paths: dict[str, Path], repeats: int, screenshot: str | None) -> dict:
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    fetched = []
    page.on("requestfinished", lambda request: fetched.append(request))
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready !== '0'", timeout=120_000)
    first_load = sum(r.sizes()["responseBodySize"] for r in fetched)
    out = {"first_load": first_load, "timings": {}}
    for number, (name, path) in enumerate(paths.items()):
        times = []
        for attempt in range(repeats + (1 if number == 0 else 0)):
            page.evaluate("document.getElementById('uploads').dataset.state = 'waiting'")
            page.set_input_files("#picture", str(path))
            page.wait_for_function("['done', 'error'].includes(document.getElementById('uploads').dataset.state)",
                                   timeout=120_000)
            if page.get_attribute("#uploads", "data-state") != "done":
                raise SystemExit(f"{path}: {page.text_content('#message')}")
            upload = page.evaluate("window.timings.upload")
            if number == 0 and attempt == 0:
                out["first"] = upload["total"]
                out["detector"] = sum(r.sizes()["responseBodySize"] for r in fetched) - first_load
            else:
                times.append(upload)
        out["timings"][name] = (page.locator("#uploads figure").count(), times)
    if screenshot:  # the picture's first face being edited: recoloured, its variations, A -> B from a grid face
        page.set_input_files("#picture", str(next(iter(paths.values()))))
        page.wait_for_function("document.getElementById('uploads').dataset.state === 'done'")
        page.click("#hair button:nth-child(3)")
        page.wait_for_function("document.querySelector('#hair button.on') === document.querySelector('#hair "
                               "button:nth-child(3)')")
        page.click("#grid canvas:nth-child(4)")
        page.click("#uploads figure:nth-child(1)")
        page.wait_for_function("document.querySelectorAll('#strip canvas').length > 0")
        time.sleep(1)
        page.screenshot(path=screenshot, type="jpeg", quality=85, full_page=True)
    page.close()
    return out


def torch_decode(folder: Path, grids: int) -> list[float]:
    model = load(folder, device="cpu")
    codes = np.random.default_rng(0).standard_normal((64, model.latent_dim)).astype(np.float32)
    model.decode(codes)
    times = []
    for _ in range(grids):
        start = time.perf_counter()
        model.decode(codes)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--grids", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--screenshot")
    parser.add_argument("--upload-screenshot")
    args = parser.parse_args()
    web = args.folder / "web"
    sizes = {str(p.relative_to(web)): p.stat().st_size for p in sorted(web.rglob("*")) if p.is_file()}
    total = sum(sizes.values())
    print(f"web folder: {total / 1e6:.2f} MB ({total / 2 ** 20:.2f} MiB): " +
          ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items()))
    print(f"baseline, PyTorch in this process ({torch.get_num_threads()} threads), 64 faces: "
          f"{spread(torch_decode(args.folder, args.grids))}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for isolated in (False, True):
            with served(web, isolated) as url:
                timed = page_timings(browser, url, args.loads, args.grids, None if isolated else args.screenshot)
            host = "COOP/COEP headers" if isolated else "plain static host"
            print(f"{host} ({timed['threads']}): navigation to first grid {spread(timed['ready'])}; first grid's "
                  f"decode + paint {spread(timed['first'])}; a 64-face grid afterwards {spread(timed['redraw'])}")
        if (web / "encoder.onnx").is_file() and ILLUSTRATIONS.is_dir():
            cascade = load_cascade(args.folder / "lbpcascade_animeface.xml")
            with tempfile.TemporaryDirectory() as folder, served(web, False) as url:
                paths = pictures(cascade, Path(folder))
                timed = upload_timings(browser, url, paths, args.uploads, args.upload_screenshot)
                print(f"uploads, plain static host: the first load fetched {timed['first_load'] / 1e6:.2f} MB; the "
                      f"first picture {timed['first']:.0f} ms, loading the detector ({timed['detector'] / 1e6:.2f} MB "
                      "fetched: OpenCV.js, the cascade, the encoder)")
                for name, (count, times) in timed["timings"].items():
                    faces, baseline = python_upload(args.folder, cascade, paths[name], args.uploads)
                    parts = ", ".join(f"{part} {np.median([t[part] for t in times]):.0f} ms"
                                      for part in ("decoded", "detected", "encoded"))
                    print(f"  {name}: {count} face(s) in the page ({faces} in Python); choosing the file to "
                          f"reconstructions shown {spread([t['total'] for t in times])} ({parts}); baseline "
                          f"pipeline.faces + encode + decode in this process {spread(baseline)}")
        browser.close()


if __name__ == "__main__":
    main()
