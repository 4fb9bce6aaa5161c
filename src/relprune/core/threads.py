"""Running a linear-algebra call on a bounded number of threads.

Some LAPACK routines behind torch (MKL's symmetric eigendecomposition among them) slow down by an
order of magnitude when they run on every core while another process holds one: their threads wait
on each other at every step. Matrix products and Cholesky factorisations do not. Calls of the first
kind run inside :func:`bounded_threads`, which costs them little on an idle machine and keeps their
time steady on a shared one (``benchmarks/contention.py`` measures both).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Threads for eigendecompositions: one kept the 1536 x 1536 eigh of SmolLM2's down_proj within 2x of
#: its idle time beside a busy process, where two threads took 10-40x (docs/results.md, issue 32).
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
