"""CPU threads for a training that shares its machine: as many as the cores other processes leave free.

On 2 cores, a training with a thread per core beside one other busy process fell from 659 to 30 img/s:
its threads meet at every operator's barrier and wait there for one that is not running. With one thread
it ran 282 img/s, but alone one thread runs 30% slower than two (bench/cpu_sharing.py, bench/RESULTS.md).
So the count follows the load: every CHECK_EVERY_S seconds the CPU time that other processes spent on this
process's cores (Linux /proc/stat, less this process's own) says how many cores are left.
"""
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0


def allowed_cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_cpu_seconds(cores: set[int]) -> float | None:
    """CPU-seconds every process together has spent busy on `cores` since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    ticks = 0
    for name, user, nice, system, _idle, _iowait, irq, softirq, steal, *_ in lines:
        if int(name[3:]) in cores:
            ticks += int(user) + int(nice) + int(system) + int(irq) + int(softirq) + int(steal)
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class FreeCores:
    """Sets torch's intra-op threads to the cores other processes leave free, at most `most`; `update()`
    is cheap enough to call every step and looks again every CHECK_EVERY_S seconds."""

    def __init__(self, most: int):
        self.cores = allowed_cores()
        self.most = most
        self.threads = most
        torch.set_num_threads(most)
        self.last = None  # the first reading is taken at the first step: loading the data is not the load

    def reading(self) -> tuple[float, float | None, float]:
        return time.monotonic(), busy_cpu_seconds(self.cores), own_cpu_seconds()

    def update(self) -> None:
        if self.last is None:
            self.last = self.reading()
            return
        if self.last[1] is None or time.monotonic() - self.last[0] < CHECK_EVERY_S:
            return  # without /proc/stat the count stays as it started
        now = self.reading()
        if now[1] is None:
            return
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / (now[0] - self.last[0])
        self.last = now
        threads = max(1, min(self.most, int(len(self.cores) - others + 0.5)))
        if threads != self.threads:
            log.info("CPU threads: %d (other processes keep %.1f of %d cores busy)", threads, others,
                     len(self.cores))
            torch.set_num_threads(threads)
            self.threads = threads
