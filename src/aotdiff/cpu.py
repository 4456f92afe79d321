"""CPU threads that degrade gracefully when other jobs share the cores.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels). By default an idle OpenMP thread spins for a
while before it sleeps, and torch starts one thread per core. On an idle machine that is the fastest choice; on a
shared one it is a trap: spinning threads steal the cores the other jobs need, every parallel region waits for its
slowest thread, and a small model can run 10-50x slower (measured here: the digits preset at 41 img/s with the default
2 threads beside other busy jobs, 131 img/s with 1 passive thread). Two remedies, both on by default:

* passive waiting (``OMP_WAIT_POLICY=PASSIVE``): an idle thread sleeps at once. libgomp reads the variable when it is
  loaded, i.e. when torch is imported, so :func:`prefer_passive_waiting` must run before ``import torch`` (the
  ``aotdiff`` command does it first thing; Python users can export the variable themselves);
* a thread count chosen from the load (:func:`auto_threads`): the cores this process may use minus the cores other
  processes keep busy right now (:func:`machine_load`, a half-second sample of /proc/stat), at least 1.

An explicit ``--threads N`` (or ``OMP_NUM_THREADS``) always wins; docs/performance.md has the measurements.
"""

from __future__ import annotations

import math
import os
import sys
import time


def prefer_passive_waiting() -> bool:
    """Ask OpenMP for passive waiting unless the user chose a policy; True if it was set here.

    Only effective before torch is imported (OpenMP reads its environment when it is loaded)."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits usually set), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (Linux), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_load(window_s: float = 0.5) -> float:
    """How many cores other processes keep busy now: the busy fraction of all CPUs over ``window_s`` seconds
    (/proc/stat) times the CPU count. Measured now rather than the 1-minute load average, which still counts a job
    (e.g. the `pip install` just before a quick start) for a minute after it ended. Falls back to the load average."""
    first = _cpu_times()
    if first is not None:
        time.sleep(window_s)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            busy = (second[0] - first[0]) / (second[1] - first[1])
            return max(busy, 0.0) * (os.cpu_count() or 1)
    try:
        return max(os.getloadavg()[0], 0.0)
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: int, load: float) -> int:
    """Threads for a process arriving on ``cores`` cores that already carry ``load`` runnable processes.

    The cores left free, rounded up once at least a quarter of a core is free (a transient blip, such as a process
    that just exited, should not cost a whole thread for the entire run), at least 1: 2 idle cores -> 2; 2 cores
    with 0.6 busy -> 2; beside one busy single-threaded job (load ~1) -> 1; beside two -> 1."""
    return max(1, min(cores, math.ceil(cores - load - 0.25)))


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads: ``requested`` if > 0, else OMP_NUM_THREADS if set, else :func:`auto_threads`.

    Returns the number in use."""
    import torch

    if requested > 0:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = auto_threads(available_cores(), machine_load())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def threads_note(requested: int, used: int) -> str:
    """A line for the log when the automatic choice took fewer threads than cores (empty otherwise)."""
    cores = available_cores()
    if requested > 0 or used >= cores or os.environ.get("OMP_NUM_THREADS"):
        return ""
    return f"CPU threads: {used} of {cores} cores (other jobs keep about {cores - used} busy); --threads N chooses"
