"""CPU threads that follow the cores other processes leave free (pipeline/cpu.py), on a simulated clock."""
from types import SimpleNamespace

import pytest
import torch

from pipeline import cpu


@pytest.fixture
def machine(monkeypatch):
    """Two cores, a clock and CPU-time counters the test moves by hand; torch's thread count put back after."""
    state = SimpleNamespace(now=0.0, busy=0.0, own=0.0)
    monkeypatch.setattr(cpu, "allowed_cores", lambda: {0, 1})
    monkeypatch.setattr(cpu, "time", SimpleNamespace(monotonic=lambda: state.now))
    monkeypatch.setattr(cpu, "busy_cpu_seconds", lambda cores: state.busy)
    monkeypatch.setattr(cpu, "own_cpu_seconds", lambda: state.own)
    threads = torch.get_num_threads()
    yield state
    torch.set_num_threads(threads)


def run_for(state, seconds, ours, others):
    """`seconds` pass with this process busy on `ours` cores and other processes on `others`."""
    state.now += seconds
    state.own += ours * seconds
    state.busy += (ours + others) * seconds


def test_threads_follow_the_cores_other_processes_leave_free(machine):
    free = cpu.FreeCores(2)
    assert free.threads == torch.get_num_threads() == 2
    free.update()  # the first step takes the first reading: the start-up's load does not count
    run_for(machine, 0.5, ours=2, others=1)
    free.update()
    assert free.threads == 2  # not a second yet: no new reading
    run_for(machine, 0.6, ours=1.2, others=0.9)
    free.update()
    assert free.threads == torch.get_num_threads() == 1  # another process keeps a core busy
    run_for(machine, 1.0, ours=1, others=0.3)
    free.update()
    assert free.threads == torch.get_num_threads() == 2  # it has stopped: both cores again
    run_for(machine, 1.0, ours=2, others=2)
    free.update()
    assert free.threads == 1  # never fewer than one


def test_at_most_the_processes_share_and_nothing_changes_without_proc_stat(machine, monkeypatch):
    free = cpu.FreeCores(1)  # e.g. one of two torchrun processes on two cores
    free.update()
    run_for(machine, 1.0, ours=1, others=0)
    free.update()
    assert free.threads == torch.get_num_threads() == 1
    monkeypatch.setattr(cpu, "busy_cpu_seconds", lambda cores: None)  # no /proc: the count stays as it is
    free = cpu.FreeCores(2)
    free.update()
    run_for(machine, 2.0, ours=1, others=2)
    free.update()
    assert free.threads == 2


def test_proc_stat_is_read_per_core():
    if cpu.busy_cpu_seconds({0}) is None:
        pytest.skip("no /proc/stat on this system: the thread count stays at train.num_threads or the cores")
    one, every = cpu.busy_cpu_seconds({0}), cpu.busy_cpu_seconds(cpu.allowed_cores())
    assert 0 < one <= every
