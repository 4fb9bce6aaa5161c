"""A re-fit registered in one place is what the recipe, core.prune, the method labels, the bench and both
commands' --reconstruct take."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprune
from relprune.cli.main import build_parser
from relprune.core import reconstruct
from relprune.core.recipe import Recipe
from relprune.core.reconstruct import REFITS, register_refit
from relprune.experiments.bench import BenchConfig
from relprune.experiments.experiment import Method


@pytest.fixture
def doubled():
    """A re-fit that doubles the kept weights: easy to check by hand."""

    @register_refit("doubled", label="+doubled", summary="kept weights times two")
    def fit(weight, hessian, keep, **_):
        return weight.detach() * keep * 2

    yield "doubled"
    del REFITS["doubled"]


def test_the_builtin_refits_are_registered_with_their_labels():
    assert {name: r.label for name, r in REFITS.items()} == {"exact": "+refit", "obs": "+obs"}
    with pytest.raises(relprune.RelpruneError, match="registered already"):
        register_refit("exact", label="+again", summary="")(lambda *a, **k: None)
    with pytest.raises(relprune.RelpruneError, match="registered already"):
        register_refit("again", label="+refit", summary="")(lambda *a, **k: None)
    assert set(REFITS) == {"exact", "obs"}


def test_a_registered_refit_reaches_prune_and_the_recipe(doubled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(32, 6)
    dense = model[0].weight.detach().clone()
    stats = relprune.collect_stats(model, [x], statistics=["input_gram"])
    recipe = Recipe.build(criterion="magnitude", sparsity=0.5, scope="row", reconstruct=doubled)
    assert recipe.uses_gram and "input_gram" in recipe.statistics()
    masks = relprune.prune(model, stats, recipe)
    keep = masks["0"].bool()
    relprune.make_permanent(model)
    torch.testing.assert_close(model[0].weight.detach(), dense * keep * 2)
    with pytest.raises(relprune.RelpruneError, match="doubled"):
        Recipe.build(criterion="magnitude", sparsity=0.5, reconstruct="tripled")
    with pytest.raises(relprune.RelpruneError, match="refit method"):
        reconstruct.refit(dense, torch.eye(6), torch.ones_like(dense), method="tripled")


def test_a_registered_refit_has_a_label_a_bench_axis_and_a_flag_in_both_commands(doubled):
    method = Method.parse("wanda +doubled [row]")
    assert method.refit_name == "doubled" and method.recipe(0.5).reconstruct == "doubled"
    assert Method.parse(method.label) == method
    assert Method.parse("wanda +refit").reconstruct is True  # stored labels keep their meaning
    BenchConfig(reconstruct=[False, "doubled"]).validate()
    with pytest.raises(relprune.RelpruneError, match="reconstruct"):
        BenchConfig(reconstruct=["tripled"]).validate()
    parser = build_parser()
    ns = parser.parse_args(["llm", "prune", "--model", "m", "--sparsity", "0.5", "--calibration", "c", "--out", "o",
                            "--reconstruct", "doubled"])
    assert ns.reconstruct == "doubled"
    ns = parser.parse_args(["prune", "--checkpoint", "x", "--reconstruct", "doubled", "--out", "o"])
    assert ns.reconstruct == "doubled"
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--checkpoint", "x", "--reconstruct", "tripled", "--out", "o"])
