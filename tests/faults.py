"""Real write faults for the tests, never a mocked write: a small tmpfs that the test mounts (as root), where a
write past its size fails with ENOSPC; elsewhere the file-size limit of the process that writes (RLIMIT_FSIZE;
Python ignores SIGXFSZ, so a write past the limit fails with EFBIG). Both are faults of a real file system call."""
import contextlib
import os
import re
import resource
import shutil
import subprocess
from pathlib import Path

from tests.helpers import run_module, run_process


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


# ANIMEFACE_TEST_FAULTS=file-size-limit tries the fallback where a tmpfs could be mounted
MODE = os.environ.get("ANIMEFACE_TEST_FAULTS", "tmpfs" if can_mount() else "file-size limit").replace("-", " ")
PROGRESS = re.compile(r"\d+%\|")


class SmallDisk:
    """A folder where writes can be made to fail.

    tmpfs (root): the folder is a tmpfs of `size` bytes; `fill()` takes the room left with a ballast file.
    file-size limit (elsewhere): the folder is a plain one; commands run through `run()` (while `limited`) may
    write no file larger than `file_limit` bytes (`size` unless set), and `fill(pid)` sets a running process's limit
    to 0 (every write that grows a file fails). `make_room()` undoes both."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size, self.limited = Path(folder), size, True
        self.file_limit = size  # under a file-size limit: what commands run through run() may write per file
        self.folder.mkdir(parents=True, exist_ok=True)

    def __enter__(self):
        if MODE == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.folder)], check=True)
        return self

    def __exit__(self, *exc):
        if MODE == "tmpfs":
            subprocess.run(["umount", "-l", str(self.folder)], check=True)

    def run(self, module: str, *args: str) -> subprocess.CompletedProcess:
        """`python -m module args` as the tests run it (in this process on a tmpfs; a process of its own under a
        file-size limit, which must not bind the test process), not checked."""
        if MODE == "tmpfs" or not self.limited:
            return run_module(module, *args, check=False)
        size = self.file_limit
        return run_process(module, *args, check=False,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY)))

    def fill(self, pid: int | None = None) -> None:
        """From now on, writes fail: the tmpfs has no room left, or process `pid` may grow no file."""
        if MODE == "tmpfs":
            fd = os.open(self.folder / ".ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            for chunk in (1 << 20, 1 << 12):  # a megabyte at a time, then the last few kilobytes
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, bytes(chunk))
            os.close(fd)
        else:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    def make_room(self, size: int | None = None) -> None:
        """Space again: the ballast gone, the tmpfs grown to `size`; no limit for commands run from now on."""
        self.limited = False
        if MODE == "tmpfs":
            (self.folder / ".ballast").unlink(missing_ok=True)
            if size:
                subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)], check=True)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and p.name != ".ballast")


def one_error_line(stderr: str) -> str:
    """The `error:` line of a failed command, asserting it is all it said but progress bars (tqdm's `NN%|`)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr[-3000:]
    return lines[-1]
