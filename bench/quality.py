"""Quality at a fixed budget: train the default config for --minutes of wall-clock, then `make eval`.

    .venv/bin/python bench/quality.py --minutes 12 [ARGS...]
    .venv/bin/python bench/quality.py --steps 4320 [ARGS...]     # a budget in optimizer steps instead

1. packs the shared Getchu faces (../shared/data/faces/getchu-2000-2009) into bench/out/data,
2. times 60 training steps to learn this machine's steps/s, and sets train.max_steps so that the
   learning-rate schedule ends when the budget does,
3. runs `python -m pipeline.train` with that budget (extra ARGS are passed on, e.g. obs_std=0.05),
4. runs `python -m pipeline.evaluate` on the result (the priors of --priors) and prints its table.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces" / "getchu-2000-2009"
OUT = ROOT / "bench" / "out"


def run(*args) -> str:
    print("$", " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def calibrated_steps(common: list[str], opts) -> int:
    """Steps that --minutes buys on this machine: 60 steps timed, at the run's batch size."""
    log = run("-m", "pipeline.train", *common, f"paths.output_dir={OUT}/calibrate", "train.max_steps=60",
              "train.log_every=60", "train.prior_components=1")
    img_s = float(re.search(r"done: .*?, ([\d.]+) img/s", log)[1])
    default_batch = OmegaConf.load(ROOT / "conf/train/default.yaml").batch_size
    batch = int(next((a.split("=")[1] for a in opts.args if a.startswith("train.batch_size=")), default_batch))
    print(f"calibrated {img_s:.0f} img/s at batch {batch}")
    return int(img_s * opts.minutes * 60 / batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=12)
    parser.add_argument("--steps", type=int, help="train this many steps (no calibration against the clock)")
    parser.add_argument("--threads", type=int, help="train.num_threads (e.g. 1 each for two runs side by side)")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--priors", default="normal,default", help="priors `make eval` scores")
    parser.add_argument("args", nargs="*", help="extra k=v overrides for pipeline.train")
    opts = parser.parse_args()
    data = OUT / "data"
    if not (data / "train.npy").exists():
        run("-m", "pipeline.pack", f"pack.faces_dir={FACES}", f"paths.data_dir={data}", f"paths.output_dir={OUT}")
    common = [f"paths.data_dir={data}", *opts.args, *([f"train.num_threads={opts.threads}"] if opts.threads else [])]
    steps = opts.steps or calibrated_steps(common, opts)
    out_dir = OUT / opts.tag
    start = time.perf_counter()
    log = run("-m", "pipeline.train", *common, f"paths.output_dir={out_dir}", f"train.max_steps={steps}")
    minutes = (time.perf_counter() - start) / 60
    print(re.findall(r"done: .*", log)[-1])
    print(f"{steps} steps; training took {minutes:.1f} min of wall-clock")
    ckpt = next(out_dir.rglob("ckpt.pt"))
    print(run("-m", "pipeline.evaluate", f"paths.output_dir={OUT}", f"ckpt={ckpt}", f"priors=[{opts.priors}]"))


if __name__ == "__main__":
    main()
