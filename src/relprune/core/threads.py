"""Running a linear-algebra call on a bounded number of threads.

Some LAPACK routines behind torch (MKL's symmetric eigendecomposition among them) slow down by an
order of magnitude when they run on every core while another process holds one: their threads wait
on each other at every step. Matrix products and Cholesky factorisations do not. Calls of the first
kind run inside :func:`bounded_threads`, which on this machine makes them faster even when it is idle
and keeps their time steady on a shared one (``benchmarks/contention.py`` measures both).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Threads for eigendecompositions. The float32 eigh of a 1536 x 1536 Gram (SmolLM2's down_proj input) on
#: the 2-core VM, medians of 9 (benchmarks/contention.py, 2026-12-07): one thread 0.44 s idle, 0.67 s beside
#: one busy process, 1.01 s beside two; two threads 0.80, 1.07 and 2.64 s (docs/results.md, issue 32). The
#: issue measured two threads at 10-18 s beside other jobs against 1.75 s with one.
EIGH_THREADS = 1

_lock = threading.Lock()


@contextmanager
def bounded_threads(limit: int = EIGH_THREADS) -> Iterator[None]:
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
