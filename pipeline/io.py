"""Small file helpers every stage shares: one atomic writer and append-only JSON-lines logs."""
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temp file beside `path`, then rename it onto `path`: a reader (or a
    crash) sees either the whole new file or the old one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class JsonlLog:
    """Append-only JSON-lines file, flushed and fsynced per row so a kill loses at most one row."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_line()
        self._file = open(self.path, "a", encoding="utf-8")

    def _drop_torn_line(self):
        """A writer killed mid-row leaves a line without its newline: cut it before appending."""
        if not self.path.exists() or not self.path.stat().st_size:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "rb+") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
