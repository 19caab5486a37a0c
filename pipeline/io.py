"""Small file helpers every stage shares: one way to write files (whole or not at all, and a failed write is
one WriteError naming the path), and append-only logs that a failed append leaves as they were."""
import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from pipeline.errors import ConfigError, PipelineError, WriteError, write_failure

log = logging.getLogger(__name__)

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once at import, so that written files get the permissions open() would give them


@contextlib.contextmanager
def writing(path):
    """Turn a failed write inside the block (disk full, read-only, no permission, a name too long, a file where a
    folder should be, ...: an OSError anywhere in the exception's chain) into a WriteError naming `path` (or the
    folder the system names) and what the system said (after_write_error adds what was kept and how to go on)."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        failure = write_failure(err)
        if failure is None:
            raise
        raise WriteError(named_path(failure, path), failure) from err


def named_path(failure: OSError, path) -> str:
    """The path the system names (the folder that could not be made, say), unless that is a temp file or folder of
    ours: the user knows `path`, not our .part names."""
    temp = failure.filename is None or any(part.endswith(".part") for part in Path(failure.filename).parts)
    return str(path if temp else failure.filename)


@contextlib.contextmanager
def after_write_error(after: str):
    """A stage's own words on what it kept and how to go on, given to a WriteError from anywhere inside."""
    try:
        yield
    except WriteError as err:
        raise err.going_on(after) from None


def optional_write(save: Callable[[], object], what: str) -> bool:
    """Run `save` (a write of a file that only saves time later: a fitted mixture, features, a download); when it
    fails, say so and go on without it."""
    try:
        save()
        return True
    except WriteError as err:
        log.warning("%s not stored (computed again next time): cannot write %s: %s", what, err.path, err.reason)
        return False


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temp file beside `path`, then rename it onto `path`: a reader (or a crash, or a disk
    that fills up) sees either the whole new file or the old one, never a half-written one, and no temp file
    stays behind."""
    atomic_write_all({path: write})


def atomic_write_all(files: dict) -> None:
    """Several files ({path: write}) that belong together (a split's two arrays): every one is written to its temp
    file first and only then are they renamed into place, so a write that fails leaves all of the old ones."""
    written = []
    try:
        for path, write in files.items():
            written.append((Path(path), write_temp(Path(path), write)))
        for path, tmp in written:
            with writing(path):
                os.replace(tmp, path)
    finally:
        for _, tmp in written:
            tmp.unlink(missing_ok=True)


class Writes:
    """A file as writers see it through write() alone: numpy (and others) write a real file with C calls whose
    errors lose the reason ("1536000 requested and 1068928 written"); through write() a full disk is ENOSPC."""

    def __init__(self, file: BinaryIO):
        self._file = file

    def write(self, data) -> int:
        return self._file.write(data)

    def __getattr__(self, name):  # tell, seek, flush...: the file's own
        return getattr(self._file, name)


def write_temp(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            os.fchmod(fd, 0o666 & ~UMASK)
            with os.fdopen(fd, "wb") as f:
                write(Writes(f))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return Path(tmp)


def check_destination(key: str, path, folder: bool = False) -> None:
    """Before any work, that `path` (given as `key`) can be written: as a file (`folder`=False: no folder of that name
    in the way) or made as a folder (no file of that name); its nearest existing parent a folder this process may
    write in; no name longer than the file system allows. One ConfigError naming the key otherwise."""
    path = Path(path).absolute()
    nearest = next(p for p in (path, *path.parents) if exists(p))
    name_max = os.pathconf(nearest if nearest.is_dir() else nearest.parent, "PC_NAME_MAX")
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > name_max:
        raise ConfigError(f"{key}={path}: the name {longest[:24]}... is longer than the file system allows "
                          f"({name_max} bytes); choose a shorter one")
    if nearest == path:
        if path.is_dir() and not folder:
            raise ConfigError(f"{key}={path} is a folder: name a file in it, e.g. {key}={path / 'grid.png'}")
        if not path.is_dir() and folder:
            raise ConfigError(f"{key}={path} is a file: name a folder (a new one, or one to replace)")
        nearest = path.parent
    if not nearest.is_dir():
        raise ConfigError(f"{key}={path}: {nearest} is a file, so no folder can be made there; choose another path")
    try:  # an entry made and removed: what the permissions, a read-only disk or the file system itself allow
        os.rmdir(tempfile.mkdtemp(dir=nearest, prefix=".write-check-", suffix=".part"))
    except OSError as err:
        raise ConfigError(f"{key}={path}: {nearest} cannot be written ({err.strerror}); choose another path") from None


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, a loop of links: not there as far as writing is concerned
        return False


def is_folder(path) -> bool:
    return exists(Path(path)) and Path(path).is_dir()


def remove_partial_files(folder) -> int:
    """Delete the temp files atomic_write leaves behind when its process is killed mid-write (SIGKILL
    runs no cleanup); a stage calls this when it starts on its output folder. Returns how many."""
    stale = [p for p in Path(folder).rglob(".*.part") if p.is_file()] if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def read_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (the writer was killed mid-line) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON; fix or delete that line") from None
    return rows


class AppendOnly:
    """A file that only grows by whole lines, each fsynced: a kill loses at most the line being written, and an
    append that fails (a full disk) is cut off again, so the file never ends in half a line."""

    def __init__(self, path):
        self.path = Path(path)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_torn_line()
            self._file = open(self.path, "ab", buffering=0)

    def _drop_torn_line(self):
        """A writer killed mid-line leaves a line without its newline: cut it before appending."""
        if not self.path.exists() or not self.path.stat().st_size:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "rb+") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def add(self, text: str) -> None:
        """Append `text` (whole lines) or nothing at all."""
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        with writing(self.path):
            try:
                data = memoryview(text.encode("utf-8"))
                while data:
                    data = data[self._file.write(data):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlLog(AppendOnly):
    """Append-only JSON-lines file: one row per line."""

    def append(self, row: dict) -> None:
        self.add(json.dumps(row, ensure_ascii=False) + "\n")
