"""The error types the pipeline raises for bad input or configuration, and how entry points show them."""
import errno
import functools
import logging
import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

# What a command writes before it has any result: a folder holding only these is removed on failure.
SCAFFOLDING = {".hydra", "config.yaml", "metrics.csv", "tb"}
DISK_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
               errno.EISDIR, errno.EEXIST}


class PipelineError(RuntimeError):
    """Bad input or configuration: the message names the file, URL or key and what to do."""


class DataError(PipelineError):
    """A data file (a packed split, a folder of images) is missing or not what the pipeline writes."""


class ConfigError(PipelineError):
    """A config key of the wrong type, out of range, or not one of its allowed values."""


class RunNotFound(PipelineError):
    """No trained run, or no readable checkpoint, where one was asked for."""


def exit_on_error(main):
    """Show a PipelineError, or a folder that cannot be written (read-only, full, a file in the way), as one
    clear line and exit with status 2, without a traceback and without leaving an empty run folder."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (PipelineError, OSError) as err:
            if isinstance(err, OSError) and err.errno not in DISK_ERRORS:
                raise
            message = str(err) if isinstance(err, PipelineError) else (
                f"cannot write {err.filename}: {err.strerror}; free space, fix its permissions or choose "
                "another paths.output_dir / paths.data_dir (files already written are intact)")
            logging.getLogger(main.__module__).error("%s", message)
            print(f"error: {message}", file=sys.stderr)
            remove_if_no_results(hydra_output_dir())
            raise SystemExit(2) from None
    return wrapper


def hydra_output_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def remove_if_no_results(folder: Path | None) -> None:
    """Remove `folder` (and parents left empty) if it holds only logs and SCAFFOLDING."""
    if folder is None or not folder.is_dir():
        return
    if any(p.name not in SCAFFOLDING and p.suffix != ".log" for p in folder.iterdir()):
        return
    logging.shutdown()  # the job's log file lives in the folder
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == Path.cwd() or any(parent.iterdir()):
            break
        parent.rmdir()
