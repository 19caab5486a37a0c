"""A training run's checkpoint, saved and restored to the exact step, and what a resumed run may change.

pipeline/train.py saves `checkpoint_state` every train.ckpt_every steps, at each phase's end and on a stop
signal, and `restore_checkpoint` puts every part back (model, optimizer, schedule, moving average, the
sharp decoder's phase, every rank's random state), so a resumed run continues as if never stopped.
"""
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.adversarial import SharpConfig
from pipeline.config import checked
from pipeline.errors import ConfigError
from pipeline.io import JsonlLog
from pipeline.model import model_settings
from pipeline.runs import CKPT_FORMAT, find_checkpoint, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run is: its step and the best test ELBO so far."""
    step: int = 0
    best_test_elbo: float = -math.inf

# What a resumed run may change (given on the command line, recorded in resumes.jsonl); every other key
# keeps the run's value, and giving it a different one is refused: it would change what the run means.
RESUME_MAY_CHANGE = {"train.epochs", "train.max_steps", "train.ckpt_every", "train.log_every", "train.eval_every",
                     "train.num_threads", "train.eval_batch_size", "train.grid_n", "train.compile", "train.fused_adam",
                     "train.prior_components", "device", "paths.output_dir", "resume", "preset",
                     "sharp.epochs", "sharp.max_steps"}
# ...and, until its sharp-decoder phase has begun, every sharp.* key (so a finished VAE run gets a sharp decoder)
SHARP_KEYS = {f"sharp.{name}" for name in SharpConfig.__dataclass_fields__}


def rng_states(proc, sharp=None) -> list[dict]:
    """Every rank's RNG states, and its sharp decoder's generator once the phase has begun (gathered on every
    rank; rank 0 saves them). `proc`: train.py's Proc; `sharp`: its SharpPhase."""
    cuda = torch.cuda.get_rng_state(proc.device) if proc.device.type == "cuda" else None
    rng = {"cpu": torch.get_rng_state(), "cuda": cuda, "sharp": sharp.generator.get_state() if sharp else None}
    if proc.world == 1:
        return [rng]
    rngs = [None] * proc.world
    dist.all_gather_object(rngs, rng)
    return rngs


def checkpoint_state(cfg, parts, progress: Progress, rngs: list, steps_per_epoch: int,
                     vae_steps: int, faces: tuple[int, int]) -> dict:
    """Everything a resume needs (`parts`: train.py's Parts, what training updates), and the faces in each split
    (a moved data folder is checked against them)."""
    return {"format": CKPT_FORMAT, "model_args": parts.model_args, "model": parts.core.state_dict(),
            "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
            "step": progress.step, "epoch": progress.step // steps_per_epoch,
            "vae_steps": vae_steps, "encoder_step": min(progress.step, vae_steps),
            **({"sharp": parts.sharp.state_dict()} if parts.sharp else {}),
            "best_test_elbo": progress.best_test_elbo, "rng": rngs,
            "obs_std": float(cfg.obs_std), "likelihood": cfg.likelihood,
            "config": OmegaConf.to_container(cfg, resolve=True), "faces": dict(zip(("train", "test"), faces)),
            **({"ema": parts.ema.module.state_dict(), "ema_n": int(parts.ema.n_averaged)} if parts.ema else {})}


def restore_checkpoint(cfg, path: Path, parts, proc) -> Progress:
    ckpt = load_checkpoint(path, map_location=proc.device)
    if model_settings(ckpt["model_args"]) != model_settings(parts.model_args):
        raise ConfigError(f"{path} was trained with {ckpt['model_args']}, not {parts.model_args}; "
                          "resume with the same model settings")
    parts.core.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.ema is not None:
        if "ema" not in ckpt:
            raise ConfigError(f"{path} was trained without train.ema; resume it with train.ema=0")
        parts.ema.module.load_state_dict(ckpt["ema"])
        parts.ema.n_averaged.fill_(ckpt["ema_n"])
    rng = ckpt["rng"][proc.rank] if proc.rank < len(ckpt["rng"]) else ckpt["rng"][0]
    if "sharp" in ckpt:
        parts.start_sharp(cfg, proc.rank).load_state_dict(ckpt["sharp"])
        if rng.get("sharp") is not None:  # checkpoints from before the phase had a generator of its own lack it
            parts.sharp.generator.set_state(rng["sharp"].cpu())
    torch.set_rng_state(rng["cpu"].cpu())
    if proc.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), proc.device)
    log.info("resuming %s at step %d", path, ckpt["step"])
    return Progress(ckpt["step"], ckpt["best_test_elbo"])


def resolve_resume(cfg) -> Path | None:
    if cfg.resume is None:
        return None
    if str(cfg.resume) == "latest":
        return find_checkpoint(cfg.paths.output_dir, obs_std=cfg.obs_std)
    return find_checkpoint(cfg.paths.output_dir, ckpt=cfg.resume)


def command_line_keys() -> list[str]:
    """The keys given on the command line (k=v, +k=v, ++k=v, ~k)."""
    return [o.lstrip("+~").partition("=")[0] for o in HydraConfig.get().overrides.task]


def resume_config(cfg: DictConfig, schema: type) -> tuple[DictConfig, dict, int]:
    """The resumed run's own config (keys it predates take today's defaults), with only the keys of
    RESUME_MAY_CHANGE taken from the command line; the changes made, {key: [old, new]}; its step."""
    ckpt_path = resolve_resume(cfg)
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.merge(cfg, ckpt["config"])
    changed = {}
    may_change = RESUME_MAY_CHANGE | (set() if "sharp" in ckpt else SHARP_KEYS)
    for name in command_line_keys():
        new, old = OmegaConf.select(cfg, name), OmegaConf.select(run_cfg, name)
        if new == old or name in ("resume", "preset"):
            continue
        if name not in may_change:
            raise ConfigError(f"resume: {name}={new} would change what the run {ckpt_path.parent} means (it was "
                              f"trained with {name}={old}); start a new run instead. A resumed run may change only "
                              f"{', '.join(sorted(may_change - {'resume', 'preset'}))}")
        OmegaConf.update(run_cfg, name, new)
        changed[name] = [OmegaConf.to_container(old) if OmegaConf.is_config(old) else old, new]
    run_cfg.resume = str(ckpt_path)
    return checked(run_cfg, schema), changed, ckpt["step"]


def record_resume(run_dir: Path, step: int, changed: dict) -> None:
    with JsonlLog(run_dir / "resumes.jsonl") as resumes:
        resumes.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step, "changed": changed})
    for name, (old, new) in changed.items():
        log.info("resume: %s changed from %s to %s (recorded in resumes.jsonl)", name, old, new)
