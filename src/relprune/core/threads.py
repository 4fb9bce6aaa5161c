"""Running a linear-algebra call on a bounded number of threads.

Some LAPACK routines behind torch (the symmetric eigendecomposition among them) slow down far more than
the cores they lose when they run on every core while another process holds one: their threads wait on
each other at every step. Calls of that kind run inside :func:`bounded_threads`, which costs them some
speed on an idle machine and keeps their time steady on a shared one (``benchmarks/contention.py``
measures both).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Threads for eigendecompositions. The float32 eigh of a 1536 x 1536 Gram (SmolLM2's down_proj input) on
#: the 2-core VM, medians of 6 (benchmarks/contention.py, 2026-12-07): one thread 0.43 s idle, 0.49 s beside
#: one busy process, 0.69 s beside two; two threads 0.32, 0.76 and 1.12 s (docs/results.md, issue 32): 37%
#: slower idle, 35-38% faster on a shared machine. The issue measured two threads at 10-18 s beside other
#: jobs against 1.75 s with one.
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
