"""Priors to sample latent codes from: N(0, I), or a Gaussian mixture fitted ex post to the
encoder means of the training faces (fills in where the aggregate posterior really puts mass).

Training ends by fitting the mixture and storing it as `prior.pt` beside `ckpt.pt`: a run folder
samples with its best prior without the training data.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from pipeline.config import key
from pipeline.errors import PipelineError, RunNotFound
from pipeline.stored import load_stored, require_finite, save_stored
from pipeline.model import VAE, encode_means

log = logging.getLogger(__name__)

PRIOR_NAME = "prior.pt"
# the default 100 components need 10,000 training faces; the default data (14,992) allows 149
CODES_PER_COMPONENT = 100


def fit_gmm(codes: np.ndarray, components: int, seed: int) -> dict:
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, max_iter=200, random_state=seed)
    gmm.fit(codes)
    if not gmm.converged_:
        log.warning("the Gaussian mixture did not converge in %d iterations; using it as it is", gmm.max_iter)
    return {"weights": torch.tensor(gmm.weights_), "means": torch.tensor(gmm.means_),
            "cholesky": torch.linalg.cholesky(torch.tensor(gmm.covariances_))}


def supported_components(asked: int, codes: int) -> int:
    """At most one mixture component per CODES_PER_COMPONENT training codes: fewer codes than that per
    full-covariance component fit a degenerate density (and cost minutes of CPU for nothing)."""
    return max(1, min(asked, codes // CODES_PER_COMPONENT))


def fit_gmm_prior(model: VAE, train_uint8: np.ndarray, components: int, seed: int, step: int,
                  codes: torch.Tensor | None = None) -> dict:
    """A mixture of `components` (capped by supported_components) over the training codes (`codes`, when the
    caller has encoded them already), tagged with what it was fitted for."""
    if len(train_uint8) < 2:
        raise PipelineError(f"{len(train_uint8)} training face is too few for a mixture prior; "
                            "add faces, or sample with prior=normal")
    fitted = supported_components(components, len(train_uint8))
    if fitted < components:
        log.warning("%d training codes support at most %d mixture components (one per %d codes): fitting %d, "
                    "not %d", len(train_uint8), fitted, CODES_PER_COMPONENT, fitted, components)
    components = fitted
    log.info("fitting a %d-component Gaussian mixture to %d training codes", components, len(train_uint8))
    codes = encode_means(model, train_uint8) if codes is None else codes
    prior = fit_gmm(codes.double().numpy(), components, seed)
    return {"kind": "gmm", "components": components, "codes": len(train_uint8), "seed": seed, "step": step,
            **prior}


def answers(prior: dict, components: int) -> bool:
    """Whether a stored mixture is what asking for `components` fits now (priors stored before the cap do
    not say how many codes they were fitted to)."""
    codes = prior.get("codes")
    return prior["components"] == (components if codes is None else supported_components(components, codes))


def save_prior(run_dir, prior: dict) -> Path:
    return save_stored(Path(run_dir) / PRIOR_NAME, prior)


def load_prior(run_dir, latent_dim: int | None = None) -> dict | None:
    """The prior stored in a run folder, checked (for codes of `latent_dim`, when given), or None for runs trained
    before priors were stored."""
    path = Path(run_dir) / PRIOR_NAME
    prior = load_stored(path, "prior", "delete it and it is fitted again when the training split is there, or "
                        "sample with prior=normal")
    return None if prior is None else checked_mixture(prior, path, latent_dim)


def checked_mixture(prior: dict, path, latent_dim: int | None = None) -> dict:
    """A stored mixture that sample_latents can draw from: weights a distribution over K components, K means and K
    lower-triangular Cholesky factors with a positive diagonal, all finite (as float64); else one line naming it."""
    def refuse(what: str):
        raise RunNotFound(f"{path}: the prior's {what} (the file is damaged): export or train the run again, or "
                          "ask whoever sent it for a new copy")
    try:
        weights, means, cholesky = (prior[k].double() for k in ("weights", "means", "cholesky"))
    except (KeyError, TypeError, AttributeError, RuntimeError):
        refuse("weights, means or cholesky are missing or not tensors")
    require_finite({"weights": weights, "means": means, "cholesky": cholesky}, path, "the prior's")
    k = len(weights)
    dim = latent_dim or (means.shape[-1] if means.dim() == 2 else 0)
    if weights.dim() != 1 or k == 0 or means.shape != (k, dim) or cholesky.shape != (k, dim, dim):
        refuse(f"shapes disagree: weights {tuple(weights.shape)}, means {tuple(means.shape)}, cholesky "
               f"{tuple(cholesky.shape)} (expected K, K x {dim}, K x {dim} x {dim})")
    if prior.get("components") not in (None, k):
        refuse(f"components={prior['components']!r} but it holds {k}")
    if (weights < 0).any() or abs(weights.sum().item() - 1) > 1e-6:
        refuse(f"weights are not a distribution (they must be >= 0 and sum to 1; they sum to {weights.sum().item():g})")
    if not is_cholesky(cholesky):
        refuse("cholesky factors are not lower-triangular with a positive diagonal")
    return {**prior, "weights": weights, "means": means, "cholesky": cholesky}


def is_cholesky(factors: torch.Tensor) -> bool:
    return bool((factors.triu(1) == 0).all() and (factors.diagonal(dim1=-2, dim2=-1) > 0).all())


@dataclass
class Draw:
    """What a draw of codes takes, checked alike by pipeline.sample's keys and by `load(...).sample()`."""
    n: int = key(low=1, high=100_000)
    seed: int = key(low=0, high=2 ** 63 - 1)
    temperature: float = key(low=0.0, high=3.0)


def sample_latents(prior: dict | None, n: int, latent_dim: int, generator: torch.Generator,
                   temperature: float = 1.0) -> torch.Tensor:
    """n codes from N(0, I) (prior None) or from the mixture; `temperature` scales the spread around
    the mean (of each component)."""
    if prior is None:
        return temperature * torch.randn(n, latent_dim, generator=generator)
    component = torch.multinomial(prior["weights"], n, replacement=True, generator=generator)
    eps = temperature * torch.randn(n, latent_dim, 1, generator=generator, dtype=torch.float64)
    z = prior["means"][component] + (prior["cholesky"][component] @ eps).squeeze(-1)
    return z.float()
