"""Priors to sample latent codes from: N(0, I), or a Gaussian mixture fitted ex post to the
encoder means of the training faces (fills in where the aggregate posterior really puts mass).

Training ends by fitting the mixture and storing it as `prior.pt` beside `ckpt.pt`: a run folder
samples with its best prior without the training data.
"""
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from pipeline.errors import PipelineError
from pipeline.stored import load_stored, save_stored
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


def load_prior(run_dir) -> dict | None:
    """The prior stored in a run folder, or None for runs trained before priors were stored."""
    return load_stored(Path(run_dir) / PRIOR_NAME, "prior", "delete it and it is fitted again when the training "
                       "split is there, or sample with prior=normal")


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
