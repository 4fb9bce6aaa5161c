"""The level search: the budget and bounds hold for every candidate, it never returns worse than its start,
it finds a separable optimum, and it honours its evaluation and time limits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relprune.core.search import check_search_budget, search_levels
from relprune.errors import SparsityError


def _removed(levels, sizes):
    return sum(v * n for v, n in zip(levels, sizes, strict=True))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=2, max_size=6), seed=st.integers(0, 1000),
       step=st.sampled_from([0.01, 0.05, 0.1]))
def test_every_candidate_keeps_the_budget_and_the_bounds(sizes, seed, step):
    start = [0.5] * len(sizes)
    low, high = [0.3] * len(sizes), [0.7] * len(sizes)
    seen = []

    def fitness(levels):
        seen.append(levels)
        return sum(math.sin(7 * v + i) for i, v in enumerate(levels))

    result = search_levels(start, sizes, fitness, low=low, high=high, step=step, evaluations=30, seed=seed)
    for levels in [*seen, result.levels]:
        assert _removed(levels, sizes) == pytest.approx(_removed(start, sizes), abs=1e-9)
        assert all(lo - 1e-9 <= v <= hi + 1e-9 for v, lo, hi in zip(levels, low, high, strict=True))
    assert result.fitness <= result.start_fitness
    assert result.fitness == pytest.approx(fitness(result.levels))
    assert result.evaluations == len(seen) - 1 <= 30  # the call above scored once more


def test_it_moves_weights_to_where_the_fitness_wants_them():
    """Two units of 1 and 2 weights; the fitness wants the first at 0.8 and so the second at 0.4 (same total as
    both at 0.5 with sizes 1 and 2: 0.8 + 2 * 0.35 = 1.5). Each switch moves the first 0.1 and the second 0.05."""
    sizes, target = [1, 2], [0.8, 0.35]
    result = search_levels([0.5, 0.5], sizes, lambda v: sum((a - b) ** 2 for a, b in zip(v, target, strict=True)),
                           low=[0.0, 0.0], high=[1.0, 1.0], step=0.1, evaluations=200, seed=0)
    assert result.levels == pytest.approx(target, abs=1e-9)
    assert result.fitness == pytest.approx(0.0, abs=1e-18)


def test_a_separable_optimum_is_approached_from_a_poor_start():
    sizes = [10, 20, 30, 40]
    target = [0.6, 0.4, 0.55, 0.45]  # removes 0.49 of 100, as does every unit at 0.49
    start = [0.49] * 4

    def fitness(levels):
        return sum(n * (v - t) ** 2 for v, n, t in zip(levels, sizes, target, strict=True))

    result = search_levels(start, sizes, fitness, low=[0.0] * 4, high=[1.0] * 4, step=0.01, evaluations=400, seed=1)
    assert result.fitness < 0.1 * fitness(start)
    assert result.accepted > 0


def test_the_time_limit_stops_the_search():
    ticks = iter(range(1000))
    result = search_levels([0.5, 0.5], [1, 1], lambda v: 0.0, low=[0, 0], high=[1, 1], step=0.1, evaluations=100,
                           seconds=3.5, clock=lambda: float(next(ticks)))
    # the clock reads 0 at the start, then once before each candidate: 1, 2, 3 pass, 4 stops
    assert result.evaluations == 4


def test_a_start_at_every_bound_returns_the_start():
    """No switch fits: one unit at its ceiling, the other at its floor, and the fitness wants the opposite."""
    result = search_levels([0.7, 0.3], [1, 1], lambda v: -v[1], low=[0.3, 0.3], high=[0.7, 0.3], step=0.1,
                           evaluations=10)
    assert result.levels == [0.7, 0.3]
    assert result.evaluations == 1


@pytest.mark.parametrize("evaluations, seconds, words", [
    (0, None, "evaluations must be at least 2"), (-3, None, "at least 2"), (1, None, "at least 2"),
    (2.5, None, "whole number"), (True, None, "whole number"), (10, 0, "positive number of seconds"),
    (10, "5", "time limit must be a number"),
    (10, -1.0, "positive number of seconds"), (10, float("nan"), "positive"), (10, float("inf"), "positive"),
])
def test_budgets_the_search_cannot_honour_are_refused(evaluations, seconds, words):
    with pytest.raises(SparsityError, match=words):
        check_search_budget(evaluations, seconds)
    with pytest.raises(SparsityError, match=words):
        search_levels([0.5, 0.5], [1, 1], lambda v: 0.0, low=[0, 0], high=[1, 1], step=0.1,
                      evaluations=evaluations, seconds=seconds)


@pytest.mark.parametrize("start, sizes, low, high, step, words", [
    ([0.5], [1], [0], [1], 0.1, "two units"),
    ([0.5, 0.9], [1, 1], [0, 0], [1, 0.8], 0.1, "outside"),
    ([0.5, 0.5], [1, 0], [0, 0], [1, 1], 0.1, "hold weights"),
    ([0.5, 0.5], [1, 1], [0, 0], [1, 1], 0.0, "step"),
    ([0.5, 0.5], [1, 1], [0], [1, 1], 0.1, "bounds"),
])
def test_searches_that_cannot_start_are_refused(start, sizes, low, high, step, words):
    with pytest.raises(SparsityError, match=words):
        search_levels(start, sizes, lambda v: 0.0, low=low, high=high, step=step, evaluations=5)
