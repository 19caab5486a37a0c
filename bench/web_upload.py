"""Does the export's web page find and encode a picture's faces as the pipeline does? Every illustration of
../shared/data/illustrations through the page (headless Chromium, a plain static host, one thread) and through
pipeline.faces + load(EXPORT).encode / reconstruct in this process, compared face by face.

    .venv/bin/python bench/web_upload.py EXPORT_FOLDER      # exported with the real cascade (crop.cascade=...)

Prints: pictures, those with faces in each, same count and order (IoU >= 0.9), the largest crop, code and
reconstruction differences, and the page's time per picture (choosing the file to reconstructions shown).
"""
import argparse
import functools
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import load
from pipeline.faces import face_tiles, load_cascade
from pipeline.images import load_image

ROOT = Path(__file__).resolve().parents[1]
ILLUSTRATIONS = ROOT.parent / "shared" / "data" / "illustrations"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def iou(a, b) -> float:
    width = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    height = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return width * height / (a[2] * a[3] + b[2] * b[3] - width * height)


def page_faces(page, path: Path) -> dict:
    """What the page found in `path`: boxes, crop and reconstruction pixels, codes, milliseconds."""
    page.evaluate("document.getElementById('uploads').dataset.state = 'waiting'")
    page.set_input_files("#picture", str(path))
    page.wait_for_function("['done', 'error'].includes(document.getElementById('uploads').dataset.state)",
                           timeout=300_000)
    if page.get_attribute("#uploads", "data-state") != "done":
        return {"boxes": [], "message": page.text_content("#message")}
    return page.evaluate("""() => ({
        boxes: Array.from(document.querySelectorAll('#uploads figure'), f => f.dataset.box.split(',').map(Number)),
        crops: Array.from(document.querySelectorAll('#uploads canvas.crop'),
                          c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)),
        recons: Array.from(document.querySelectorAll('#uploads canvas.reconstruction'),
                           c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)),
        codes: window.uploadedFaces().map(f => f.code), ms: window.timings.upload.total })""")


def rgb(flat: list, size: int) -> np.ndarray:
    return np.array(flat, np.int64).reshape(-1, size, size, 4)[..., :3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright
    model, crop = load(args.folder, device="cpu"), OmegaConf.load(ROOT / "conf/crop/default.yaml")
    cascade = load_cascade(args.folder / "lbpcascade_animeface.xml")
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(args.folder / "web")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pictures = sorted(p for p in ILLUSTRATIONS.rglob("*") if p.is_file())
    agree, faces_py, faces_js, worst, times = 0, 0, 0, {"crop": 0, "code": 0.0, "recon": 0}, []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=120_000)
        for path in pictures:
            expected = face_tiles(cascade, *load_image(path, crop.max_pixels), crop)
            found = page_faces(page, path)
            faces_py += bool(expected)
            faces_js += bool(found["boxes"])
            same = len(found["boxes"]) == len(expected) and all(
                iou(a, e["box"]) >= 0.9 for a, e in zip(found["boxes"], expected))
            agree += same
            if not same:
                print(f"differs: {path.name}: page {found['boxes']}, pipeline {[e['box'] for e in expected]}")
            if same and expected:
                tiles, size = np.stack([e["tile"] for e in expected]), model.image_size
                worst["crop"] = max(worst["crop"], int(np.abs(rgb(found["crops"], size) - tiles).max()))
                worst["code"] = max(worst["code"], float(np.abs(np.array(found["codes"]) - model.encode(tiles)).max()))
                recon = np.abs(rgb(found["recons"], size) - model.reconstruct(tiles)).max()
                worst["recon"] = max(worst["recon"], int(recon))
                times.append(found["ms"])
        browser.close()
    server.shutdown()
    print(f"{len(pictures)} pictures: faces found in {faces_js} by the page, {faces_py} by pipeline.faces; the same "
          f"boxes in the same order (IoU >= 0.9) in {agree}")
    print(f"largest differences: crops {worst['crop']}/255, codes {worst['code']:.2e}, reconstructions "
          f"{worst['recon']}/255")
    print(f"page, choosing the file to reconstructions shown, pictures with faces: p50 {np.percentile(times, 50):.0f} "
          f"ms, p95 {np.percentile(times, 95):.0f} ms, max {max(times):.0f} ms (n={len(times)})")


if __name__ == "__main__":
    main()
