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


def test_training_loop_under_ddp_equals_one_process_and_checkpoints_once(tmp_path):
    from relprune.experiments.training import TrainConfig, train

    files = spawn(W.train_worker, tmp_path)
    ranks = [torch.load(f.with_suffix(".pt")) for f in files]
    model = W.toy_model()
    reg = ContributionEntropy(model, W.toy_data().train.x[:8])
    # One process on the whole batches; the entropy term is not additive over samples, so give the
    # reference the mean of the two halves' terms, which is what DDP's averaged gradient sees.
    halves = _HalvedPenalty(reg)
    train(model, W.toy_data(), TrainConfig(epochs=2, batch_size=16, lr=1e-2), penalty=halves)
    reg.detach()
    for got in ranks:
        for n, v in model.state_dict().items():
            torch.testing.assert_close(got["state"][n], v, rtol=1e-4, atol=1e-5)
    assert len(ranks[0]["lines"]) == 2 and ranks[1]["lines"] == []  # only rank 0 logs
    ckpt = torch.load(tmp_path / "out" / "train.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1


class _HalvedPenalty:
    """The entropy term computed separately on the even and odd samples of the batch, averaged."""

    def __init__(self, reg):
        self.reg = reg

    def __call__(self):
        captured = self.reg._captured
        saved = {n: (c.x, c.out, c.live) for n, c in captured.items()}
        parts = []
        for r in range(2):
            for n, c in captured.items():
                x, out, live = saved[n]
                c.x, c.out = x[r::2], out[r::2]
                c.live = None if live is None else live[r::2]
            parts.append(self.reg())
        return (parts[0] + parts[1]) / 2
