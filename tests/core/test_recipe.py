"""The recipe: one validation, one derivation of the statistics it needs."""

from __future__ import annotations

import pytest

import relprune
from relprune.core.recipe import Recipe


@pytest.mark.parametrize("kwargs, statistics", [
    ({"criterion": "magnitude", "sparsity": 0.5}, set()),
    ({"criterion": "wanda", "sparsity": 0.5}, {"input_sq_mean"}),
    ({"criterion": "wanda", "sparsity": 0.5, "reconstruct": True}, {"input_sq_mean", "input_gram"}),
    ({"criterion": "wanda", "sparsity": 0.5, "reconstruct": "obs"}, {"input_sq_mean", "input_gram"}),
    ({"criterion": "sparsegpt", "n_m": "2:4"}, {"input_gram"}),
    ({"criterion": "rc", "threshold": 0.5, "bias_compensation": True}, {"relative_mean", "contribution_mean"}),
    ({"criterion": "snip", "sparsity": 0.5}, {"weight_grad"}),
])
def test_statistics_are_the_criterions_plus_what_the_refit_and_compensation_read(kwargs, statistics):
    assert Recipe.build(**kwargs).statistics() == statistics


def test_build_normalises_what_several_spellings_mean():
    assert Recipe.build(sparsity=0.5, reconstruct=True).reconstruct == "exact"
    assert Recipe.build(sparsity=0.5, reconstruct=False).reconstruct is None
    assert Recipe.build(n_m=(2, 4)).n_m == "2:4" and Recipe.build(n_m=(2, 4)).nm == (2, 4)
    assert Recipe.build(criterion=relprune.CRITERIA["wanda"], sparsity=0.5).criterion == "wanda"
    assert Recipe.build(sparsity=0.5).with_scope("row").scope == "row"
    assert Recipe.build(criterion="sparsegpt", sparsity=0.5).with_scope("row").scope is None


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 0.5, "n_m": "2:4"}, "one budget"),
    ({}, "one budget"),
    ({"sparsity": 1.0}, r"\[0, 1\)"),
    ({"threshold": -1.0, "criterion": "rc"}, "positive"),
    ({"threshold": 0.5, "criterion": "magnitude"}, "not on that scale"),
    ({"threshold": 0.5, "criterion": "sparsegpt"}, "chooses its own mask"),
    ({"sparsity": 0.5, "criterion": "sparsegpt", "scope": "row"}, "scope does not apply"),
    ({"sparsity": 0.5, "scope": "rows"}, "scope must be one of"),
    ({"sparsity": 0.5, "reconstruct": "yes"}, "reconstruct must be"),
    ({"sparsity": 0.5, "reconstruct": True, "bias_compensation": True}, "correct it twice"),
    ({"n_m": "2:4", "allocation": "owl"}, "give a sparsity, not an N:M pattern"),
    ({"sparsity": 0.5, "allocation": "per-layer"}, "allocation must be one of"),
    ({"sparsity": 0.5, "owl_lambda": 0.7}, r"lambda must lie in \[0, 0.5\)"),
    ({"sparsity": 0.5, "criterion": "magnitude", "options": {"ucb_k": 2}}, "takes no options"),
    ({"sparsity": 0.5, "criterion": "nope"}, "nope"),
])
def test_every_refusal_is_a_relprune_error_that_names_the_problem(kwargs, message):
    with pytest.raises(relprune.RelpruneError, match=message):
        Recipe.build(**kwargs)


def test_prune_takes_a_recipe_or_its_keywords_but_not_both():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    masks = relprune.prune(model, None, Recipe.build(criterion="magnitude", sparsity=0.5))
    assert masks.sparsity == pytest.approx(0.5)
    with pytest.raises(relprune.RelpruneError, match="not both"):
        relprune.prune(model, None, Recipe.build(criterion="magnitude", sparsity=0.5), sparsity=0.25)
    with pytest.raises(relprune.RelpruneError, match="Recipe"):
        relprune.prune(model, None, {"sparsity": 0.5})
