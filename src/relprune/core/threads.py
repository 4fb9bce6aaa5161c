"""Running a linear-algebra call on a bounded number of threads.

Some LAPACK routines behind torch (the symmetric eigendecomposition among them) slow down far more than
the cores they lose when they run on every core while another process holds one: their threads wait on
each other at every step. Calls of that kind run inside :func:`bounded_threads`, which costs them some
speed on an idle machine and keeps their time steady on a shared one (``benchmarks/contention.py``
measures both). The same bound serves calls whose rounding depends on the thread count: ADMM's Cholesky
factors (LAPACK's blocked factorisation rounds differently on two threads, and block-by-block pruning sets
the count from the machine's load), so that a prune gives the same bits on an idle machine and a busy one.
Block-by-block pruning fits the whole thread count to the cores other processes leave free, block by block
(:class:`SharedCores`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

#: Threads for the linear-algebra calls whose time explodes under contention or whose rounding depends on the
#: thread count (eigendecompositions, ADMM's Cholesky factors). The float32 eigh of a 1536 x 1536 Gram
#: (SmolLM2's down_proj input) on the 2-core VM, medians of 6 (benchmarks/contention.py, 2026-12-07): one thread
#: 0.43 s idle, 0.49 s beside one busy process, 0.69 s beside two; two threads 0.32, 0.76 and 1.12 s
#: (docs/results.md, issue 32): 37% slower idle, 35-38% faster on a shared machine. The issue measured two
#: threads at 10-18 s beside other jobs against 1.75 s with one.
SOLVER_THREADS = 1

_lock = threading.Lock()


@contextmanager
def bounded_threads(limit: int = SOLVER_THREADS) -> Iterator[None]:
    """torch's intra-op threads capped at ``limit`` inside the block, restored after it.

    torch's thread count is process-wide, so the block holds a lock: two Python threads entering it
    together run one after the other rather than restoring each other's setting.
    """
    with _lock:
        before = torch.get_num_threads()
        if before > limit:
            torch.set_num_threads(limit)
        try:
            yield
        finally:
            if before > limit:
                torch.set_num_threads(before)


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy seconds of all CPUs since boot, this process's CPU seconds), or None where ``/proc/stat`` is missing."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class SharedCores:
    """torch's thread count fitted, step by step, to the cores other processes leave free.

    On a machine where another process holds a core, a matrix product split over every core waits for the
    thread that shares its core at each step, and takes longer than on the cores left free. Each
    :meth:`fit` measures the CPU time other processes took since the last one (``/proc/stat`` less this
    process's own) and sets the count to the cores they left (at least one, at most the count torch had
    when this was made); :meth:`restore` puts that count back. Where ``/proc/stat`` is missing nothing changes.
    """

    def __init__(self, read: Callable[[], tuple[float, float] | None] = _cpu_seconds,
                 clock: Callable[[], float] = time.monotonic):
        self._read, self._clock = read, clock
        self.limit = torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._last = (self._clock(), self._read())

    def others(self) -> float | None:
        """Cores other processes kept busy, on average, since the last call (None: not measurable)."""
        now, sample = self._clock(), self._read()
        (then, before), self._last = self._last, (now, sample)
        if before is None or sample is None or now - then < 0.05:
            return None
        other = (sample[0] - before[0]) - (sample[1] - before[1])
        return max(0.0, other / (now - then))

    def fit(self) -> int:
        """Set torch's thread count to the cores left free since the last call; returns it."""
        others = self.others()
        if others is None:
            return torch.get_num_threads()
        threads = max(1, min(self.limit, int(self.cores - others + 0.5)))  # the free cores, rounded
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def restore(self) -> None:
        """torch's thread count as it was when this was made."""
        if torch.get_num_threads() != self.limit:
            torch.set_num_threads(self.limit)
