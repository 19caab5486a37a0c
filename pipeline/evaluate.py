"""Stage 6: honest quality numbers for a trained run (`make eval`).

    python -m pipeline.evaluate +obs_std=0.1            # newest obs_std=0.1 run
    python -m pipeline.evaluate report=true             # table of every evaluated run

For each decoder the run has (the exact-ELBO one, and the sharp one when it was trained) and each prior:
FID and KID of n samples against the test split (and the same for real training faces: the floor),
sharpness of samples relative to real faces, and a memorisation check (distance of samples to their
nearest training face vs the same for test faces, and the share of near-copies: samples closer to a
training face than 99% of test faces are). Also the test ELBO (the VAE's: the ELBO decoder's).
With reference=FOLDER, FID and KID also against a second, out-of-source set of real faces (e.g.
`pipeline.crop`'s tiles of other pictures), so a gain that only fits the test split shows.
Writes metrics.json ("priors": the ELBO decoder's rows, "sharp_priors": the sharp decoder's) and
nearest_<prior>[_sharp].png beside the checkpoint and prints a table.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image
from tqdm import tqdm

from pipeline.config import Paths, checked, key
from pipeline.errors import ConfigError, DataError, PipelineError, exit_on_error
from pipeline.images import find_images, load_rgb, to_float, to_uint8
from pipeline.io import after_write_error, atomic_write, atomic_write_bytes, optional_write
from pipeline.metrics import InceptionFeatures, features, fid_kid, nearest, sharpness
from pipeline.model import evaluate_elbo
from pipeline.prior import sample_latents
from pipeline.runs import load_split, open_run
from pipeline.stored import save_stored

log = logging.getLogger(__name__)

# FID is biased upwards, more so the fewer the samples; below this (the size bench/RESULTS.md uses) it is
# not comparable with anything
FID_MIN_SAMPLES = 2000
REFERENCE_MAX_PIXELS = 64_000_000  # as crop.max_pixels: larger pictures are not face tiles


@dataclass
class EvaluateJob:
    """conf/evaluate.yaml's keys, their types and ranges (obs_std is appended with +obs_std=...)."""
    paths: Paths = key(default=Paths)
    ckpt: str | None = key()
    n: Any = key()  # auto or a whole number >= 2 (checked by sample_count)
    priors: list[str] = key(low=1)
    decoders: list[str] = key(low=1)
    gmm_components: int = key(low=1)
    seed: int = key(low=0)
    batch_size: int = key(low=1)
    nearest_n: int = key(low=1)
    sheet_n: int = key(low=0)
    device: str = key()
    report: bool = key()
    reference: str | None = key()
    obs_std: float | None = key(low=1e-6, default=None)


def sample_count(n, device) -> int:
    """n=auto: 10,000 on a GPU, 2,000 on a CPU; warns when n is too small for a meaningful FID."""
    if str(n) == "auto":
        return 10000 if device.type == "cuda" else 2000
    if isinstance(n, bool) or not str(n).isdigit() or int(n) < 2:
        raise ConfigError(f"n={n!r}: use auto or a whole number of samples >= 2 (2,000 or more for a usable FID)")
    if int(n) < FID_MIN_SAMPLES:
        log.warning("n=%s: an FID from fewer than %d samples is biased upwards and not comparable with published "
                    "ones (use n=2000 or more; KID is less biased)", n, FID_MIN_SAMPLES)
    return int(n)


def cached_features(extractor, images_uint8: np.ndarray, cache_dir: Path, batch_size: int) -> torch.Tensor:
    """Inception features of a real image set, computed once per content."""
    key = hashlib.sha1(np.ascontiguousarray(images_uint8).tobytes()).hexdigest()[:16]
    path = cache_dir / f"inception_{key}_{len(images_uint8)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    with tqdm(total=len(images_uint8), desc="inception (real)", unit="img") as progress:
        feats = features(extractor, images_uint8, batch_size, progress)
    optional_write(lambda: save_stored(path, feats), "the real faces' Inception features")
    return feats


def reference_faces(path, size: int) -> np.ndarray:
    """uint8 N x 3 x size x size faces from a folder of pictures (resized when not size x size) or a packed .npy."""
    path = Path(path)
    if path.is_dir():
        files = find_images(path)
        if len(files) < 2:
            raise DataError(f"reference={path} holds {len(files)} pictures: point it at a folder of face tiles "
                            "(e.g. `python -m pipeline.crop crop.input_dir=OTHER_PICTURES crop.output_dir=FOLDER`)")
        faces = np.stack([reference_tile(f, size) for f in files]).transpose(0, 3, 1, 2)
    elif path.is_file() and path.suffix == ".npy":
        faces = load_split(path, "reference")
    else:
        raise DataError(f"reference={path} is neither a folder of face pictures nor a packed .npy file")
    if faces.shape[-1] != size:
        raise DataError(f"reference={path} holds {faces.shape[-1]} px faces; the model makes {size} px ones")
    return faces


def reference_tile(file: Path, size: int) -> np.ndarray:
    try:
        rgb = load_rgb(file, REFERENCE_MAX_PIXELS)
    except (OSError, ValueError) as err:
        raise DataError(f"reference picture {file} cannot be read ({err}): remove it or replace it") from None
    if rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return rgb


DECODER_RESULTS = {"elbo": "priors", "sharp": "sharp_priors"}


def evaluate(cfg: DictConfig) -> dict:
    run = open_run(cfg)
    decoders = checked_decoders(cfg.decoders, run)
    device = run.device
    n = sample_count(cfg.n, device)
    train, test = run.split("train"), run.split("test")
    reference = reference_faces(cfg.reference, test.shape[-1]) if cfg.reference else None
    extractor = InceptionFeatures(device)
    cache_dir = Path(cfg.paths.output_dir) / "fid_cache"
    rng = np.random.default_rng(cfg.seed)
    real = {"test": cached_features(extractor, test, cache_dir, cfg.batch_size)}
    floor_pick = np.sort(rng.choice(len(train), min(n, len(train)), replace=False))
    real_train = cached_features(extractor, train[floor_pick], cache_dir, cfg.batch_size)
    check = np.sort(rng.choice(len(test), min(cfg.nearest_n, len(test)), replace=False))
    _, test_to_train = nearest(test[check], train)
    results = {
        "ckpt": str(run.ckpt_path), "step": run.ckpt["step"], "obs_std": run.obs_std, "n": n,
        "n_test": len(test), "device": str(device), "fid_reliable": n >= FID_MIN_SAMPLES,
        **evaluate_elbo(run.elbo_model, torch.as_tensor(test).to(device), run.likelihood, run.obs_std),
        "floor_train_vs_test": fid_kid(real["test"], real_train),
        "real_sharpness": sharpness(test), "test_to_train_rms_median": float(np.median(test_to_train)),
        "near_copy_rms": float(np.percentile(test_to_train, 1)),
    }
    if reference is not None:
        real["reference"] = cached_features(extractor, reference, cache_dir, cfg.batch_size)
        results["reference"] = {"path": str(cfg.reference), "n": len(reference),
                                "floor_train_vs_reference": fid_kid(real["reference"], real_train)}
    for decoder in decoders:
        results[DECODER_RESULTS[decoder]] = {}
        for asked in cfg.priors:
            prior, prior_name = run.prior(asked, cfg.gmm_components, cfg.seed)
            results[DECODER_RESULTS[decoder]][prior_name] = score_samples(
                cfg, run, decoder, prior, prior_name, n, extractor, real, train, results)
    out = run.ckpt_path.parent / "metrics.json"
    atomic_write_bytes(out, json.dumps(results, indent=2).encode())
    print(table([results]))
    print(out)
    return results


def checked_decoders(asked, run) -> list[str]:
    """decoders=[elbo, sharp]: the sharp one is skipped (with a note) for runs that have none."""
    unknown = [d for d in asked if d not in DECODER_RESULTS]
    if unknown:
        raise ConfigError(f"decoders={list(asked)}: {unknown[0]!r} is not a decoder; use elbo and/or sharp")
    if "sharp" in asked and run.sharp_model is None:
        log.info("%s has no sharp decoder (trained with sharp.epochs=0 or before it existed): scoring the ELBO "
                 "decoder only", run.ckpt_path)
    return [d for d in DECODER_RESULTS if d in asked and (d == "elbo" or run.sharp_model is not None)]


def score_samples(cfg, run, decoder: str, prior, prior_name: str, n: int, extractor, real: dict,
                  train: np.ndarray, results: dict) -> dict:
    """FID / KID, sharpness and memorisation of n samples from `prior` through `decoder`."""
    model = run.sharp_model if decoder == "sharp" else run.elbo_model
    generator = torch.Generator().manual_seed(cfg.seed)
    z = sample_latents(prior, n, run.model.latent_dim, generator)
    samples = to_uint8(run.decode(z, model=model)).numpy()
    with tqdm(total=n, desc=f"inception ({prior_name} samples, {decoder} decoder)", unit="img") as progress:
        fake = features(extractor, samples, cfg.batch_size, progress)
    index, dist = nearest(samples[: cfg.nearest_n], train)
    scores = {
        **fid_kid(real["test"], fake),
        "sharpness_ratio": sharpness(samples) / results["real_sharpness"],
        "sample_to_train_rms_median": float(np.median(dist)),
        "memorisation_ratio": float(np.median(dist) / results["test_to_train_rms_median"]),
        "near_copies": float(np.mean(dist < results["near_copy_rms"])),
    }
    if "reference" in real:
        scores["reference"] = fid_kid(real["reference"], fake)
    k = min(cfg.sheet_n, len(samples))
    pairs = torch.stack([torch.as_tensor(samples[:k]), torch.as_tensor(train[index[:k]])], 1).flatten(0, 1)
    suffix = "_sharp" if decoder == "sharp" else ""
    atomic_write(run.ckpt_path.parent / f"nearest_{prior_name}{suffix}.png",
                 lambda f: save_image(to_float(pairs), f, format="png", nrow=8))
    return scores


def table(all_results: list[dict]) -> str:
    """Markdown table; the reference columns (FID / KID x1e3, floor FID) show - for runs scored without one."""
    lines = ["| obs_std | step | test ELBO (nats) | bits/dim | decoder | prior | FID | KID x1e3 | sharpness | "
             "memorisation | near-copies | floor FID | reference FID / KID x1e3 (floor FID) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [(r, decoder, prior, p) for r in all_results for decoder, field in DECODER_RESULTS.items()
            for prior, p in r.get(field, {}).items()]
    for r, decoder, prior, p in rows:
        ref = (f"{p['reference']['fid']:.1f} / {1e3 * p['reference']['kid']:.1f} "
               f"({r['reference']['floor_train_vs_reference']['fid']:.1f})" if "reference" in p else "-")
        near = f"{100 * p['near_copies']:.1f}%" if "near_copies" in p else "-"
        lines.append(f"| {r['obs_std']:g} | {r['step']} | {r['test_elbo']:.1f} | {r['test_bpd']:.3f} | {decoder} | "
                     f"{prior} | {p['fid']:.1f} | {1e3 * p['kid']:.1f} | {p['sharpness_ratio']:.2f} | "
                     f"{p['memorisation_ratio']:.2f} | {near} | {r['floor_train_vs_test']['fid']:.1f} | {ref} |")
    return "\n".join(lines)


def report(cfg) -> str:
    found = [json.loads(p.read_text()) for p in sorted(Path(cfg.paths.output_dir).rglob("metrics.json"))]
    if not found:
        raise PipelineError(f"no metrics.json under {cfg.paths.output_dir}: run `make eval` first")
    return table(sorted(found, key=lambda r: r["obs_std"]))


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    cfg = checked(cfg, EvaluateJob)
    if cfg.report:
        print(report(cfg))
        return
    with after_write_error("the run's metrics.json is as it was; once that is fixed, run the same command again"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
