"""The sharp decoder's levers on one trained VAE: each row resumes a copy of the same finished VAE run with
its sharp.* settings (the phase `make train` runs after the VAE's epochs), then scores it.

    .venv/bin/python bench/sharp.py --base RUN_FOLDER --tag NAME [--n 1000] [sharp.KEY=VALUE ...]
    .venv/bin/python bench/sharp.py --base RUN_FOLDER --tag elbo --elbo     # the ELBO decoder's row, same settings
    .venv/bin/python bench/sharp.py --base RUN_FOLDER --tag joint --new sharp.joint_from=13104 sharp.epochs=7

--new trains a whole run (the VAE with --base's data and seed, and the sharp decoder) instead: the joint design
(sharp.joint_from) needs the VAE's own steps; its VAE is --base's bit for bit when --base had the same settings.

RUN_FOLDER is a run trained with sharp.epochs=0 (or before the sharp decoder existed), e.g. by
`python -m pipeline.train paths.data_dir=bench/out/data paths.output_dir=bench/out/base sharp.epochs=0`.
Each row: the phase's wall-clock and steps/s, then `pipeline.evaluate` with the default prior: FID / KID
against the test split and against bench/out/outsource_faces (out of source, when it is there),
sharpness, memorisation and the share of near-copies.
"""
import argparse
import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def run(*args) -> str:
    print("$", " ".join(map(str, args)), flush=True)
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def copy_vae_run(base: Path, dest: Path) -> Path:
    """The finished VAE run's files (not its grids) in a folder of this row's own."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("ckpt.pt", "config.yaml", "prior.pt", "metrics.csv", "train.log"):
        if (base / name).exists():
            shutil.copy2(base / name, dest / name)
    return dest


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True, help="a finished VAE run folder (no sharp decoder)")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--n", type=int, default=1000, help="samples scored (FID is biased upwards below 2,000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--elbo", action="store_true", help="score the ELBO decoder of --base instead")
    parser.add_argument("--new", action="store_true", help="train a new run with --base's data instead of resuming")
    parser.add_argument("args", nargs="*", help="sharp.* overrides for the phase, e.g. sharp.epochs=8")
    opts = parser.parse_args()
    run_dir = OUT / "sharp" / opts.tag
    if opts.new:
        shutil.rmtree(run_dir, ignore_errors=True)
        data_dir = OmegaConf.load(opts.base / "config.yaml").paths.data_dir
        how = [f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]
    else:
        how = [f"resume={copy_vae_run(opts.base, run_dir)}"]
    if not opts.elbo:
        start = time.perf_counter()
        log = run("-m", "pipeline.train", *how, f"train.num_threads={opts.threads}", *opts.args)
        minutes = (time.perf_counter() - start) / 60
        rates = sorted(float(r["img_per_s"]) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r["sharp_rec_l1"])
        print(re.findall(r"phases: .*", log)[-1])
        print(f"sharp phase: {minutes:.1f} min of wall-clock (process), median {rates[len(rates) // 2]:.0f} "
              "img/s over its log rows" if rates else f"sharp phase: {minutes:.1f} min")
    reference = OUT / "outsource_faces"
    print(run("-m", "pipeline.evaluate", f"paths.output_dir={OUT}", f"ckpt={run_dir}", "priors=[default]",
              f"decoders=[{'elbo' if opts.elbo else 'sharp'}]", f"n={opts.n}",
              *([f"reference={reference}"] if reference.is_dir() else [])))


if __name__ == "__main__":
    main()
