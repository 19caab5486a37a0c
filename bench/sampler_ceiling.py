"""How far sampling alone can take a trained run: FID / KID of codes from several priors, against
the ceiling that no prior over the codes can beat by much, the decoder's reconstructions.

    .venv/bin/python bench/sampler_ceiling.py RUN [--n 2000] [--temperatures 1 0.8] [--decoder elbo]

Rows: `recon train` decodes the encoder means of n training faces (a prior that matched the aggregate
posterior's means exactly would draw these); `recon test` the same for the test faces (all of them
when n is larger); `stored` the run's prior.pt at each temperature.
All are scored against the test split with the same Inception features as `make eval`.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluate import cached_features
from pipeline.images import to_uint8
from pipeline.metrics import InceptionFeatures, features, fid_kid, sharpness
from pipeline.prior import load_prior, sample_latents
from pipeline.runs import Run, find_checkpoint


def score(name, images_uint8: np.ndarray, extractor, real_test, real_sharpness, started) -> str:
    fake = features(extractor, images_uint8, 100)
    result = fid_kid(real_test, fake)
    return (f"| {name} | {len(images_uint8)} | {result['fid']:.1f} | {1e3 * result['kid']:.1f} | "
            f"{sharpness(images_uint8) / real_sharpness:.2f} | {time.time() - started:.0f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", help="run folder or ckpt.pt")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--temperatures", type=float, nargs="*", default=[1.0])
    parser.add_argument("--recon", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache", default="bench/out/fid_cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoder", default="auto", help="auto (the sharp decoder when the run has one), sharp, elbo")
    opts = parser.parse_args()
    run = Run(find_checkpoint(None, ckpt=opts.run), torch.device("cpu"), decoder=opts.decoder)
    train, test = run.split("train"), run.split("test")
    extractor = InceptionFeatures(run.device)
    real_test = cached_features(extractor, test, Path(opts.cache), 100)
    real_sharpness = sharpness(test)
    rng = np.random.default_rng(opts.seed)
    decode = lambda z: to_uint8(run.decode(z)).numpy()  # noqa: E731
    print("| codes from | n | FID test | KID x1e3 | sharpness | seconds |\n| --- | --- | --- | --- | --- | --- |")
    if opts.recon:
        pick = np.sort(rng.choice(len(train), min(opts.n, len(train)), replace=False))
        for name, faces in (("recon train", train[pick]), ("recon test", test)):
            started = time.time()
            print(score(name, decode(run.encode(faces)), extractor, real_test, real_sharpness, started), flush=True)
    stored = load_prior(run.ckpt_path.parent)
    for temperature in opts.temperatures:
        started = time.time()
        z = sample_latents(stored, opts.n, run.model.latent_dim, torch.Generator().manual_seed(opts.seed), temperature)
        print(score(f"stored ({stored['components'] if stored else 'N(0, I)'}) T={temperature:g}", decode(z),
                    extractor, real_test, real_sharpness, started), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
