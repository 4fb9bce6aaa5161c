"""Statistics and training under torch.distributed: two gloo processes on CPU, started from the test."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dist_workers as W
import relprune
from relprune.train.regularizers import ContributionEntropy

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def spawn(fn, tmp_path, *args, world: int = 2) -> list:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(fn, args=(world, str(tmp_path / "init"), str(out), *args), nprocs=world, join=True)
    return [out / f"rank{r}" for r in range(world)]


def single_process(kind: str, n: int, statistics):
    model = W.mlp() if kind == "mlp" else W.cnn()
    stats = relprune.collect_stats(model, W.batches(kind, n), statistics=statistics)
    masks = relprune.prune(model, stats, sparsity=0.5, criterion="rc" if statistics is None else "wanda")
    return {n_: {s: ls.get(s) for s in sorted(stats.statistics)} for n_, ls in stats.items()}, dict(masks)


@pytest.mark.parametrize("kind, shares, statistics", [
    ("mlp", [[0, 1, 2], [3]], None),            # uneven shards, every statistic incl. the gradient
    ("mlp", [[0, 1, 2, 3], []], None),          # rank 1 has no batch at all
    ("cnn", [[0, 2], [1, 3]], ["input_sq_mean", "contribution_mean", "relative_mean"]),
    ("mlp", [[], [0, 1]], ["input_gram", "input_sq_mean"]),
], ids=["uneven", "empty-rank", "conv", "empty-rank-0"])
def test_statistics_over_ranks_equal_one_process_over_the_union(tmp_path, kind, shares, statistics):
    files = spawn(W.stats_worker, tmp_path, kind, shares, statistics)
    ranks = [torch.load(f.with_suffix(".pt")) for f in files]
    stats, masks = single_process(kind, sum(len(s) for s in shares), statistics)
    for got in ranks:
        assert got["stats"].keys() == stats.keys()
        for layer, per in stats.items():
            for name, value in per.items():
                torch.testing.assert_close(got["stats"][layer][name], value, rtol=1e-9, atol=1e-12,
                                           msg=f"{layer} {name}")
        for layer in masks:
            assert torch.equal(got["masks"][layer], masks[layer]), layer


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    files = spawn(W.failing_worker, tmp_path)
    rank0, rank1 = (f.with_suffix(".txt").read_text() for f in files)
    assert rank1.startswith("NonFiniteActivationError") and "NaN" in rank1
    assert rank0.startswith("CalibrationError") and "rank 1" in rank0


def test_ddp_step_with_a_regulariser_equals_the_mean_of_the_ranks_gradients(tmp_path):
    files = spawn(W.ddp_worker, tmp_path)
    ranks = [torch.load(f.with_suffix(".pt")) for f in files]
    # Reference: one process, the gradient DDP computes is the mean over ranks of each rank's gradient.
    model = W.mlp().float()
    x, y = W.ddp_batch()
    grads = []
    for r in range(2):
        model.zero_grad()
        reg = ContributionEntropy(model, x[r::2][:2])
        (nn.functional.cross_entropy(model(x[r::2]), y[r::2]) + 0.5 * reg()).backward()
        reg.detach()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p -= 0.1 * (grads[0][n] + grads[1][n]) / 2
    for got in ranks:
        for n, v in model.state_dict().items():
            torch.testing.assert_close(got[n], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ranks[0][n], W.mlp().float().state_dict()[n]) for n in ranks[0])


def test_distributed_true_without_a_process_group_is_a_clear_error():
    with pytest.raises(relprune.RelpruneError, match="process group"):
        relprune.collect_stats(W.mlp(), W.batches("mlp", 1), distributed=True)
