"""Sampling by hair colour and named sliders, measured on one trained run (issue 26).

    .venv/bin/python bench/hair.py --run RUN_FOLDER [--n 500] [--fid-n 250] [--real-n 500] [--out bench/out/hair]
    .venv/bin/python bench/hair.py --run RUN_FOLDER --cost      # only the seconds, run it alone
    .venv/bin/python bench/hair.py --run RUN_FOLDER --components 4 --colours black blonde --out bench/out/hair_k4

For each colour the run offers: the share of n `hair=<colour>` samples the labeller calls that colour,
beside its share among n unconditioned samples (the stored prior) and among the training faces; the same
share for the lever that lost (the stored mixture's weights re-estimated from the colour's codes, no own
Gaussian); FID / KID of fid-n conditioned samples against up to real-n training faces of that colour, beside
fid-n unconditioned samples against the same faces (conditioning must not be bought with broken faces); and
near-copies (samples closer to a training face than 99% of test faces are). Then a slider made from 8
examples: 4 black-haired and 4 blonde training faces make "dark"; 20 unconditioned samples the labeller does
not call black, moved by +1.5: the labeller's verdict before and after. Decoder: the run's default.
--cost: seconds of what training adds at its end (labeller + fit on the training split) and per 64-face grid.
--components K: the lever of a K-component mixture per colour (pipeline.prior.fit_gmm) instead of one Gaussian.
"""
import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from pipeline.attributes import conditioned, fit_hair, make_slider
from pipeline.hair import label_hair
from pipeline.images import to_float, to_uint8
from pipeline.metrics import InceptionFeatures, features, fid_kid, nearest
from pipeline.prior import fit_gmm, sample_latents
from pipeline.runs import Run


def reweighted(prior: dict, codes: torch.Tensor) -> dict:
    """The lever that lost: the stored mixture with weights = the mean responsibility of the colour's codes."""
    log_p = []
    for mean, chol in zip(prior["means"], prior["cholesky"]):
        solved = torch.linalg.solve_triangular(chol, (codes.double() - mean).T, upper=False)
        log_p.append(-0.5 * solved.square().sum(0) - chol.diagonal().log().sum())
    weights = torch.softmax(prior["weights"].log() + torch.stack(log_p, 1), 1).mean(0)
    return {**prior, "weights": weights / weights.sum()}


def draw(run: Run, distribution, n: int, seed: int) -> np.ndarray:
    z = sample_latents(distribution, n, run.model.latent_dim, torch.Generator().manual_seed(seed))
    return to_uint8(run.decode(z)).numpy()


def cost(run: Run, train: np.ndarray) -> dict:
    start = time.perf_counter()
    codes = run.encode(train)
    encoded = time.perf_counter()
    hair = fit_hair(codes, label_hair(train), run.encoder_step)
    fitted = time.perf_counter()
    colour = next(iter(hair["colours"]))
    draw(run, conditioned(hair, colour), 64, 0)
    return {"encode_s (training does it for the prior anyway)": encoded - start,
            "label_and_fit_s (what training adds)": fitted - encoded, "grid_64_s": time.perf_counter() - fitted}


def slider_check(run: Run, train, labels, codes, unconditioned: np.ndarray, prior) -> dict:
    rng = np.random.default_rng(0)
    has = rng.choice(np.flatnonzero(labels == "black"), 4, replace=False)
    lacks = rng.choice(np.flatnonzero(labels == "blonde"), 4, replace=False)
    slider = make_slider("dark", codes[torch.as_tensor(has)], codes[torch.as_tensor(lacks)], taken=())
    z = sample_latents(prior, 200, run.model.latent_dim, torch.Generator().manual_seed(7))
    faces = to_uint8(run.decode(z)).numpy()
    pick = np.flatnonzero(label_hair(faces) != "black")[:20]
    moved = to_uint8(run.decode(z[torch.as_tensor(pick)] + 1.5 * slider["direction"])).numpy()
    before, after = label_hair(faces[pick]), label_hair(moved)
    return {"faces": len(pick), "before": dict(collections.Counter(before)), "after": dict(collections.Counter(after)),
            "black_after": int(np.sum(after == "black")), "darker_after": int(np.sum(np.isin(after, ["black", "brown"])))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--fid-n", type=int, default=250)
    parser.add_argument("--real-n", type=int, default=500)
    parser.add_argument("--out", default="bench/out/hair")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--components", type=int, default=1)
    parser.add_argument("--colours", nargs="*")
    opts = parser.parse_args()
    torch.set_num_threads(2)
    run = Run(Path(opts.run) / "ckpt.pt", torch.device("cpu"))
    train, test = run.split("train"), run.split("test")
    if opts.cost:
        print(json.dumps(cost(run, train), indent=1))
        return
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    codes, labels = run.encode(train), label_hair(train)
    hair = fit_hair(codes, labels, run.encoder_step)
    prior, _ = run.prior("default", 100, 0)
    unconditioned = draw(run, prior, opts.n, 1)
    uncond_labels = label_hair(unconditioned)
    extractor = InceptionFeatures("cpu")
    uncond_feats = features(extractor, unconditioned[:opts.fid_n], 50)
    _, test_to_train = nearest(test[:1000], train)
    near = np.percentile(test_to_train, 1)
    rows = {}
    for colour, own in hair["colours"].items():
        if opts.colours and colour not in opts.colours:
            continue
        own_codes = codes[torch.as_tensor(np.flatnonzero(labels == colour))].double().numpy()
        distribution = (conditioned(hair, colour) if opts.components == 1 else
                        {"components": opts.components, **fit_gmm(own_codes, opts.components, 0)})
        samples = draw(run, distribution, opts.n, 2)
        save_image(to_float(samples[:64]), out / f"hair_{colour}.png", nrow=8)
        real = train[np.flatnonzero(labels == colour)[:opts.real_n]]
        real_feats = features(extractor, real, 50)
        lost = draw(run, reweighted(prior, codes[torch.as_tensor(np.flatnonzero(labels == colour)[:500])]), opts.n, 2)
        _, dist = nearest(samples[:500], train)
        rows[colour] = {
            "train_faces": own["faces"], "share_train": float(np.mean(labels == colour)),
            "share_unconditioned": float(np.mean(uncond_labels == colour)),
            "share_conditioned": float(np.mean(label_hair(samples) == colour)),
            "share_reweighted_mixture": float(np.mean(label_hair(lost) == colour)),
            "fid_kid_conditioned": fid_kid(real_feats, features(extractor, samples[:opts.fid_n], 50)),
            "fid_kid_unconditioned": fid_kid(real_feats, uncond_feats), "real_n": len(real),
            "near_copies": float(np.mean(dist < near))}
        print(colour, json.dumps(rows[colour]), flush=True)
    results = {"run": str(opts.run), "n": opts.n, "fid_n": opts.fid_n, "components": opts.components, "colours": rows,
               "slider": slider_check(run, train, labels, codes, unconditioned, prior)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["slider"]))


if __name__ == "__main__":
    main()
