"""Finding trained runs under outputs/ and loading their checkpoints safely."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.model import VAE

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "animeface-vae/1"


class RunNotFound(PipelineError):
    pass


def list_runs(output_dir) -> list[dict]:
    """Every run with a checkpoint: {ckpt, obs_std, mtime}, newest first."""
    runs = []
    for ckpt in Path(output_dir).rglob(CKPT_NAME):
        config = ckpt.parent / "config.yaml"
        obs_std = OmegaConf.load(config).get("obs_std") if config.exists() else None
        runs.append({"ckpt": ckpt, "obs_std": obs_std, "mtime": ckpt.stat().st_mtime})
    return sorted(runs, key=lambda r: r["mtime"], reverse=True)


def find_checkpoint(output_dir, obs_std=None, ckpt=None) -> Path:
    """`ckpt` itself, else the newest run's checkpoint (with this obs_std, when given)."""
    if ckpt:
        path = Path(ckpt)
        path = path / CKPT_NAME if path.is_dir() else path
        if not path.is_file():
            raise RunNotFound(f"ckpt={ckpt}: no checkpoint there")
        return path
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
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> VAE:
    model = VAE(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
