"""What a run folder keeps beside its checkpoint (the sampling prior, the hair colours): torch files,
written whole or not at all, read back with only tensors and plain containers allowed."""
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_write


def save_stored(path: Path, value: dict) -> Path:
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
