"""Public arguments of the wrong kind are refused at the door by name (issue 30): never converted quietly
("0.5", True, 2.5 taken as 2) and never a torch error from deep inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import relprune
from relprune.core.checks import real_number, whole_number
from relprune.core.recipe import Recipe


def _model_and_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, relprune.collect_stats(model, [torch.randn(32, 8) for _ in range(2)])


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": "0.5"}, "sparsity must be a number"),
    ({"sparsity": True}, "sparsity must be a number"),
    ({"n_m": (2.5, 4)}, "two whole numbers"),
    ({"n_m": (True, 4)}, "two whole numbers"),
    ({"n_m": "2:4.0"}, "two whole numbers"),
    ({"threshold": "0.1"}, "threshold must be a number"),
    ({"sparsity": 0.5, "layers": []}, "layers= is empty"),
])
def test_prune_refuses_arguments_of_the_wrong_kind_and_changes_nothing(kwargs, message):
    model, stats = _model_and_stats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(relprune.RelpruneError, match=message):
        relprune.prune(model, stats, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_recipe_checks_its_allocation_numbers():
    with pytest.raises(relprune.SparsityError, match="lambda must be a number"):
        Recipe.build(sparsity=0.5, allocation="owl", owl_lambda="0.1")
    with pytest.raises(relprune.SparsityError, match="outlier multiple must be a number"):
        Recipe.build(sparsity=0.5, allocation="owl", owl_m=None)


def test_numbers_of_every_numeric_kind_are_accepted():
    for value in (0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1, np.int64(1)):
        assert real_number(value, "x") == float(value)
    assert Recipe.build(n_m=(np.int64(2), 4)).n_m == "2:4"
    assert whole_number(np.int32(3), "n") == 3


@pytest.mark.parametrize("value", ["3", 3.0, True, None, [3]])
def test_whole_numbers_are_whole_numbers(value):
    with pytest.raises(relprune.RelpruneError, match="n must be a whole number"):
        whole_number(value, "n")


def test_structured_and_language_model_entry_points_check_their_numbers():
    model, _ = _model_and_stats()
    with pytest.raises(relprune.RelpruneError, match="ratio must be a number"):
        relprune.prune_groups(model, torch.randn(1, 8), "0.5")
    pytest.importorskip("transformers")
    from relprune.llm import calibration_windows, evaluation_windows
    from relprune.llm.text import batches_of

    ids = torch.arange(100)
    for call, message in ((lambda: calibration_windows(ids, "4", 8), "calibration samples"),
                          (lambda: calibration_windows(ids, 4, 8.0), "seqlen"),
                          (lambda: evaluation_windows(ids, 8, 2.5), "evaluation samples"),
                          (lambda: batches_of(ids.reshape(10, 10), 0), "batch_size")):
        with pytest.raises(relprune.CalibrationError, match=message):
            call()
