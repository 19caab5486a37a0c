"""What a run folder keeps beside its checkpoint (the sampling prior, the hair colours): torch files,
written whole or not at all, read back with only tensors and plain containers allowed; and the check every
tensor a run or an export loads goes through (a NaN in a weight draws black faces without a word)."""
from pathlib import Path

import torch

from pipeline.errors import PipelineError, RunNotFound
from pipeline.io import atomic_write


def save_stored(path: Path, value) -> Path:
    atomic_write(path, lambda f: torch.save(value, f))
    return path


def load_stored(path: Path, what: str, remedy: str) -> dict | None:
    """The stored `what` at `path`, None when the run has none; a damaged file is one line saying `remedy`."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise PipelineError(f"{path} is not a readable {what} ({type(err).__name__}); {remedy}") from err


def require_finite(tensors: dict, path, what: str) -> dict:
    """`tensors` (a name -> tensor mapping) when every floating value is finite, else one line naming the first
    tensor that is not: one pass over the values."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunNotFound(f"{path}: {what} {name} holds NaN or infinite values (the file is damaged): "
                              "export or train the run again, or ask whoever sent it for a new copy")
    return tensors
