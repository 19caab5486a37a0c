"""AdamW's fused kernel against its foreach kernel, on the default model's training step (this device).

    .venv/bin/python bench/optimizer_kernel.py [--rounds 3] [--steps 30] [--threads 2] [--profile]

The two kernels alternate for --rounds rounds on the same step (conf/model/default.yaml's model at
conf/train/default.yaml's batch size, channels-last, random faces): forward, the -ELBO, backward,
AdamW. --profile first prints the foreach step's torch.profiler table (where the time goes).
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.model import VAE, negative_elbo

CONF = Path(__file__).resolve().parents[1] / "conf"


def training_step(fused: bool):
    torch.manual_seed(0)
    model = VAE(**OmegaConf.to_container(OmegaConf.load(CONF / "model/default.yaml"))).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    batch = OmegaConf.load(CONF / "train/default.yaml").batch_size
    x = torch.rand(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def step():
        out, mu, logvar = model(x)
        loss = negative_elbo(x, out, mu, logvar)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, batch


def images_per_second(fused: bool, steps: int) -> float:
    step, batch = training_step(fused)
    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.profile:
        step, _ = training_step(fused=False)
        for _ in range(5):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    rates = {"foreach": [], "fused": []}
    for _ in range(opts.rounds):
        for kernel in rates:
            rates[kernel].append(images_per_second(kernel == "fused", opts.steps))
    print("| AdamW kernel | img/s per round | mean |\n| --- | --- | --- |")
    for kernel, values in rates.items():
        print(f"| {kernel} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.mean(values):.0f} |")


if __name__ == "__main__":
    main()
