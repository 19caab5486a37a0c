"""Helpers the test modules share (fixtures live in conftest.py)."""
import contextlib
import io
import logging
import os
import runpy
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from hydra.core.global_hydra import GlobalHydra

from pipeline import errors
from tests import realdata

ROOT = Path(__file__).resolve().parents[1]
# any valid OpenCV cascade: the export copies the detector it is given (the real one is in ../shared only)
CASCADE = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
NO_BROWSER = ("needs headless Chromium driven by Playwright: `apt-get install chromium` (Debian's package) and "
              "`pip install playwright` (`make test` installs playwright; .ci/run installs chromium)")


def run_process(module: str, *overrides: str, check: bool = True, timeout: int = 900,
                preexec_fn=None) -> subprocess.CompletedProcess:
    """Run `python -m <module> k=v ...` in a new process from the project root, as `make` does: for what only
    a process shows (its exit status and everything it prints, warnings included; signals; several at once;
    limits of its own, set by `preexec_fn`)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    return checked_run(module, proc, check)


def run_module(module: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m <module> k=v ...` run inside the test process (as runpy runs `-m`), from the project root:
    the same entry point, Hydra composition, output and exit status, without the ~5 s a new Python process
    spends importing torch."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with like_a_new_process([module, *overrides]), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    proc = subprocess.CompletedProcess([module, *overrides], code, out.getvalue(), err.getvalue())
    return checked_run(module, proc, check)


@contextlib.contextmanager
def like_a_new_process(argv: list[str]):
    """What a command would start from in a process of its own: `argv`, the project root as working folder,
    its own run id, HYDRA_FULL_ERROR=0; afterwards the argv, folder, environment, root logger (Hydra adds its
    console and log-file handlers) and signal handlers (a training installs SIGINT / SIGTERM ones) are put
    back, and Hydra is ready for the next command."""
    saved_argv, cwd, env = sys.argv, os.getcwd(), dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    log_handlers, log_level = list(root.handlers), root.level
    sys.argv = argv
    errors.RUN_ID = secrets.token_hex(3)
    os.environ["HYDRA_FULL_ERROR"] = "0"
    os.chdir(ROOT)
    try:
        with warnings.catch_warnings():  # runpy's note that the test process imported the module already
            warnings.filterwarnings("ignore", "'pipeline.* found in sys.modules", RuntimeWarning)
            yield
    finally:
        for handler in set(root.handlers) - set(log_handlers):  # Hydra's log file and console of that command
            handler.close()
        root.handlers[:] = log_handlers
        root.setLevel(log_level)
        sys.argv = saved_argv
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        GlobalHydra.instance().clear()


def checked_run(module: str, proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def export(runs, *args, check=True, web_cache=None) -> subprocess.CompletedProcess:
    """`python -m pipeline.export` of a run under `runs`, with a stand-in cascade; with the web page only when
    `web_cache` (the folder ONNX Runtime Web is cached in) is given."""
    web = f"web.cache_dir={web_cache}" if web_cache else "web.enabled=false"
    return run_module("pipeline.export", f"paths.output_dir={runs}", f"crop.cascade={CASCADE}", web, *args,
                      check=check)


def train_args(data_dir, out_dir, *extra, sharp_steps=0) -> list[str]:
    """A CPU-sized training config: a small model, small batches, frequent logs; the sharp decoder's phase
    only when `sharp_steps` are asked for."""
    return [f"paths.data_dir={data_dir}", f"paths.output_dir={out_dir}", "device=cpu", "model.width=16",
            "model.decoder_width=16", "model.latent_dim=32", "train.batch_size=32", "train.warmup_steps=5",
            "train.log_every=5", "train.grid_n=16", "train.prior_components=4", f"sharp.max_steps={sharp_steps}",
            "sharp.disc_width=8", *extra]


def upstream_face_counts(folder: Path, cascade: Path) -> dict[Path, int]:
    """Faces the plain upstream example finds in each file: cv2.imread, grey, equalizeHist, detectMultiScale."""
    detector = cv2.CascadeClassifier(str(cascade))
    counts = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        img = cv2.imread(str(path))
        if img is not None:
            grey = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            counts[path] = len(detector.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)))
    return counts


def synthetic_faces(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """uint8 n x 3 x size x size cartoon 'faces' (a skin ellipse, two eyes, hair on a plain background):
    no real data needed, and structured enough that a VAE's ELBO improves quickly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.ones((size, size, 3)) * rng.uniform(0.3, 1.0, 3)
        cx, cy, rx, ry = rng.uniform(0.4, 0.6), rng.uniform(0.45, 0.6), rng.uniform(0.22, 0.3), rng.uniform(0.25, 0.35)
        img[((xx - cx) / rx) ** 2 + ((yy - cy + 0.12) / ry) ** 2 < 1] = rng.uniform(0, 1, 3)  # hair
        img[((xx - cx) / (rx * 0.8)) ** 2 + ((yy - cy) / (ry * 0.8)) ** 2 < 1] = (1.0, 0.85, 0.75)  # skin
        eye = rng.uniform(0, 1, 3)
        for side in (-1, 1):
            img[((xx - cx - side * rx * 0.35) / 0.05) ** 2 + ((yy - cy) / 0.07) ** 2 < 1] = eye
        out[i] = (img * 255).round()
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def hair_faces(n: int, colours: list[tuple[int, int, int]], seed: int = 0, size: int = 64) -> np.ndarray:
    """uint8 n x 3 x size x size faces on white whose hair (bangs and side locks, where the crop stage's tiles
    have them) is one of `colours`, in turn, with some shading: for tests of the hair colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        img = np.ones((size, size, 3))
        hair = (((yy < 0.3) | (xx < 0.2) | (xx > 0.8)) & (yy < 0.75))[..., None]
        shade = 1 + 0.12 * rng.standard_normal((size, size, 1))
        img = np.where(hair, np.clip(np.array(colours[i % len(colours)]) / 255 * shade, 0, 1), img)
        cx, cy = rng.uniform(0.45, 0.55), rng.uniform(0.55, 0.65)
        img[((xx - cx) / 0.28) ** 2 + ((yy - cy) / 0.3) ** 2 < 1] = (1.0, 0.87, 0.78)  # skin
        for side in (-1, 1):
            img[((xx - cx - side * 0.12) / 0.05) ** 2 + ((yy - cy) / 0.07) ** 2 < 1] = rng.uniform(0, 0.6, 3)
        out[i] = img
    return np.ascontiguousarray((out * 255).round().astype(np.uint8).transpose(0, 3, 1, 2))


def local_cascade() -> str:
    """The real cascade when the test data has it; else OpenCV's own frontal-face cascade, which finds no
    anime face but lets the upload checks run everywhere."""
    try:
        return str(realdata.root_for("cascade") / "cascade" / "lbpcascade_animeface.xml")
    except pytest.skip.Exception:
        return cv2.data.haarcascades + "haarcascade_frontalface_default.xml"


def start_explorer(out, *args, cascade=None) -> tuple[subprocess.Popen, str, str]:
    """`python -m pipeline.explore` on a free port: the process, the URL it printed last, its log until then."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.explore", f"paths.output_dir={out}", "device=cpu",
                             "explore.port=0", f"crop.cascade={cascade or local_cascade()}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(300, proc.kill)
    timer.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("http://"):
            timer.cancel()
            return proc, line.strip(), "".join(lines)
    timer.cancel()
    raise AssertionError(f"pipeline.explore printed no URL:\n{''.join(lines)}\n{proc.stderr.read()[-3000:]}")


def post(url, path, **body):
    return requests.post(url + "api/" + path, json=body, timeout=120)
