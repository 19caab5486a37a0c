"""How fast the explorer answers, on a default-size model, against re-running `pipeline.sample` per grid.

    .venv/bin/python bench/explore_speed.py --ckpt outputs/train/obs_std-0.1/<run>/ckpt.pt \
        [--reps 50] [--screenshot docs/explore.jpg --upload some_illustration.jpg]

Measures, over HTTP on 127.0.0.1 with the server in its own process (as `make explore` runs it):
- baseline: `python -m pipeline.sample ckpt=... n=64` (loads the checkpoint for every grid);
- a 64-face grid sampled, decoded and served (POST /api/sample), p50 / p95 over --reps;
- a slider move: one steered face decoded and served (POST /api/steer), p50 / p95 over 2 x --reps;
- when the run offers hair colours: a grid of one colour (hair=) and a move of every named slider at once;
- page load in headless Chromium until the grid and the direction strip are shown, p50 / p95 over 10.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms (n={len(ms)})"


def baseline(ckpt: str, reps: int) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(reps):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.sample", f"ckpt={ckpt}", "n=64", f"seed={seed}",
                            f"out={tmp}/grid.png", f"hydra.run.dir={tmp}/log"], cwd=ROOT, check=True,
                           capture_output=True)
            times.append(time.perf_counter() - start)
    return times


def start_server(ckpt: str, extra: list[str]) -> tuple[subprocess.Popen, str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.explore", f"ckpt={ckpt}", "explore.port=0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("http://"):
            return proc, line.strip(), time.perf_counter() - start
    raise SystemExit("pipeline.explore printed no URL")


def timed_posts(url: str, path: str, bodies: list[dict]) -> list[float]:
    times = []
    with requests.Session() as session:
        session.post(url + path, json=bodies[0], timeout=60).raise_for_status()  # warm-up, not counted
        for body in bodies:
            start = time.perf_counter()
            session.post(url + path, json=body, timeout=60).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


def page_loads(url: str, reps: int, screenshot: str | None, upload: str | None) -> list[float] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if not chromium:
        print("page load: not measured (needs `apt-get install chromium` and `pip install playwright`)")
        return None
    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(reps):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            times.append(time.perf_counter() - start)
            if screenshot and len(times) == reps:
                show_off(page, screenshot, upload)
            page.close()
        browser.close()
    return times


def show_off(page, screenshot: str, upload: str | None) -> None:
    """The page as the README shows it: a face picked and steered, A / B walk, an uploaded picture."""
    page.click("#grid figure:nth-child(10) img")
    page.click("#set-a")
    page.eval_on_selector("#sliders input", "s => { s.value = 2; s.dispatchEvent(new Event('input')); }")
    page.wait_for_timeout(400)
    page.click("#set-b")
    page.wait_for_selector("#interp img")
    page.click("#nearest-button")
    page.wait_for_selector("#nearest img")
    page.click("#compare-button")
    page.wait_for_selector("#compare figure")
    if upload:
        page.set_input_files("#upload", upload)
        page.wait_for_selector(".upload-face")
    quality = {"quality": 85} if screenshot.endswith((".jpg", ".jpeg")) else {}
    page.screenshot(path=screenshot, full_page=True, **quality)
    print(f"screenshot -> {screenshot}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--baseline-reps", type=int, default=5)
    parser.add_argument("--screenshot")
    parser.add_argument("--upload", help="an illustration to upload for the screenshot")
    parser.add_argument("server_args", nargs="*", help="extra k=v overrides for pipeline.explore")
    opts = parser.parse_args()
    reloads = baseline(opts.ckpt, opts.baseline_reps)
    print(f"baseline, `pipeline.sample n=64` per grid: {percentiles(reloads)}")
    proc, url, startup = start_server(opts.ckpt, opts.server_args)
    try:
        print(f"explorer started and serving in {startup:.1f} s")
        grid = timed_posts(url, "api/sample", [{"seed": s, "n": 64} for s in range(opts.reps)])
        print(f"grid of 64 (POST /api/sample): {percentiles(grid)}")
        colours = requests.get(url + "api/runs", timeout=60).json()["runs"][0].get("hair", [])
        if colours:
            bodies = [{"seed": s, "n": 64, "hair": colours[s % len(colours)]} for s in range(opts.reps)]
            print(f"grid of 64 of one hair colour (POST /api/sample, hair=): "
                  f"{percentiles(timed_posts(url, 'api/sample', bodies))}")
        z = requests.post(url + "api/sample", json={"seed": 0, "n": 1}, timeout=60).json()["codes"][0]
        rng = np.random.default_rng(0)
        moves = [{"z": z, "offsets": rng.uniform(-3, 3, 8).round(2).tolist()} for _ in range(2 * opts.reps)]
        print(f"slider move (POST /api/steer): {percentiles(timed_posts(url, 'api/steer', moves))}")
        if colours:
            moves = [{"z": z, "offsets": [], "named": {c: round(float(rng.uniform(-2, 2)), 2) for c in colours}}
                     for _ in range(2 * opts.reps)]
            print(f"named slider move, every colour at once (POST /api/steer, named=): "
                  f"{percentiles(timed_posts(url, 'api/steer', moves))}")
        loads = page_loads(url, 10, opts.screenshot, opts.upload)
        if loads:
            print(f"page load to a shown grid and strip (headless Chromium): {percentiles(loads)}")
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"mean grid time, baseline / explorer: x{statistics.mean(reloads) / statistics.mean(grid):.0f}")


if __name__ == "__main__":
    main()
