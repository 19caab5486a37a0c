"""The Python entry point: a trained run, or an export folder, in a notebook.

    from pipeline import load
    model = load(obs_std=0.1)                 # the newest obs_std=0.1 run under outputs/ (or load("RUN_OR_EXPORT"))
    faces = model.sample(16, seed=0)          # uint8 16 x 64 x 64 x 3, the pixels `pipeline.sample` draws
    codes = model.encode(faces)               # float32 16 x latent_dim (encoder means)
    again = model.decode(codes)               # uint8 16 x 64 x 64 x 3

A thin face over pipeline/runs.py, which the command-line stages use too. Pictures go in as uint8
N x H x W x 3 numpy arrays (one H x W x 3 picture too; floats in [0, 1] accepted), PIL images (or a list
of them) and torch tensors (torchvision's N x 3 x H x W / 3 x H x W, uint8 or floats in [0, 1]).
"""
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline.config import checked
from pipeline.errors import ConfigError
from pipeline.images import to_uint8
from pipeline.prior import Draw, sample_latents
from pipeline.runs import Run, find_checkpoint, pick_device


def load(path=None, *, obs_std: float | None = None, decoder: str = "auto", device: str = "auto",
         output_dir="outputs", data_dir="data") -> "FaceModel":
    """A run folder, its ckpt.pt or an export folder (`path`); without `path`, the newest run under
    `output_dir` (trained with `obs_std`, when given). decoder: auto (the sharp one when the run has it),
    sharp or elbo. `data_dir` holds the packed splits an export folder's prior=gmm needs."""
    ckpt = find_checkpoint(output_dir, obs_std=obs_std, ckpt=str(path) if path is not None else None)
    return FaceModel(Run(ckpt, pick_device(device), decoder, data_dir))


class FaceModel:
    """A trained VAE with numpy in and out. `run` is the pipeline.runs.Run underneath."""

    def __init__(self, run: Run):
        self.run = run
        self.obs_std, self.decoder, self.step = run.obs_std, run.decoder_name, run.ckpt["step"]
        self.latent_dim, self.image_size = run.model.latent_dim, run.model.image_size
        self.decoders = ["elbo", *(["sharp"] if run.sharp_model is not None else [])]
        self.path = Path(run.ckpt_path).parent

    def __repr__(self) -> str:
        return (f"FaceModel({str(self.path)!r}, obs_std={self.obs_std:g}, step={self.step}, "
                f"decoder={self.decoder!r}, latent_dim={self.latent_dim})")

    def sample(self, n: int = 64, seed: int = 0, prior: str = "default", temperature: float = 1.0,
               hair: str | None = None, steer: dict | None = None) -> np.ndarray:
        """n faces from the stored prior (prior="default"), N(0, I) ("normal") or a 100-component mixture
        ("gmm"), decoded to pixel means: the same pixels as `python -m pipeline.sample n=N seed=SEED`.
        hair="blue" draws faces of one of `hair_colours()`; steer={"blonde": 1, "glasses": 1.5} moves them
        along named sliders (`sliders()`), as `hair=` and `+steer.NAME=V` do on the command line."""
        draw = drawn(n=n, seed=seed, temperature=temperature)
        if hair is not None and prior != "default":
            raise ValueError(f"hair={hair!r} has its own distribution of codes: leave prior at 'default'")
        distribution = self.run.hair_prior(hair) if hair is not None else self.run.prior(prior, 100, draw.seed)[0]
        z = sample_latents(distribution, draw.n, self.latent_dim, torch.Generator().manual_seed(draw.seed),
                           draw.temperature)
        return self.decode(self.run.steered(z, steer or {}))

    def hair_colours(self) -> list[str]:
        """The hair colours `sample(hair=...)` takes for this run."""
        return list(self.run.hair()["colours"])

    def sliders(self) -> list[str]:
        """The named sliders `sample(steer=...)` takes: one per hair colour, and those made in the explorer."""
        return list(self.run.sliders()[0])

    def encode(self, images) -> np.ndarray:
        """Encoder means (float32 N x latent_dim) of faces of the model's size."""
        return self.run.encode(faces_chw(images, self.image_size)).numpy()

    def decode(self, codes) -> np.ndarray:
        """uint8 N x H x W x 3 pixel means of codes (N x latent_dim, or one code)."""
        z = torch.as_tensor(np.asarray(codes, dtype=np.float32) if not torch.is_tensor(codes) else codes).float()
        z = z.reshape(1, -1) if z.dim() == 1 else z
        if len(z) == 0:
            raise ValueError(f"an empty batch of codes: pass at least one code of {self.latent_dim} numbers")
        if z.dim() != 2 or z.shape[1] != self.latent_dim or not torch.isfinite(z).all():
            raise ValueError(f"codes of shape {tuple(z.shape)}: pass N x {self.latent_dim} finite numbers "
                             "(this model's latent size)")
        return to_uint8(self.run.decode(z)).permute(0, 2, 3, 1).numpy()

    def reconstruct(self, images) -> np.ndarray:
        return self.decode(self.encode(images))


def drawn(**values) -> Draw:
    """n, seed and temperature checked as pipeline.sample checks its keys, with the same words (a ValueError)."""
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}
    try:
        return checked(OmegaConf.create(plain), Draw, remedy="")
    except (ConfigError, ValueError) as err:  # ValueError: a value OmegaConf cannot hold at all
        raise ValueError(str(err)) from None


def faces_chw(images, size: int) -> np.ndarray:
    """uint8 N x 3 x size x size from whatever a notebook holds (see the module's docstring)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return np.concatenate([faces_chw(image, size) for image in images])
    if isinstance(images, Image.Image):
        images = np.asarray(images.convert("RGB"))
    if torch.is_tensor(images):
        tensor = images.detach().cpu()
        tensor = tensor[None] if tensor.dim() == 3 else tensor
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise ValueError(f"a tensor of shape {tuple(images.shape)}: pass N x 3 x H x W or 3 x H x W (torchvision's "
                             "layout)")
        images = tensor.permute(0, 2, 3, 1).numpy()
    array = np.asarray(images)
    array = array[None] if array.ndim == 3 else array
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images of shape {array.shape}: pass N x H x W x 3 RGB pixels (or H x W x 3 for one)")
    if len(array) == 0:
        raise ValueError("an empty batch of images: pass at least one face")
    if array.shape[1:3] != (size, size):
        raise ValueError(f"images are {array.shape[1]}x{array.shape[2]}; the model takes {size}x{size} faces: crop "
                         f"them with `python -m pipeline.crop` or resize (PIL: image.resize(({size}, {size})))")
    return np.ascontiguousarray(as_uint8(array).transpose(0, 3, 1, 2))


def as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1:
        return to_uint8(torch.from_numpy(array.astype(np.float32))).numpy()
    raise ValueError(f"pixels of type {array.dtype}: pass uint8 (0-255) or floats in [0, 1]")
