"""How fast an export's web page draws faces in headless Chromium, on this machine, against the same decoder in
PyTorch in this process (the baseline: what `load(DIR).decode` costs for the same 64 codes).

    .venv/bin/python bench/web_speed.py EXPORT_FOLDER [--loads 5] [--grids 20] [--screenshot docs/web.jpg]

Serves EXPORT_FOLDER/web on 127.0.0.1 twice: as a plain static host (no cross-origin-isolation headers: WebAssembly
gets one thread) and with COOP/COEP headers (threads allowed). For each: --loads fresh page loads, timed from
navigation until the first grid of 64 faces is drawn, then --grids redraws of a 64-face grid (decode + paint).
Prints the folder's size too.
"""
import argparse
import functools
import http.server
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pipeline import load

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
    parser.add_argument("--screenshot")
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
        browser.close()


if __name__ == "__main__":
    main()
