"""The error types the pipeline raises for bad input or configuration, and how entry points show them."""
import contextlib
import errno
import functools
import logging
import os
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
# Why a write fails on a user's machine, and what to do about it (None: the system's words say it all).
WRITE_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
                errno.EFBIG: "the file system or this process's file-size limit (ulimit -f) refuses a file this big",
                errno.EROFS: "choose a folder on a writable disk", errno.EACCES: "fix its permissions",
                errno.EPERM: "fix its permissions", errno.ENAMETOOLONG: "choose a shorter name",
                errno.ENOTDIR: "a file is where a folder should be", errno.EEXIST: "a file is where a folder should be",
                errno.EISDIR: "a folder is where a file should be", errno.ELOOP: "a symbolic link loops",
                errno.EIO: "the disk reported an input/output error"}
KEPT = "files already written are intact; fix that and run the same command again"


class PipelineError(RuntimeError):
    """Bad input or configuration: the message names the file, URL or key and what to do."""


class DataError(PipelineError):
    """A data file (a packed split, a folder of images) is missing or not what the pipeline writes."""


class ConfigError(PipelineError):
    """A config key of the wrong type, out of range, or not one of its allowed values."""


class RunNotFound(PipelineError, ValueError):
    """No trained run, or no usable checkpoint or export where one was asked for (a damaged or tampered file
    too); in Python also a ValueError, as for any argument that cannot be used."""


class WriteError(PipelineError):
    """A file or folder the pipeline writes could not be written: which path, what the system said, and `after`:
    what was kept and how to go on (each stage says its own; pipeline/io.py: writing)."""

    def __init__(self, path, failure: OSError | str, after: str | None = None):
        reason = failure if isinstance(failure, str) else failure_words(failure)
        super().__init__(str(path), reason, after)
        self.path, self.reason, self.after = str(path), reason, after

    def going_on(self, after: str) -> "WriteError":
        """The same failure with the stage's own words on what was kept and how to go on (the innermost stage's
        words win: the stage that was writing knows best)."""
        return self if self.after else WriteError(self.path, self.reason, after)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}; {self.after or KEPT}"


def failure_words(failure: OSError) -> str:
    words = failure.strerror or errno.errorcode.get(failure.errno, "error")
    hint = WRITE_ERRORS.get(failure.errno)
    return f"{words} ({hint})" if hint else words


def write_failure(err: BaseException) -> OSError | None:
    """The OSError of a failed write behind `err`: itself, or in its chain (torch.save reports a full disk as a
    RuntimeError whose context is the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
            return err
        err = err.__cause__ if err.__cause__ is not None else None if err.__suppress_context__ else err.__context__
    return None


def exit_on_error(main):
    """Show a PipelineError, or a file or folder that cannot be written (full, read-only, a file in the way), as
    one clear line and exit with status 2, without a traceback and without leaving an empty run folder."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        logging.raiseExceptions = False  # a log line a full disk refuses is dropped, not printed as a traceback
        try:
            return main(*args, **kwargs)
        except Exception as err:
            failure = None if isinstance(err, PipelineError) else write_failure(err)
            if not isinstance(err, PipelineError) and failure is None:
                raise
            message = str(err) if failure is None else cannot_use(failure)
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


def cannot_use(failure: OSError) -> str:
    """A file the system refused that no stage was writing (pipeline/io.py: writing names those it writes)."""
    return f"cannot use {failure.filename or 'a file'}: {failure_words(failure)}; {KEPT}"


def cannot_write(err: OSError) -> str:
    return str(WriteError(err.filename, err, "choose another paths.output_dir, or fix that folder"))


class RunFolderCheck(Callback):
    """Hydra callback (hydra.callbacks in conf/*.yaml): a run folder that cannot be created, or written (a full or
    read-only disk), is one line and exit status 2, before Hydra writes its own files there (which would end in
    Hydra's traceback)."""

    PROBE_BYTES = 1 << 12  # a page: a disk without one cannot take Hydra's config files and the first log lines

    def on_run_start(self, config, **kwargs) -> None:
        folder = Path(config.hydra.run.dir)
        probe, new_folders = folder / f".write-check-{RUN_ID}.part", []
        try:
            new_folders = [f for f in (folder, *folder.parents) if not f.exists()]
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(bytes(self.PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
                for made in new_folders:
                    made.rmdir()
            where = err if err.filename else OSError(err.errno, err.strerror, str(folder))
            print(f"error: {cannot_write(where)}", file=sys.stderr)
            raise SystemExit(2) from None
        probe.unlink()


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
