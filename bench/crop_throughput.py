"""Crop throughput on the shared illustrations: the crop stage (all cores) vs a one-process loop.

    .venv/bin/python bench/crop_throughput.py

Both sides decode, detect (same parameters) and write 64x64 tiles; results go to stdout.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.crop import crop  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
ILLUSTRATIONS = SHARED / "data" / "illustrations"
CASCADE = SHARED / "cascade" / "lbpcascade_animeface.xml"


def baseline(files, out_dir):
    """The upstream example in a plain loop: cv2.imread, grey, equalizeHist, detect, crop, resize, write."""
    cascade = cv2.CascadeClassifier(str(CASCADE))
    faces = 0
    for i, path in enumerate(files):
        img = cv2.imread(str(path))
        if img is None:
            continue
        grey = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        for k, (x, y, w, h) in enumerate(cascade.detectMultiScale(grey, 1.1, 5, minSize=(24, 24))):
            tile = cv2.resize(img[y:y + h, x:x + w], (64, 64), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(out_dir / f"{i}_{k}.png"), tile)
            faces += 1
    return faces


def main():
    files = sorted(p for p in ILLUSTRATIONS.rglob("*") if p.is_file())
    cfg = OmegaConf.merge(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/crop/default.yaml"),
                          {"input_dir": str(ILLUSTRATIONS), "cascade": str(CASCADE)})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cv2.setNumThreads(1)  # the baseline is one process on one core, as the upstream script runs
        start = time.perf_counter()
        base_faces = baseline(files, tmp)
        base_s = time.perf_counter() - start

        cfg.output_dir, cfg.cascade_cache_dir = str(tmp / "faces"), str(tmp / "cascade")
        start = time.perf_counter()
        ours = crop(cfg)
        ours_s = time.perf_counter() - start
    print(f"images: {len(files)}, cores: {os.cpu_count()}")
    print(f"baseline one-process loop: {base_faces} faces, {base_s:.1f} s, {len(files) / base_s:.2f} img/s")
    print(f"pipeline.crop ({cfg.workers or os.cpu_count()} processes): {ours['faces']} faces, {ours_s:.1f} s, "
          f"{len(files) / ours_s:.2f} img/s, speed-up x{base_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
