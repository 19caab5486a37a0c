"""How far sampling alone can take a trained run: FID / KID of codes from several priors, against
the ceiling that no prior over the codes can beat by much, the decoder's reconstructions.

    .venv/bin/python bench/sampler_ceiling.py RUN [--n 2000] [--temperatures 1 0.8] [--gmm 25:full 400:diag]

Rows: `recon train` decodes the encoder means of n training faces (a prior that matched the aggregate
posterior's means exactly would draw these); `recon test` the same for the test faces (all of them
when n is larger); `stored` the run's prior.pt at each temperature; `gmm K:COV` a K-component
mixture with COV (full or diag) covariances fitted to the training codes here (not stored).
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
from sklearn.mixture import GaussianMixture


def fitted_gmm(codes: np.ndarray, components: int, covariance: str, seed: int) -> dict:
    gmm = GaussianMixture(components, covariance_type=covariance, reg_covar=1e-4, max_iter=200, random_state=seed)
    gmm.fit(codes)
    covariances = gmm.covariances_ if covariance == "full" else np.stack([np.diag(v) for v in gmm.covariances_])
    return {"weights": torch.tensor(gmm.weights_), "means": torch.tensor(gmm.means_),
            "cholesky": torch.linalg.cholesky(torch.tensor(covariances))}


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
    parser.add_argument("--gmm", nargs="*", default=[], help="K:full or K:diag mixtures to fit and score")
    parser.add_argument("--recon", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache", default="bench/out/fid_cache")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    run = Run(find_checkpoint(None, ckpt=opts.run), torch.device("cpu"))
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
    codes = run.encode(train).double().numpy() if opts.gmm else None
    for spec in opts.gmm:
        started = time.time()
        components, covariance = spec.split(":")
        prior = fitted_gmm(codes, int(components), covariance, opts.seed)
        z = sample_latents(prior, opts.n, run.model.latent_dim, torch.Generator().manual_seed(opts.seed))
        print(score(f"gmm {spec}", decode(z), extractor, real_test, real_sharpness, started), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
