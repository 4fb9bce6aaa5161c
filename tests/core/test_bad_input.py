"""Hostile input to the public API: a RelpruneError subclass that says what is wrong, and no change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprune
from relprune import (
    CalibrationError,
    CheckpointError,
    LayerError,
    RelpruneError,
    ShrinkError,
    StatsMismatchError,
)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


X = [torch.randn(5, 8) for _ in range(2)]

CASES = {
    "batches None": (lambda m: relprune.collect_stats(m, None), CalibrationError, "iterable of batches"),
    "batches an int": (lambda m: relprune.collect_stats(m, 5), CalibrationError, "iterable of batches"),
    "one bare tensor": (lambda m: relprune.collect_stats(m, X[0]), CalibrationError, "wrap a single batch"),
    "model None": (lambda m: relprune.collect_stats(None, X), LayerError, "torch.nn.Module"),
    "blind range an int": (lambda m: relprune.collect_stats(m, X, blind_ranges={"0": 5}), CalibrationError,
                           "BlindRange, a callable or None"),
    "stats a dict": (lambda m: relprune.prune(m, {"0": 1}, sparsity=0.5, criterion="rc"), StatsMismatchError,
                     "collect_stats"),
    "seed a string": (lambda m: relprune.prune(m, None, sparsity=0.5, criterion="random", seed="a"),
                      RelpruneError, "seed must be a whole number"),
    "seed beyond 64 bits": (lambda m: relprune.prune(m, None, sparsity=0.5, criterion="random", seed=2**70),
                            RelpruneError, "2\\^62"),
    "graph leaves unknown": (lambda m: relprune.DependencyGraph(m, torch.randn(2, 8), leaves=["nope"]),
                             ShrinkError, "nope"),
    "graph example misfit": (lambda m: relprune.DependencyGraph(m, torch.randn(2, 9)), ShrinkError,
                             "fails on the example"),
    "unknown option": (lambda m: relprune.prune(m, None, sparsity=0.5, foo=1), RelpruneError,
                       "takes no options"),
    "option of another criterion": (lambda m: relprune.prune(m, relprune.collect_stats(m, X), sparsity=0.5,
                                                             criterion="rc", ucb_k=2.0), RelpruneError, "ucb_k"),
    "state_dict an int": (lambda m: relprune.load_state_dict(m, 5), CheckpointError, "mapping of names"),
    "missing stats file": (lambda m: relprune.Stats.load("/nonexistent/stats.safetensors"), StatsMismatchError,
                           "does not exist"),
    "shrink example misfit": (lambda m: relprune.shrink.shrink(m, torch.randn(2, 5)), ShrinkError,
                              r"fails on the example: mat1 and mat2"),
    "regulariser example misfit": (lambda m: relprune.regularizers.ContributionEntropy(m, torch.randn(2, 3)),
                                   CalibrationError, r"shape \(2, 3\)\) does not fit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_public_api_refuses_bad_input_and_changes_nothing(case):
    call, error, message = CASES[case]
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        call(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_garbage_statistics_file(tmp_path):
    path = tmp_path / "stats.safetensors"
    path.write_bytes(b"xxxx")
    with pytest.raises(StatsMismatchError, match="not a readable relprune statistics file"):
        relprune.Stats.load(path)


def test_a_single_layer_name_as_a_string():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)])
    stats = relprune.collect_stats(model, X, layers="10")
    assert list(stats) == ["10"]
