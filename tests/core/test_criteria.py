"""Each criterion against a hand computation from its definition."""

from __future__ import annotations

import torch
from torch import nn

import relprune
from relprune.core.criteria import CRITERIA, get_criterion


def _model_and_stats(labels=True):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])] if labels else [x[:20], x[20:]]
    return model, x, y, relprune.collect_stats(model, batches)


def test_every_method_md_criterion_is_registered():
    for name in ["rc", "rc-ucb", "contrib-std", "contrib-share", "magnitude", "random", "wanda", "ria",
                 "snip", "taylor"]:
        assert name in CRITERIA


def test_scores_from_definitions():
    model, x, _, stats = _model_and_stats()
    ls = stats["2"]  # last layer: always live, so plain means over all samples
    w = model[2].weight.detach()
    h = torch.relu(model[0](x)).detach()
    rms = h.pow(2).mean(0).sqrt()
    opts = {"generator": torch.Generator().manual_seed(0)}
    torch.testing.assert_close(CRITERIA["wanda"].score(w, ls, opts), w.abs() * rms)
    absw = w.abs()
    ria = (absw / absw.sum(1, keepdim=True) + absw / absw.sum(0, keepdim=True)) * rms.sqrt()
    torch.testing.assert_close(CRITERIA["ria"].score(w, ls, opts), ria)
    var = (w * h.std(0, unbiased=False)) ** 2
    torch.testing.assert_close(CRITERIA["contrib-share"].score(w, ls, opts), var / var.sum(1, keepdim=True))
    torch.testing.assert_close(CRITERIA["contrib-std"].score(w, ls, opts), var.sqrt())
    c = (w[None] * h[:, None]).abs()
    r = c / (c.sum(-1, keepdim=True) + model[2].bias.detach().abs()[None, :, None] + 1e-12)
    torch.testing.assert_close(CRITERIA["rc"].score(w, ls, opts), r.mean(0))
    ucb = CRITERIA["rc-ucb"].score(w, ls, {**opts, "ucb_k": 2.0})
    torch.testing.assert_close(ucb, r.mean(0) + 2 * r.std(0, unbiased=False))
    torch.testing.assert_close(CRITERIA["magnitude"].score(w, ls, opts), w.abs())


def test_snip_is_weight_times_mean_batch_gradient():
    model, x, y, stats = _model_and_stats()
    grads = []
    for sl in (slice(0, 20), slice(20, 40)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        grads.append(model[0].weight.grad.clone())
    w = model[0].weight.detach()
    expected = (w * (grads[0] + grads[1]) / 2).abs()
    torch.testing.assert_close(get_criterion("snip").score(w, stats["0"], {}), expected)


def test_random_is_seeded():
    w = torch.zeros(4, 4)
    a = CRITERIA["random"].score(w, None, {"generator": torch.Generator().manual_seed(3)})
    b = CRITERIA["random"].score(w, None, {"generator": torch.Generator().manual_seed(3)})
    assert torch.equal(a, b)


def test_register_adds_a_criterion():
    @relprune.register("test-neg-magnitude", description="test only")
    def neg(weight, stats, opts):
        return -weight.abs().double()

    try:
        model = nn.Sequential(nn.Linear(4, 4))
        w = model[0].weight.detach().clone()
        masks = relprune.prune(model, None, sparsity=0.25, criterion="test-neg-magnitude")
        assert w.abs()[~masks["0"]].min() >= w.abs()[masks["0"]].max()
    finally:
        del CRITERIA["test-neg-magnitude"]


def test_ria_on_a_grouped_conv_equals_the_block_diagonal_linear():
    """RIA's column sum runs over the outputs that see an input: its group's, never another group's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    linear = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        for o in range(4):
            g = o // 2
            linear.weight[o, 2 * g:2 * g + 2] = conv.weight[o, :, 0, 0]
    x = torch.randn(64, 4)
    sc = relprune.collect_stats(nn.Sequential(conv), [x.reshape(64, 4, 1, 1)], statistics=["input_sq_mean"])
    sl = relprune.collect_stats(nn.Sequential(linear), [x], statistics=["input_sq_mean"])
    ria = relprune.CRITERIA["ria"].score
    a = ria(conv.weight.detach(), sc["0"], {})
    b = ria(linear.weight.detach(), sl["0"], {})
    for o in range(4):
        g = o // 2
        torch.testing.assert_close(a[o, :, 0, 0], b[o, 2 * g:2 * g + 2])


def test_data_driven_scores_use_the_weight_passed_in():
    model = nn.Sequential(nn.Linear(6, 3))
    stats = relprune.collect_stats(model, [torch.randn(16, 6)], statistics=["input_sq_mean"])
    w = torch.randn(3, 6)
    for name in ("wanda", "ria"):
        score = relprune.CRITERIA[name].score(w, stats["0"], {})
        assert torch.equal(score == 0, w == 0) and not torch.equal(
            score, relprune.CRITERIA[name].score(model[0].weight.detach(), stats["0"], {}))
