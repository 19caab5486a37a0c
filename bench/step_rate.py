"""Images/s of training configurations side by side, and the fixed quality budget each one buys.

    .venv/bin/python bench/step_rate.py --rounds 2 "" "train.compile=true" "--nproc=2 train.batch_size=16"

Each side is a string of `pipeline.train` overrides ("" = the default), optionally starting with
--nproc=N: N processes under torchrun on this CPU, the threads split between them (train.batch_size is
per process, so "--nproc=2 train.batch_size=16" is a global batch of 32). The sides run one after
another, alternating for --rounds rounds, each for the same number of images (--images), with
--threads threads in all. A side's rate is the last metrics row's img/s (all processes), so start-up
and torch.compile's first steps are left out. The budget of bench/RESULTS.md's quality rows is what 12
minutes bought batch 64 with latent 128 and the foreach AdamW kernel (the defaults then) on the reference CPU, 4,320 steps: a side
gets 4,320 x 64 x (its img/s / that configuration's img/s) / its global batch size steps; that
configuration always runs as the reference side, whatever the defaults are now.
"""
import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "out" / "data"   # packed by bench/quality.py
BUDGET_STEPS, BUDGET_BATCH = 4320, 64
# the defaults that set the budget (the foreach AdamW kernel then: the fused one is a speed-up it buys steps with)
REFERENCE = [f"train.batch_size={BUDGET_BATCH}", "model.latent_dim=128", "train.fused_adam=false"]


def processes(side: list[str]) -> int:
    given = [o.split("=", 1)[1] for o in side if o.startswith("--nproc=")]
    return int(given[-1]) if given else 1


def global_batch(side: list[str]) -> int:
    given = [o.split("=", 1)[1] for o in side if o.startswith("train.batch_size=")]
    per_process = int(given[-1]) if given else OmegaConf.load(ROOT / "conf/train/default.yaml").batch_size
    return per_process * processes(side)


def images_per_second(side: list[str], images: int, threads: int) -> float:
    steps = images // global_batch(side)
    nproc = processes(side)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    overrides = [o for o in side if not o.startswith("--nproc=")]
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, *launcher, "-m", "pipeline.train", f"paths.data_dir={DATA}",
                        f"paths.output_dir={out}", f"train.max_steps={steps}", f"train.log_every={steps // 4}",
                        "train.prior_components=1", f"train.num_threads={max(1, threads // nproc)}", *overrides],
                       cwd=ROOT, check=True, capture_output=True)
        with open(next(Path(out).glob("train/*/*/metrics.csv"))) as f:
            rows = [r for r in csv.DictReader(f) if r["img_per_s"]]
    return float(rows[-1]["img_per_s"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("sides", nargs="+", help='override strings, e.g. "" "--nproc=2 train.batch_size=16"')
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=10240)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (split between --nproc processes)")
    opts = parser.parse_args()
    if not (DATA / "train.npy").exists():
        sys.exit(f"{DATA / 'train.npy'} not found: run bench/quality.py once (it packs the shared faces there)")
    sides = [s.split() for s in opts.sides]
    if REFERENCE not in sides:
        sides.insert(0, REFERENCE)   # the budget is relative to the reference's rate
    rates = {i: [] for i in range(len(sides))}
    for _ in range(opts.rounds):
        for i, side in enumerate(sides):
            rates[i].append(images_per_second(side, opts.images, opts.threads))
            print(f"{' '.join(side) or 'default'}: {rates[i][-1]:.0f} img/s", flush=True)
    reference_rate = statistics.mean(rates[sides.index(REFERENCE)])
    print("| side | img/s per round | mean | budget steps |\n| --- | --- | --- | --- |")
    for i, side in enumerate(sides):
        mean = statistics.mean(rates[i])
        steps = round(BUDGET_STEPS * BUDGET_BATCH * mean / reference_rate / global_batch(side))
        print(f"| `{' '.join(side) or 'default'}` | {', '.join(f'{r:.0f}' for r in rates[i])} | {mean:.0f} | {steps:,} |")


if __name__ == "__main__":
    main()
