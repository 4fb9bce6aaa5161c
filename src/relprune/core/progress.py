"""Progress that reaches the user wherever stderr goes: a bar on a terminal, plain lines in a log.

A bar's carriage returns make a log file unreadable and a scheduler's output silent for minutes, so
when stderr is not a terminal :func:`progress` prints a line at most every ``every`` seconds (and one
at the end) instead: ``desc: 120/469 batches, 31 s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Seconds between two progress lines in a log (a line per item when 0).
LOG_EVERY = 30.0


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
             every: float = LOG_EVERY, enabled: bool = True, name: Callable[[T], str] | None = None) -> Iterator[T]:
    """``iterable``, reporting progress on stderr: a tqdm bar on a terminal, else a line every ``every`` s
    (naming the last item done with ``name(item)`` when given)."""
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = last = time.perf_counter()
    of = f"/{total}" if total is not None else ""
    for count, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every or count == total:
            what = f" ({name(item)})" if name is not None else ""
            print(f"{desc}: {count}{of} {unit}{what}, {now - start:.0f} s", file=sys.stderr, flush=True)
            last = now
