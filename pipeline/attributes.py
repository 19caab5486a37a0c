"""Faces you can ask for: hair colour and named sliders, stored with a run.

At the end of training (beside prior.pt, as hair.pt) each hair colour the labeller (pipeline/hair.py)
finds on at least MIN_FACES training faces gets:
- a Gaussian of its own over the codes of the training faces of that colour (mean, full covariance):
  sampling `hair=<colour>` (it measured 82-91% faces of the colour; reweighting the stored mixture's
  components by the colour's codes only 18-41%: bench/RESULTS.md, issue 26);
- the direction from the mean code of all training faces to that of the colour's: the slider "towards <colour>".
Sliders users make from examples ("has it" / "lacks it" codes) are kept in sliders.json in the run folder.
"""
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError, RunNotFound
from pipeline.hair import PALETTE, label_hair
from pipeline.io import atomic_write_bytes
from pipeline.prior import is_cholesky
from pipeline.stored import load_stored, require_finite, save_stored

log = logging.getLogger(__name__)

HAIR_NAME = "hair.pt"
SLIDERS_NAME = "sliders.json"
MIN_FACES = 20  # fewer faces of a colour estimate nothing: the colour is not offered
REG_COVAR = 1e-4  # added to the covariance's diagonal, as for the stored mixture (pipeline/prior.py)
MIN_EXAMPLES = 4  # of each side, to make a slider
# how far a slider may move a code (in standard deviations for the principal directions, in mean differences for
# named sliders): far past the page's +-3, short of overflowing float32 (1e308 made the code infinite)
SLIDER_RANGE = 1000
SLIDER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


def fit_hair(codes: torch.Tensor, colours: np.ndarray, step: int) -> dict:
    """Per offered colour: a Gaussian of its own (mean and full covariance of the codes of the training faces
    of that colour, in closed form), the direction towards it, and how many faces made it."""
    codes = codes.double()
    mean_code = codes.mean(0)
    offered, not_offered = {}, {}
    for name in PALETTE:
        faces = torch.as_tensor(np.flatnonzero(colours == name))
        if len(faces) < MIN_FACES:
            not_offered[name] = f"{len(faces)} training faces of this colour (at least {MIN_FACES} are needed)"
            continue
        own = codes[faces]
        covariance = torch.cov(own.T) + REG_COVAR * torch.eye(codes.shape[1], dtype=codes.dtype)
        offered[name] = {"mean": own.mean(0), "cholesky": torch.linalg.cholesky(covariance),
                         "direction": (own.mean(0) - mean_code).float(), "faces": int(len(faces))}
    return {"step": step, "colours": offered, "not_offered": not_offered, "faces": int(len(codes))}


def hair_for_run(codes: torch.Tensor, train_uint8: np.ndarray, step: int) -> dict:
    hair = fit_hair(codes, label_hair(train_uint8), step)
    log.info("hair colours offered: %s%s", ", ".join(f"{k} ({v['faces']} faces)" for k, v in hair["colours"].items()),
             "".join(f"; {k} not offered: {why}" for k, why in hair["not_offered"].items()))
    return hair


def save_hair(run_dir, hair: dict) -> Path:
    return save_stored(Path(run_dir) / HAIR_NAME, hair)


def load_hair(run_dir, latent_dim: int | None = None) -> dict | None:
    path = Path(run_dir) / HAIR_NAME
    hair = load_stored(path, "file of hair colours", "delete it and it is computed again when the training split "
                       "is there")
    return None if hair is None else checked_hair(hair, path, latent_dim)


def checked_hair(hair: dict, path, latent_dim: int | None = None) -> dict:
    """Stored hair colours that sampling can use: colours of the labeller's palette, each with a finite mean,
    direction and lower-triangular Cholesky factor (positive diagonal) of one size; else one line naming it."""
    def refuse(what: str):
        raise RunNotFound(f"{path}: the hair colours' {what} (the file is damaged): export the run again, or delete "
                          "it and it is computed again when the training split is there")
    if not isinstance(hair.get("colours"), dict) or not isinstance(hair.get("not_offered"), dict):
        refuse("list of colours is missing")
    colours = {}
    for name, colour in hair["colours"].items():
        if name not in PALETTE:
            refuse(f"{name!r} is not a colour of the labeller's palette ({', '.join(PALETTE)})")
        try:
            mean, cholesky, direction = (colour[k].double() for k in ("mean", "cholesky", "direction"))
        except (KeyError, TypeError, AttributeError, RuntimeError):
            refuse(f"{name} lacks its mean, cholesky or direction tensor")
        require_finite({f"{name}.mean": mean, f"{name}.cholesky": cholesky, f"{name}.direction": direction}, path,
                       "the hair colour")
        dim = latent_dim or len(mean)
        if mean.shape != (dim,) or direction.shape != (dim,) or cholesky.shape != (dim, dim):
            refuse(f"{name} tensors are {tuple(mean.shape)}, {tuple(cholesky.shape)}, {tuple(direction.shape)}, "
                   f"not {dim}, {dim} x {dim}, {dim}")
        if not is_cholesky(cholesky):
            refuse(f"{name} cholesky factor is not lower-triangular with a positive diagonal")
        colours[name] = {**colour, "mean": mean, "cholesky": cholesky, "direction": direction.float()}
    return {**hair, "colours": colours}


def conditioned(hair: dict, colour: str) -> dict:
    """The distribution to draw codes of one offered colour from (a one-component mixture)."""
    if colour not in hair["colours"]:
        why = hair["not_offered"].get(colour)
        raise PipelineError(f"hair={colour}: " + (f"not offered for this run ({why}); " if why else "not a colour; ")
                            + f"offered: {', '.join(hair['colours']) or 'none'}")
    own = hair["colours"][colour]
    return {"kind": "gmm", "components": 1, "weights": torch.ones(1, dtype=torch.float64),
            "means": own["mean"][None], "cholesky": own["cholesky"][None]}


def colour_sliders(hair: dict) -> dict[str, dict]:
    return {name: {"name": name, "kind": "colour", "direction": c["direction"].float(), "faces": c["faces"]}
            for name, c in hair["colours"].items()}


def make_slider(name, has: torch.Tensor, lacks: torch.Tensor, taken) -> dict:
    """A slider from examples: the direction from the mean code of the faces that lack it to those that have it."""
    if not isinstance(name, str) or not SLIDER_NAME.fullmatch(name):
        raise PipelineError(f"slider name {name!r}: use one plain word (a letter, then letters, digits, - or _; "
                            "at most 32), e.g. glasses")
    if name in taken:
        raise PipelineError(f"a slider named {name!r} exists already: choose another name")
    if len(has) < MIN_EXAMPLES or len(lacks) < MIN_EXAMPLES:
        raise PipelineError(f"a slider needs at least {MIN_EXAMPLES} faces that have it and {MIN_EXAMPLES} that lack "
                            f"it; marked: {len(has)} and {len(lacks)}")
    return {"name": name, "kind": "custom", "direction": (has.mean(0) - lacks.mean(0)).float(),
            "has": len(has), "lacks": len(lacks)}


def slider_value(name: str, value) -> float:
    """A slider's value, checked: a finite number within +-SLIDER_RANGE."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= SLIDER_RANGE:
        raise PipelineError(f"slider {name}={value!r}: use a number from -{SLIDER_RANGE} to {SLIDER_RANGE} (the page's "
                            "sliders go from -3 to 3)")
    return float(value)


def save_sliders(run_dir, sliders: list[dict]) -> Path:
    path = Path(run_dir) / SLIDERS_NAME
    rows = [{"name": s["name"], "has": s["has"], "lacks": s["lacks"], "direction": s["direction"].tolist()}
            for s in sliders]
    atomic_write_bytes(path, (json.dumps({"sliders": rows}, indent=1) + "\n").encode())
    return path


def load_sliders(run_dir, latent_dim: int) -> tuple[list[dict], str]:
    """The sliders saved in a run folder, and a warning naming the file when it cannot be used."""
    path = Path(run_dir) / SLIDERS_NAME
    if not path.is_file():
        return [], ""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["sliders"]
        sliders = [{"name": str(r["name"]), "kind": "custom", "has": int(r["has"]), "lacks": int(r["lacks"]),
                    "direction": torch.tensor(r["direction"], dtype=torch.float32)} for r in rows]
        if any(s["direction"].shape != (latent_dim,) or not torch.isfinite(s["direction"]).all() for s in sliders):
            raise ValueError(f"a direction is not {latent_dim} finite numbers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        warning = f"{path} is damaged ({type(err).__name__}: {err}); its sliders are skipped (delete or fix the file)"
        log.warning("%s", warning)
        return [], warning
    return sliders, ""
