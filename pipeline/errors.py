"""The error types the pipeline raises for bad input or configuration, and how entry points show them."""
import errno
import functools
import logging
import secrets
import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# Run folders are named <time>-<RUN_ID>: unique however many commands start in the same second, on one
# machine or several sharing outputs/ (conf/*.yaml: hydra.run.dir; Hydra resolves ${run_id:} once).
RUN_ID = secrets.token_hex(3)
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)

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


class RunNotFound(PipelineError, ValueError):
    """No trained run, or no usable checkpoint or export where one was asked for (a damaged or tampered file
    too); in Python also a ValueError, as for any argument that cannot be used."""


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
            message = str(err) if isinstance(err, PipelineError) else cannot_write(err)
            log_to_files(logging.getLogger(main.__module__), message)
            print(f"error: {message}", file=sys.stderr)
            remove_if_no_results(hydra_output_dir())
            raise SystemExit(2) from None
    return wrapper


def log_to_files(logger: logging.Logger, message: str) -> None:
    """The error into the command's log file, not onto the console again (the `error:` line is shown once)."""
    record = logger.makeRecord(logger.name, logging.ERROR, "", 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def cannot_write(err: OSError) -> str:
    return (f"cannot write {err.filename}: {err.strerror}; free space, fix its permissions or choose another "
            "paths.output_dir / paths.data_dir (files already written are intact)")


class RunFolderCheck(Callback):
    """Hydra callback (hydra.callbacks in conf/*.yaml): a run folder that cannot be created is one line and
    exit status 2, before Hydra's own traceback."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            Path(config.hydra.run.dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"error: {cannot_write(err)}", file=sys.stderr)
            raise SystemExit(2) from None


def hydra_output_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def remove_if_no_results(folder: Path | None) -> None:
    """Remove `folder` (and parents left empty) if it holds only logs and SCAFFOLDING."""
    if folder is None or not folder.is_dir() or not folder.name.endswith(RUN_ID):
        return  # only a folder this process created (Hydra names it <time>-<RUN_ID>)
    if any(p.name not in SCAFFOLDING and p.suffix != ".log" for p in folder.iterdir()):
        return
    logging.shutdown()  # the job's log file lives in the folder
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(handler.baseFilename).parent == folder.absolute():  # a later line would reopen it there
            root.removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == Path.cwd() or any(parent.iterdir()):
            break
        parent.rmdir()
