"""Training images/s alone and beside a competing CPU-bound process, for each way of using the CPU's threads.

    .venv/bin/python bench/cpu_sharing.py [--images 2400] [--rounds 2] [--competitor inception|train|none]
    .venv/bin/python bench/cpu_sharing.py --overhead    # FreeCores.update()'s cost alone, in one process

A side is a training of the default model (bench/out/data, packed by bench/quality.py) for --images
images; its rate is the last metrics row's img/s (the last quarter), so start-up is left out. Each side
runs alone, then beside the competitor, sides alternating, for --rounds rounds:

  all cores        one thread per core for the whole run (train.num_threads=cores): the pipeline before
  all cores, passive  the same with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep at once, not spin)
  1 thread         train.num_threads=1
  free cores       train.num_threads=null: the threads follow the cores other processes leave free
                   (pipeline/cpu.py), the default now

The competitor starts before each training and is killed after it:
  inception  the FID Inception network on random 64 px batches with torch's default threads, as another
             program or `make eval` would run beside a training
  train      a second training of the same side (the test suite and CI run trainings side by side)
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "out" / "data"
INCEPTION = ("import torch; from pipeline.metrics import InceptionFeatures; net = InceptionFeatures('cpu'); "
             "x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)\nwhile True: net(x)")
CORES = len(os.sched_getaffinity(0))
SIDES = {
    "all cores": ({}, [f"train.num_threads={CORES}"]),
    "all cores, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, [f"train.num_threads={CORES}"]),
    "1 thread": ({}, ["train.num_threads=1"]),
    "free cores": ({}, []),
}


def environment(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return {**env, **extra}


def training(side: str, images: int, out: str, log=subprocess.PIPE) -> subprocess.Popen:
    env, overrides = SIDES[side]
    steps = images // 32
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", f"paths.data_dir={DATA}", f"paths.output_dir={out}",
                             f"train.max_steps={steps}", f"train.log_every={steps // 4}", "train.prior_components=1",
                             "device=cpu", *overrides], cwd=ROOT, env=environment(env),
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def competitor(kind: str, side: str, images: int, out: str) -> subprocess.Popen | None:
    if kind == "inception":
        proc = subprocess.Popen([sys.executable, "-c", INCEPTION], cwd=ROOT, env=environment({}))
        time.sleep(8)  # past its start-up: the training meets it running
        return proc
    return training(side, images * 100, out, log=subprocess.DEVNULL)  # runs on until killed


def rate(side: str, images: int, beside: str | None) -> float:
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as other:
        rival = competitor(beside, side, images, other) if beside else None
        try:
            proc = training(side, images, out)
            log, _ = proc.communicate()
            if proc.returncode:
                sys.exit(f"{side} failed:\n{log[-3000:]}")
            changes = [line.split(" - ", 1)[1] for line in log.splitlines() if "CPU threads:" in line]
            if changes:
                print(f"  {side}: {'; '.join(changes)}", flush=True)
        finally:
            if rival:
                rival.kill()
                rival.wait()
        with open(next(Path(out).glob("train/*/*/metrics.csv"))) as f:
            rows = [r for r in csv.DictReader(f) if r["img_per_s"]]
    return float(rows[-1]["img_per_s"])


def update_overhead(blocks: int, steps: int) -> None:
    """The default model's training step (bf16 where the CPU has it, as train.amp=auto) in one process, blocks
    of `steps` steps alternating with and without FreeCores.update() after each step: what following the
    load costs when nothing else runs, free of the noise between processes."""
    import torch
    from omegaconf import OmegaConf
    from pipeline.cpu import FreeCores, allowed_cores
    from pipeline.model import VAE, negative_elbo
    from pipeline.train import cpu_has_native_bf16
    model = VAE(**OmegaConf.load(ROOT / "conf/model/default.yaml")).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.rand(32, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    free, times = FreeCores(len(allowed_cores())), {True: [], False: []}
    for block in range(2 * blocks + 1):
        following = block % 2 == 1
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
                out, mu, logvar = model(x)
            loss = negative_elbo(x, out, mu, logvar)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if following:
                free.update()
        if block:  # the first block warms up
            times[following].append(steps * 32 / (time.perf_counter() - start))
    for following in (False, True):
        print(f"{'with' if following else 'without'} FreeCores.update(): median {statistics.median(times[following]):.0f} "
              f"img/s over {blocks} blocks of {steps} steps ({', '.join(f'{r:.0f}' for r in times[following])}); "
              f"threads at the end: {free.threads}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--competitor", choices=("inception", "train", "none"), default="inception",
                        help="none: the sides alone only (more rounds for the same time)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--overhead", action="store_true", help="only the in-process A/B of FreeCores.update()")
    opts = parser.parse_args()
    if opts.overhead:
        return update_overhead(blocks=8, steps=25)
    if not (DATA / "train.npy").exists():
        sys.exit(f"{DATA / 'train.npy'} not found: run bench/quality.py once (it packs the shared faces there)")
    places = [("alone", None)] + ([("beside", opts.competitor)] if opts.competitor != "none" else [])
    rates = {(side, where): [] for side in opts.sides for where, _ in places}
    for _ in range(opts.rounds):
        for side in opts.sides:
            for where, beside in places:
                rates[side, where].append(rate(side, opts.images, beside))
                print(f"{side}, {where}: {rates[side, where][-1]:.0f} img/s", flush=True)
    print(f"\n| side | {' | '.join(f'{w} img/s' for w, _ in places)} |\n|{' --- |' * (len(places) + 1)}")
    for side in opts.sides:
        cells = [f"{statistics.mean(rates[side, w]):.0f} ({', '.join(f'{r:.0f}' for r in rates[side, w])})"
                 for w, _ in places]
        print(f"| {side} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
