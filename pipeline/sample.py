"""Stage 5: pictures from a trained VAE.

    python -m pipeline.sample +obs_std=0.1                 # 64 samples (decoder means) from the newest obs_std=0.1 run,
                                                           # codes from the prior stored with it (a fitted mixture),
                                                           # drawn by its sharp decoder when it has one
    python -m pipeline.sample +obs_std=0.1 decoder=elbo    # the same codes through the exact-ELBO decoder
    python -m pipeline.sample +obs_std=0.1 prior=normal    # codes from N(0, I)
    python -m pipeline.sample +obs_std=0.1 hair=blue       # faces with blue hair (the colours the run offers)
    python -m pipeline.sample +obs_std=0.1 +steer.blonde=1 +steer.glasses=1.5   # moved along named sliders
    python -m pipeline.sample sheet=recon|interp|obs_std   # reconstructions, interpolations, one row per obs_std

The last line printed is the path of the PNG written.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image

from pipeline.config import Paths, checked, key
from pipeline.errors import PipelineError, exit_on_error
from pipeline.images import check_picture_name, to_uint8
from pipeline.io import after_write_error, atomic_write, check_destination, is_folder
from pipeline.model import recon_grid
from pipeline.prior import Draw, sample_latents
from pipeline.runs import DECODERS, Run, list_runs, open_run, pick_device

log = logging.getLogger(__name__)


@dataclass
class SampleJob(Draw):
    """conf/sample.yaml's keys, their types and ranges (obs_std is appended with +obs_std=...); n, seed and
    temperature as pipeline/prior.py's Draw checks them (for `load(...).sample()` too)."""
    paths: Paths = key(default=Paths)
    ckpt: str | None = key()
    sheet: str = key(choices=("samples", "recon", "interp", "obs_std"))
    nrow: int = key(low=1)
    noise: bool = key()
    prior: str = key(choices=("default", "normal", "gmm"))
    decoder: str = key(choices=DECODERS)
    gmm_components: int = key(low=1)
    hair: str | None = key()
    steer: dict[str, float] = key(default={})
    out: str | None = key()
    device: str = key()
    obs_std: float | None = key(low=1e-6, default=None)


def samples_sheet(run: Run, cfg, generator) -> tuple[torch.Tensor, str]:
    prior, prior_name = sampling_prior(run, cfg)
    z = run.steered(sample_latents(prior, cfg.n, run.model.latent_dim, generator, cfg.temperature), cfg.steer)
    kind = "noisy" if cfg.noise else "means"
    steer = "".join(f"_{name}{value:+g}" for name, value in cfg.steer.items())
    temperature = "" if cfg.temperature == 1 else f"_t{cfg.temperature:g}"
    return (run.decode(z, cfg.noise, generator),
            f"samples_{prior_name}_{kind}_seed{cfg.seed}{temperature}_{run.decoder_name}{steer}")


def sampling_prior(run: Run, cfg) -> tuple[dict | None, str]:
    """prior= as asked; hair=<colour>: that colour's own Gaussian over the codes (pipeline/attributes.py)."""
    if cfg.hair is None:
        prior, prior_name = run.prior(cfg.prior, cfg.gmm_components, cfg.seed)
        log.info("prior: %s%s", prior_name, " (the run's stored prior)" if cfg.prior == "default" else "")
        return prior, prior_name
    if cfg.prior != "default":
        raise PipelineError(f"hair={cfg.hair} has its own distribution of codes: leave prior at default "
                            f"(not prior={cfg.prior})")
    prior = run.hair_prior(cfg.hair)  # checked before it is announced
    log.info("prior: the run's own distribution of codes for %s hair", cfg.hair)
    return prior, f"hair-{cfg.hair}"


def recon_sheet(run: Run, cfg, generator) -> tuple[torch.Tensor, str]:
    """Rows of test faces, each followed by a row of their reconstructions (decoder means of mu)."""
    test = test_faces(run, cfg.n, "n")
    faces = test[np.sort(torch.randperm(len(test), generator=generator)[: cfg.n].numpy())]
    return recon_grid(run.model, faces, cfg.nrow), f"recon_seed{cfg.seed}_{run.decoder_name}"


def interp_sheet(run: Run, cfg, generator) -> tuple[torch.Tensor, str]:
    """Each row walks linearly in latent space from one test face's code to another's."""
    rows = max(1, cfg.n // cfg.nrow)
    test = test_faces(run, 2 * rows, f"2 x n/nrow = 2 x {rows}")
    pick = torch.randperm(len(test), generator=generator)[: 2 * rows].numpy()
    codes = run.encode(test[pick])
    t = torch.linspace(0, 1, cfg.nrow)[None, :, None]
    z = (codes[:rows, None] * (1 - t) + codes[rows:, None] * t).flatten(0, 1)
    return run.decode(z), f"interp_seed{cfg.seed}_{run.decoder_name}"


def test_faces(run: Run, needed: int, what: str) -> np.ndarray:
    test = run.split("test")
    if len(test) < needed:
        raise PipelineError(f"sheet needs {what} test faces but {run.config['train']['test_file']} holds "
                            f"{len(test)}; lower n")
    return test


def output_path(cfg, default: Path) -> Path:
    """out= a picture's path, or a folder to write the default name into."""
    if not cfg.out:
        return default
    return Path(cfg.out) / default.name if names_a_folder(cfg.out) else Path(cfg.out)


def names_a_folder(out: str) -> bool:
    return is_folder(out) or out.endswith(("/", "\\"))


def check_out(cfg) -> None:
    """out= before any work: a folder that is or can be made, or a picture name PIL can write where it can be
    written."""
    if not cfg.out:
        return
    if names_a_folder(cfg.out):
        check_destination("out", Path(cfg.out), folder=True)
        return
    check_picture_name("out", Path(cfg.out))
    check_destination("out", Path(cfg.out))


def save_picture(picture: Image.Image | torch.Tensor, out: Path, nrow: int) -> None:
    """The grid (or a labelled sheet) written whole or not at all, in the format out='s extension names."""
    fmt = Image.registered_extensions()[out.suffix.lower()]
    if isinstance(picture, Image.Image):
        atomic_write(out, lambda f: picture.save(f, format=fmt))
    else:
        atomic_write(out, lambda f: save_image(picture, f, format=fmt, nrow=nrow))


def labelled(grid: torch.Tensor, labels: list[str], row_height: int) -> Image.Image:
    """The grid with a white margin on the left holding one label per row."""
    image = Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (image.width + 110, image.height), "white")
    canvas.paste(image, (110, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((6, i * row_height + row_height // 2 - 6), label, fill="black")
    return canvas


def obs_std_sheet(cfg, device) -> tuple[Image.Image, Path]:
    """One row per trained obs_std (newest run of each), all decoded from the same prior draws."""
    newest = {}
    for run in list_runs(cfg.paths.output_dir):
        if run["obs_std"] is not None:
            newest.setdefault(float(run["obs_std"]), run["ckpt"])
    if not newest:
        raise PipelineError(f"no trained run under {cfg.paths.output_dir}: run `make train` or `make sweep` first")
    rows, labels = [], []
    for obs_std, ckpt in sorted(newest.items()):
        run = Run(ckpt, device, cfg.decoder)
        generator = torch.Generator().manual_seed(cfg.seed)
        z = sample_latents(run.prior(cfg.prior, cfg.gmm_components, cfg.seed)[0], cfg.nrow, run.model.latent_dim,
                           generator, cfg.temperature)
        rows.append(run.decode(z))
        labels.append(f"obs_std={obs_std:g} {run.decoder_name}")
        log.info("row %d: obs_std=%g from %s (%s decoder)", len(rows), obs_std, ckpt, run.decoder_name)
    tile = rows[0].shape[-1]
    grid = make_grid(torch.cat(rows), nrow=cfg.nrow, padding=2, pad_value=1.0)
    out = output_path(cfg, Path(cfg.paths.output_dir) / f"obs_std_sheet_{cfg.prior}_seed{cfg.seed}_{cfg.decoder}.png")
    return labelled(grid, labels, tile + 2), out


SHEETS = {"samples": samples_sheet, "recon": recon_sheet, "interp": interp_sheet}


def sample(cfg: DictConfig) -> Path:
    check_out(cfg)
    if cfg.sheet == "obs_std":
        picture, out = obs_std_sheet(cfg, pick_device(str(cfg.device), 0))
        save_picture(picture, out, cfg.nrow)
        return out
    run = open_run(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    images, name = SHEETS[cfg.sheet](run, cfg, generator)
    out = output_path(cfg, run.ckpt_path.parent / f"{name}.png")
    save_picture(images, out, cfg.nrow)
    log.info("%s from %s (obs_std=%g, step %d), %s decoder%s", cfg.sheet, run.ckpt_path, run.obs_std,
             run.ckpt["step"], run.decoder_name, "" if run.sharp_model is None or run.decoder_name == "sharp"
             else " (decoder=elbo; the run also has a sharp one)")
    return out


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    with after_write_error("no picture was written and nothing else changed; once that is fixed (or with another "
                           "out=), run the same command again"):
        print(sample(checked(cfg, SampleJob)))


if __name__ == "__main__":
    main()
