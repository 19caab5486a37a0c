"""Helpers the test modules share (fixtures live in conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *overrides: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m <module> k=v ...` from the project root, as `make` does."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_args(data_dir, out_dir, *extra) -> list[str]:
    """A CPU-sized training config: a small model, small batches, frequent logs."""
    return [f"paths.data_dir={data_dir}", f"paths.output_dir={out_dir}", "device=cpu", "model.width=16",
            "model.decoder_width=16", "model.latent_dim=32", "train.batch_size=32", "train.warmup_steps=5",
            "train.log_every=5", "train.grid_n=16", "train.prior_components=4", *extra]


def upstream_face_count(folder: Path, cascade: Path) -> int:
    """Faces the plain upstream example finds: cv2.imread, grey, equalizeHist, detectMultiScale."""
    detector = cv2.CascadeClassifier(str(cascade))
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        img = cv2.imread(str(path))
        if img is not None:
            grey = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            total += len(detector.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)))
    return total


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
