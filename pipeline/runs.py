"""Reopening trained runs: finding a checkpoint under outputs/, loading it safely, the device to use,
the packed splits it was trained on, its prior, and decoding / encoding with its model."""
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.adversarial import with_decoder
from pipeline.attributes import (colour_sliders, conditioned, hair_for_run, load_hair, load_sliders, save_hair,
                                 save_sliders, slider_value)
from pipeline.bundle import (CASCADE_FILE, CONFIG_FILE, MODEL_FILE, is_export, read_export, read_hair, read_prior,
                             read_prior_file)
from pipeline.errors import DataError, PipelineError, RunNotFound
from pipeline.io import optional_write
from pipeline.model import VAE, decode_means, encode_means
from pipeline.prior import PRIOR_NAME, answers, checked_mixture, fit_gmm_prior, load_prior, save_prior
from pipeline.stored import require_finite, save_stored

log = logging.getLogger(__name__)

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "animeface-vae/1"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is cuda (this process's local rank), then mps, then cpu; any other name is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PipelineError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device={name} but CUDA is not available here: use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"device={name} but MPS is not available here: use device=auto or device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def load_split(path, name: str) -> np.ndarray:
    """A packed split (uint8 N x 3 x H x H, as `make data` writes it), read once into memory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name} split not found at {path}: run `make data` first (or "
                        f"`python -m pipeline.pack pack.faces_dir=FOLDER` for a folder of face tiles), "
                        f"or point paths.data_dir / train.{name}_file at it")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy array ({err}); re-run `python -m pipeline.pack` "
                        "to write it again") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3 or array.shape[2] != array.shape[3]:
        raise DataError(f"{path} holds {array.dtype} {array.shape}; expected uint8 N x 3 x H x H "
                        "as written by `make data`. Re-run `python -m pipeline.pack`")
    if len(array) == 0:
        raise DataError(f"{path} is empty: no faces were packed. Check `make data`'s summary")
    return np.array(array)  # one read into memory (the file stays untouched)


def list_runs(output_dir) -> list[dict]:
    """Every run with a checkpoint: {ckpt, obs_std, mtime}, newest first."""
    runs = []
    for ckpt in Path(output_dir).rglob(CKPT_NAME):
        config = ckpt.parent / "config.yaml"
        obs_std = OmegaConf.load(config).get("obs_std") if config.exists() else None
        runs.append({"ckpt": ckpt, "obs_std": obs_std, "mtime": ckpt.stat().st_mtime})
    return sorted(runs, key=lambda r: r["mtime"], reverse=True)


def find_checkpoint(output_dir, obs_std=None, ckpt=None) -> Path:
    """`ckpt` itself (a ckpt.pt, a run folder, an export folder or its model.safetensors), else the newest
    run's checkpoint (with this obs_std, when given)."""
    if ckpt:
        return given_checkpoint(Path(ckpt))
    runs = list_runs(output_dir)
    matching = [r for r in runs if obs_std is None or (r["obs_std"] is not None and
                                                        abs(float(r["obs_std"]) - float(obs_std)) < 1e-12)]
    if matching:
        return matching[0]["ckpt"]
    trained = sorted({float(r["obs_std"]) for r in runs if r["obs_std"] is not None})
    train_cmd = f'make train ARGS="obs_std={obs_std}"' if obs_std is not None else "make train"
    if trained:
        raise RunNotFound(f"no run trained with obs_std={obs_std} under {output_dir}; trained obs_std values: "
                          f"{', '.join(map(str, trained))}. Train it with: {train_cmd}")
    raise RunNotFound(f"no trained run under {output_dir}. Train one with: {train_cmd}")


def given_checkpoint(path: Path) -> Path:
    if path.is_dir():
        if (path / CKPT_NAME).is_file():
            return path / CKPT_NAME
        if is_export(path):
            return path / MODEL_FILE
        raise RunNotFound(f"ckpt={path} is neither a run folder (no {CKPT_NAME}) nor an export folder (no "
                          f"{MODEL_FILE} with a {CONFIG_FILE}): pass a run folder under outputs/ or a folder "
                          "written by `python -m pipeline.export`")
    if not path.is_file():
        raise RunNotFound(f"ckpt={path}: no checkpoint there")
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by pipeline.train, loaded without unpickling arbitrary objects."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RunNotFound(f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); "
                          "it may be truncated or not from this project: train again or pick another ckpt=") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise RunNotFound(f"{path} is not an animeface-vae checkpoint (format {CKPT_FORMAT!r} expected); "
                          "pass a ckpt.pt written by `make train`")
    for part in ("model", "ema"):
        require_finite(ckpt.get(part) or {}, path, "the weight" if part == "model" else "the averaged weight")
    require_finite(ckpt.get("sharp", {}).get("decoder") or {}, path, "the sharp decoder's weight")
    return ckpt


DECODERS = ("auto", "sharp", "elbo")


def model_from_checkpoint(ckpt: dict, device="cpu") -> VAE:
    """The model that samples: the weights' moving average when the run kept one (train.ema)."""
    model = VAE(**ckpt["model_args"])
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return model.to(device).eval()


def sharp_from_checkpoint(ckpt: dict, elbo_model: VAE, path) -> VAE | None:
    """The same encoder with the sharp decoder (pipeline/adversarial.py), when the run trained one."""
    if "sharp" not in ckpt:
        return None
    try:
        return with_decoder(elbo_model, ckpt["sharp"]["decoder"], ckpt["sharp"].get("decoder_width")).eval()
    except (KeyError, ValueError, RuntimeError) as err:
        raise RunNotFound(f"{path}: its sharp decoder does not fit its model ({err}); "
                          "sample with decoder=elbo, or train the run again") from None


def pick_decoder(asked: str, elbo: VAE, sharp: VAE | None, path) -> tuple[VAE, str]:
    """decoder=auto is the sharp decoder when the run has one, else the ELBO decoder."""
    if asked not in DECODERS:
        raise PipelineError(f"decoder={asked!r}: use auto (the sharp decoder when the run has one), sharp or elbo")
    if asked == "sharp" and sharp is None:
        raise PipelineError(f"decoder=sharp but {path} has no sharp decoder (trained with sharp.epochs=0, or before "
                            "it existed): resume it to train one with `python -m pipeline.train resume=RUN_FOLDER`, "
                            "or use decoder=elbo")
    if sharp is not None and asked != "elbo":
        return sharp, "sharp"
    return elbo, "elbo"


class Run:
    """A trained checkpoint (or an export folder's model.safetensors), its model on the device, and the
    data it was trained on (for an export: its split files under `data_dir`)."""

    def __init__(self, ckpt_path: Path, device: torch.device, decoder: str = "auto", data_dir="data"):
        self.ckpt_path = Path(ckpt_path)
        self.exported = self.ckpt_path.suffix == ".safetensors"
        self.ckpt = read_export(self.ckpt_path.parent) if self.exported else load_checkpoint(self.ckpt_path)
        self.data_dir = Path(data_dir)
        if self.exported:
            self.ckpt["config"]["train"] = {k: str(self.data_dir / name)
                                            for k, name in self.ckpt["config"]["train"].items()}
        self.elbo_model = model_from_checkpoint(self.ckpt, device)
        self.sharp_model = sharp_from_checkpoint(self.ckpt, self.elbo_model, self.ckpt_path)
        self.model, self.decoder_name = pick_decoder(decoder, self.elbo_model, self.sharp_model, self.ckpt_path)
        self.encoder_step = self.ckpt.get("encoder_step", self.ckpt["step"])
        self.device = device
        self.obs_std = float(self.ckpt["obs_std"])
        self.likelihood = self.ckpt["likelihood"]
        self.config = self.ckpt["config"]
        self._hair, self._stored_prior, self._prior_file, self._unchecked = None, None, None, set()

    def split(self, name: str) -> np.ndarray:
        return load_split(self.split_path(name), name)

    def has_split(self, name: str) -> bool:
        return not self.split_problem(name)

    def split_problem(self, name: str) -> str:
        """Why the split is not there to use ("" when it is)."""
        try:
            path = self.split_path(name)
        except DataError as err:
            return str(err)
        return "" if path.is_file() else f"the {'training' if name == 'train' else name} split {path} is not there"

    def split_path(self, name: str) -> Path:
        """The packed split the run was trained on: the path it recorded, else its file name under data_dir (the
        data moved to another disk or machine) when that holds as many faces as the run was trained on; an
        export's is always under data_dir, checked the same way."""
        recorded = Path(self.config["train"][f"{name}_file"])
        moved = self.data_dir / recorded.name
        if not self.exported and (recorded.is_file() or not moved.is_file()):
            return recorded
        trained_on = (self.ckpt["export"]["data"] if self.exported else self.ckpt.get("faces", {})).get(name)
        try:
            faces = len(np.load(moved, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError, EOFError, TypeError):
            return moved  # load_split says what is wrong with it
        if trained_on is not None and faces != trained_on:
            raise DataError(f"{moved} holds {faces} faces, but {self.ckpt_path.parent} was trained on {trained_on} "
                            f"{name} faces: it is another data set. Point paths.data_dir at the folder the run was "
                            "trained on")
        if trained_on is None and moved != recorded and name not in self._unchecked:
            self._unchecked.add(name)
            log.warning("%s is gone; using %s instead (this run does not record how many faces it was trained on, "
                        "so it cannot be checked)", recorded, moved)
        return moved

    def prior(self, name: str, components: int, seed: int) -> tuple[dict | None, str]:
        """The distribution to draw codes from, and its name for file names and logs.

        default: the prior stored in the run folder (fitted and stored on first use for runs trained
        before priors were stored); normal: N(0, I); gmm: a `components`-mixture (the stored one when
        it has that many components, else fitted to the training split and cached beside the run)."""
        if name == "normal":
            return None, "normal"
        if name not in ("default", "gmm"):
            raise PipelineError(f"prior={name!r}: use default (the run's stored prior), normal or gmm")
        stored = self.stored_prior()
        usable = stored is not None and (name == "default" or answers(stored, components))
        if usable and (stored["step"] == self.encoder_step or not self.has_split("train")):
            if stored["step"] != self.encoder_step:
                log.warning("%s was fitted at step %d, the encoder is at step %d; the training split is not "
                            "there to refit it, so it is used as it is", PRIOR_NAME, stored["step"], self.encoder_step)
            return stored, stored["kind"]
        if not self.has_split("train"):
            raise DataError(f"prior={name} needs a {components}-component mixture that {self.ckpt_path.parent} "
                            f"does not store, and the training split it is fitted on "
                            f"({self.config['train']['train_file']}) is not there: restore that file, or sample "
                            "with prior=normal")
        if name == "default":
            prior = fit_gmm_prior(self.model, self.split("train"), components, seed, self.encoder_step)
            if optional_write(lambda: save_prior(self.ckpt_path.parent, prior), "the fitted prior"):
                log.info("stored the fitted prior in %s", self.ckpt_path.parent)
            self._stored_prior = prior
            return prior, prior["kind"]
        return self.cached_gmm(components, seed), "gmm"

    def stored_prior(self) -> dict | None:
        """The run folder's prior, read once (make eval asks for it per decoder)."""
        if self._stored_prior is None:
            folder = self.ckpt_path.parent
            latent_dim = self.model.latent_dim
            self._stored_prior = (read_prior(folder, latent_dim, self.export_prior_file()) if self.exported
                                  else load_prior(folder, latent_dim))
        return self._stored_prior

    def export_prior_file(self) -> tuple[dict, dict]:
        """An export's prior.safetensors (the mixture and the hair colours), read once."""
        if self._prior_file is None:
            self._prior_file = read_prior_file(self.ckpt_path.parent)
        return self._prior_file

    @property
    def cascade_copy(self) -> Path | None:
        """The detector's cascade an export folder carries (uploads work where the folder goes)."""
        path = self.ckpt_path.parent / CASCADE_FILE
        return path if self.exported and path.is_file() else None

    def hair(self) -> dict:
        """Per hair colour: the stored mixture's weights and the direction towards it (pipeline/attributes.py);
        stored at the end of training, computed and stored on first use for older runs with train.npy there."""
        if self._hair is not None:
            return self._hair
        folder = self.ckpt_path.parent
        latent_dim = self.model.latent_dim
        stored = (read_hair(folder, latent_dim, self.export_prior_file()) if self.exported
                  else load_hair(folder, latent_dim))
        if stored is not None and (stored["step"] == self.encoder_step or not self.has_split("train")):
            self._hair = stored
            return stored
        if not self.has_split("train"):
            raise DataError(f"hair colours need {folder / 'hair.pt'} (written when training ends) or the training "
                            f"split to compute it from ({self.config['train']['train_file']}): restore that file")
        train = self.split("train")
        self._hair = hair_for_run(self.encode(train), train, self.encoder_step)
        if optional_write(lambda: save_hair(folder, self._hair), "the hair colours"):
            log.info("stored the hair colours in %s", folder)
        return self._hair

    def hair_prior(self, colour: str) -> dict:
        return conditioned(self.hair(), colour)

    def sliders(self) -> tuple[dict[str, dict], str]:
        """Named sliders: one per offered hair colour and those saved in sliders.json; and a warning, if any."""
        try:
            named = colour_sliders(self.hair())
        except DataError as err:
            named, warning = {}, str(err)
        else:
            warning = ""
        custom, damaged = load_sliders(self.ckpt_path.parent, self.model.latent_dim)
        return {**named, **{s["name"]: s for s in custom}}, "; ".join(w for w in (warning, damaged) if w)

    def add_slider(self, slider: dict) -> None:
        custom, _ = load_sliders(self.ckpt_path.parent, self.model.latent_dim)
        save_sliders(self.ckpt_path.parent, [*custom, slider])

    def steered(self, z: torch.Tensor, values: dict) -> torch.Tensor:
        """z moved along named sliders: each value in units of its direction (1 = the mean difference)."""
        if not values:
            return z  # no slider file read on a plain move
        sliders, _ = self.sliders()
        unknown = [name for name in values if name not in sliders]
        if unknown:
            raise PipelineError(f"steer.{unknown[0]}: no such slider; this run has: {', '.join(sliders) or 'none'}")
        return z + sum(slider_value(name, v) * sliders[name]["direction"] for name, v in values.items())

    def cached_gmm(self, components: int, seed: int) -> dict:
        cache = self.ckpt_path.parent / f"gmm_k{components}_step{self.encoder_step}_seed{seed}.pt"
        if cache.exists():
            return checked_mixture(torch.load(cache, weights_only=True), cache, self.model.latent_dim)
        prior = fit_gmm_prior(self.model, self.split("train"), components, seed, self.encoder_step)
        optional_write(lambda: save_stored(cache, prior), f"the {components}-component mixture")
        return prior

    def decode(self, z: torch.Tensor, noise: bool = False, generator=None, model: VAE | None = None) -> torch.Tensor:
        """Images in [0, 1]: decoder means (of `model`, default the chosen decoder), or a draw from p(x|z) of
        the ELBO decoder (Gaussian: clipped for display)."""
        if noise and self.decoder_name != "elbo" and model is None:
            raise PipelineError("noise=true draws from p(x|z), the ELBO decoder's likelihood; the sharp decoder has "
                                "none: add decoder=elbo")
        mean = decode_means(model or self.model, z)
        if not noise:
            return mean
        if self.likelihood == "bernoulli":
            return torch.bernoulli(mean, generator=generator)
        return (mean + self.obs_std * torch.randn(mean.shape, generator=generator)).clamp(0, 1)

    def encode(self, images_uint8) -> torch.Tensor:
        return encode_means(self.model, images_uint8)


def open_run(cfg) -> Run:
    """The run a sample/evaluate config asks for: `ckpt=`, else the newest (with `+obs_std=`); `decoder=`
    when the config has that key."""
    ckpt = find_checkpoint(cfg.paths.output_dir, obs_std=cfg.get("obs_std"), ckpt=cfg.ckpt)
    return Run(ckpt, pick_device(str(cfg.device)), str(cfg.get("decoder", "auto")), cfg.paths.data_dir)
