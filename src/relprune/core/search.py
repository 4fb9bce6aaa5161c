"""Search over per-unit sparsity levels under a fixed budget, scored by a caller's fitness.

An evolutionary search in the manner of EvoPress (Sieberling et al., 2024), cut to what a few dozen
evaluations can afford: a (1+1) strategy from a given start (the layer-error knapsack, say), each child
made by one to three level switches, a switch raising one unit's sparsity by ``step`` and lowering
another's by as many weights; the child replaces its parent when its fitness is no worse. Every
candidate removes the same number of weights as the start, and none leaves its unit's bounds.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SparsityError
from .checks import real_number, whole_number


@dataclass(frozen=True)
class SearchResult:
    """The best levels found, their fitness, the start's, and how many candidates were scored."""

    levels: list[float]
    fitness: float
    start_fitness: float
    evaluations: int
    accepted: int
    seconds: float


def check_search_budget(evaluations: int, seconds: float | None) -> None:
    """Refuse a budget the search cannot honour (one rule for the API and the command): at least 2 evaluations
    (the start and one candidate), a time limit that is a positive finite number of seconds or None."""
    whole_number(evaluations, "the search's evaluations", minimum=2, error=SparsityError)
    if seconds is not None:
        limit = real_number(seconds, "the search's time limit")
        if not (math.isfinite(limit) and limit > 0):
            raise SparsityError(f"the search's time limit must be a positive number of seconds, got {seconds!r}")


def _switch(levels: list[float], sizes: Sequence[int], low: Sequence[float], high: Sequence[float], step: float,
            rng: random.Random) -> bool:
    """One level switch in place: a random unit up by ``step``, another down by as many weights."""
    up, down = rng.sample(range(len(levels)), 2)
    fall = step * sizes[up] / sizes[down]
    if levels[up] + step > high[up] + 1e-12 or levels[down] - fall < low[down] - 1e-12:
        return False
    levels[up] += step
    levels[down] -= fall
    return True


def search_levels(start: Sequence[float], sizes: Sequence[int], fitness: Callable[[list[float]], float], *,
                  low: Sequence[float], high: Sequence[float], step: float, evaluations: int,
                  seconds: float | None = None, seed: int = 0,
                  clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """Levels near ``start`` (one per unit of ``sizes`` weights) with the least ``fitness`` found in at most
    ``evaluations`` calls of it (the start's included) and, if given, ``seconds``; the weights removed,
    ``sum(level * size)``, stay those of ``start``. Each unit's level stays within [``low``, ``high``]."""
    check_search_budget(evaluations, seconds)
    n = len(start)
    if not (len(sizes) == len(low) == len(high) == n) or n < 2:
        raise SparsityError("the search needs at least two units, each with a size and bounds")
    if not (math.isfinite(step) and step > 0):
        raise SparsityError(f"the search's step must be a positive number, got {step!r}")
    if any(s <= 0 for s in sizes):
        raise SparsityError("every unit of the search must hold weights")
    if any(not lo - 1e-12 <= v <= hi + 1e-12 for v, lo, hi in zip(start, low, high, strict=True)):
        raise SparsityError("the search's start lies outside its units' bounds")
    rng = random.Random(seed)
    t0 = clock()
    parent = [float(v) for v in start]
    best = first = float(fitness(list(parent)))
    used, accepted = 1, 0
    while used < evaluations and (seconds is None or clock() - t0 < seconds):
        child = list(parent)
        switches = min(rng.randint(1, 3), rng.randint(1, 3))
        made = sum(_switch(child, sizes, low, high, step, rng) for _ in range(switches))
        tries = 0
        while not made and tries < 100:  # at a corner of the bounds most switches fail; keep drawing
            made, tries = _switch(child, sizes, low, high, step, rng), tries + 1
        if not made:
            break  # no switch fits the bounds: the start is the only candidate
        value = float(fitness(list(child)))
        used += 1
        if value <= best:
            parent, best, accepted = child, value, accepted + 1
    return SearchResult(levels=parent, fitness=best, start_fitness=first, evaluations=used, accepted=accepted,
                        seconds=clock() - t0)
