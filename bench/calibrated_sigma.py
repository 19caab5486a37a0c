"""The calibrated decoder's observation std (sigma-VAE, Rybkin et al. 2021) of trained runs.

    .venv/bin/python bench/calibrated_sigma.py RUN_OR_CKPT... [--test bench/out/data/test.npy]

For a Gaussian decoder with one shared std, the std that maximises the likelihood of the data is
the rms reconstruction error: sigma* = sqrt(mean (x - decoder(z))^2) over pixels, z drawn from the
encoder. A run trained with obs_std far from sigma* trained with an implicit beta of (obs_std / sigma*)^2;
one close to it is already what a learned obs_std would give. Printed for posterior samples and means.
"""
import argparse

import numpy as np
import torch

from pipeline.images import to_float
from pipeline.model import evaluating
from pipeline.runs import Run, find_checkpoint


def rms_errors(run: Run, test: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """rms reconstruction error of `test` with sampled codes and with mean codes."""
    generator = torch.Generator().manual_seed(seed)
    with evaluating(run.model):
        mu, logvar = run.model.encode(test)
        sampled = mu + torch.randn(mu.shape, generator=generator) * torch.exp(0.5 * logvar)
        return tuple((torch.sigmoid(run.model.decode(z)) - test).pow(2).mean().sqrt().item() for z in (sampled, mu))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="run folders or ckpt.pt files")
    parser.add_argument("--test", default="bench/out/data/test.npy")
    opts = parser.parse_args()
    test = to_float(torch.from_numpy(np.load(opts.test)))
    print("| run | obs_std | sigma* (sampled codes) | sigma* (mean codes) |\n| --- | --- | --- | --- |")
    for given in opts.runs:
        run = Run(find_checkpoint(None, ckpt=given), torch.device("cpu"))
        sampled, means = rms_errors(run, test)
        print(f"| {given} | {run.obs_std} | {sampled:.4f} | {means:.4f} |")


if __name__ == "__main__":
    main()
