"""SparseGPT and fixed-mask reconstruction against a port of the reference algorithm's lines."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import relprune
from relprune.core.masks import mask_of, original_weight
from relprune.core.reconstruct import refit, refit_from, sparsegpt
from relprune.errors import SparsityError


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt ``SparseGPT.fasterprune``, its lines kept, quantisation and logging removed.

    Returns the pruned weight; H is the accumulated 2/n X X^T (any positive scale gives the same result).
    """
    W = W.clone().float()
    H = H.clone().float()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    mask = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def reference_hessian(x):
    """``add_batch`` of the reference for one batch of shape (samples, tokens, I)."""
    n = x.shape[0]
    inp = math.sqrt(2 / n) * x.reshape(-1, x.shape[-1]).t().float()
    return inp @ inp.t()


def layer_and_inputs(o, i, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Correlated, uneven inputs, as real activations are: a random mixing of scaled sources.
    x = (torch.randn(4, tokens // 4, i, generator=g) * torch.rand(i, generator=g) * 3) @ (
        torch.eye(i) + 0.3 * torch.randn(i, i, generator=g))
    return torch.randn(o, i, generator=g), x


@pytest.mark.parametrize("o, i, sparsity", [(16, 64, 0.5), (24, 200, 0.7), (8, 130, 0.6)])
def test_sparsegpt_unstructured_equals_reference(o, i, sparsity):
    w, x = layer_and_inputs(o, i)
    ref = reference_fasterprune(w, reference_hessian(x), sparsity)
    ours, keep = sparsegpt(w, x.reshape(-1, i).t() @ x.reshape(-1, i), sparsity=sparsity)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep, ref != 0) or (keep >= (ref != 0)).all()


@pytest.mark.parametrize("n_keep, m", [(2, 4), (4, 8)])
def test_sparsegpt_n_m_equals_reference(n_keep, m):
    w, x = layer_and_inputs(12, 64)
    ref = reference_fasterprune(w, reference_hessian(x), 0, prunen=m - n_keep, prunem=m)
    ours, keep = sparsegpt(w, reference_hessian(x), n_m=(n_keep, m))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (keep.reshape(12, -1, m).sum(-1) == n_keep).all()


@pytest.mark.parametrize("method", ["exact", "obs"])
def test_refit_lowers_output_error_of_any_mask_and_keeps_it(method):
    w, x = layer_and_inputs(32, 96, tokens=800)
    rows = x.reshape(-1, 96)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.6
    new = refit(w, rows.t() @ rows, keep, method=method)
    assert ((new != 0) <= keep).all()
    dense = rows @ w.t()
    before = ((rows @ (w * keep).t() - dense) ** 2).sum()
    after = ((rows @ new.t() - dense) ** 2).sum()
    assert after < before


def test_obs_refit_with_a_fixed_mask_equals_reference_with_that_mask():
    w, x = layer_and_inputs(16, 64)
    ref = reference_fasterprune(w, reference_hessian(x), 0.5)
    ours = refit(w, reference_hessian(x), ref != 0, method="obs")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_exact_refit_is_per_row_least_squares_on_the_kept_columns(seed):
    w, x = layer_and_inputs(6, 20, tokens=400)
    rows = x.reshape(-1, 20).double()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    new = refit(w.double(), rows.t() @ rows, keep, percdamp=1e-12, tol=1e-12)
    target = rows @ w.double().t()
    for r in range(6):
        cols = keep[r].nonzero().flatten()
        sol = torch.linalg.lstsq(rows[:, cols], target[:, r:r + 1]).solution.flatten()
        torch.testing.assert_close(new[r, cols], sol, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [5, 6])
def test_warm_refit_reaches_the_per_row_least_squares_from_any_start_and_stays_at_it(seed, dtype):
    w, x = layer_and_inputs(7, 24, tokens=400, seed=seed)
    rows = x.reshape(-1, 24).double()
    gram = rows.t() @ rows
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    keep[0] = True  # a row keeping every weight comes back as it was
    damp = 0.01 * gram.diagonal().mean()
    damped = gram + damp * torch.eye(24, dtype=torch.float64)
    expected = torch.zeros(7, 24, dtype=torch.float64)
    for r in range(7):
        cols = keep[r].nonzero().flatten()
        expected[r, cols] = torch.linalg.solve(damped[cols][:, cols], (damped @ w[r].double())[cols])
    start = torch.randn(7, 24, generator=torch.Generator().manual_seed(seed + 10), dtype=dtype)
    new = refit_from(w.to(dtype), gram.to(dtype), keep, start, max_iter=200, tol=1e-12)
    assert new.dtype == dtype and ((new != 0) <= keep).all()
    assert torch.equal(new[0], w[0].to(dtype))
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(new.double(), expected, rtol=tol, atol=tol)
    # No iterations: the start on the mask; from the solution itself, the iterations have nothing left to do.
    untouched = refit_from(w.to(dtype), gram.to(dtype), keep, start, max_iter=0)
    assert torch.equal(untouched[1:], (start * keep)[1:])
    again = refit_from(w.double(), gram, keep, expected, max_iter=3, tol=1e-9)
    torch.testing.assert_close(again, expected, rtol=1e-8, atol=1e-10)


def test_warm_refit_refuses_a_start_or_mask_of_another_shape():
    w = torch.randn(4, 8)
    with pytest.raises(SparsityError, match="must match"):
        refit_from(w, torch.eye(8), torch.ones(4, 8, dtype=torch.bool), torch.zeros(4, 7))
    with pytest.raises(SparsityError, match="must match"):
        refit_from(w, torch.eye(8), torch.ones(8, 4, dtype=torch.bool), torch.zeros(4, 8))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def test_prune_with_reconstruction_and_sparsegpt_criterion():
    model = mlp()
    data = [torch.randn(64, 16) for _ in range(4)]
    stats = relprune.collect_stats(model, data, statistics=["input_sq_mean", "input_gram"])
    plain, refitted, sgpt = (relprune.copy_model(model) for _ in range(3))
    m1 = relprune.prune(plain, stats, sparsity=0.6, criterion="wanda", scope="row")
    m2 = relprune.prune(refitted, stats, sparsity=0.6, criterion="wanda", scope="row", reconstruct=True)
    for name in m1:
        assert torch.equal(m1[name], m2[name])  # the mask is the criterion's; only kept weights move
    relprune.prune(sgpt, stats, sparsity=0.6, criterion="sparsegpt")
    # Each layer is re-fitted to its own dense outputs on its calibration inputs.
    x = torch.cat(data)
    dense0 = model[0](x)

    def error(m):
        return ((m[0](x) - dense0) ** 2).sum()

    assert error(refitted) < error(plain) and error(sgpt) < error(plain)
    for m in (refitted, sgpt):
        for layer in (m[0], m[2]):
            assert torch.equal(layer.weight, original_weight(layer) * mask_of(layer))


def test_reconstruction_needs_the_gram_and_refuses_bias_compensation():
    model = mlp()
    stats = relprune.collect_stats(model, [torch.randn(8, 16)], statistics=["input_sq_mean"])
    with pytest.raises(relprune.StatisticNotCollectedError, match="input_gram"):
        relprune.prune(model, stats, sparsity=0.5, criterion="wanda", reconstruct=True)
    with pytest.raises(relprune.RelpruneError, match="twice"):
        relprune.prune(model, stats, sparsity=0.5, criterion="wanda", reconstruct=True, bias_compensation=True)
    with pytest.raises(relprune.SparsityError, match="chooses its own mask"):
        relprune.prune(model, stats, threshold=0.5, criterion="sparsegpt")


def test_input_gram_matches_per_token_reference_with_padding():
    layer = nn.Linear(5, 3)
    x = torch.randn(2, 7, 5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer

        def forward(self, hidden, attention_mask):
            return self.fc(hidden)

    stats = relprune.collect_stats(Wrap(), [{"hidden": x, "attention_mask": mask}],
                                   statistics=["input_gram", "input_sq_mean"])
    kept = x[mask.bool()].double()
    torch.testing.assert_close(stats["fc"].input_gram, kept.t() @ kept / len(kept))
    torch.testing.assert_close(stats["fc"].input_sq_mean, (kept**2).mean(0).expand(3, 5))


def test_obs_saliency_with_uncorrelated_inputs_is_w_squared_times_damped_second_moment():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.zeros(40, 4)
    for j in range(4):
        x[j * 10:(j + 1) * 10, j] = j + 1.0  # one input active at a time: H is diagonal
    stats = relprune.collect_stats(model, [x], statistics=["input_gram"])
    h = stats["0"].input_gram
    assert torch.count_nonzero(h - torch.diag(torch.diag(h))) == 0
    damped = torch.diag(h) + 0.01 * torch.diag(h).mean()
    score = relprune.CRITERIA["obs"].score(model[0].weight.detach(), stats["0"], {})
    torch.testing.assert_close(score, model[0].weight.detach().double() ** 2 * damped)


def test_sparsegpt_with_exact_refit_keeps_its_mask_and_lowers_the_error():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    x = torch.randn(256, 64) @ (torch.eye(64) + 0.4 * torch.randn(64, 64))
    stats = relprune.collect_stats(nn.Sequential(layer), [x], statistics=["input_gram"])
    a, b = nn.Sequential(relprune.copy_model(layer)), nn.Sequential(relprune.copy_model(layer))
    ma = relprune.prune(a, stats, sparsity=0.6, criterion="sparsegpt")
    mb = relprune.prune(b, stats, sparsity=0.6, criterion="sparsegpt", reconstruct=True)
    assert torch.equal(ma["0"], mb["0"])
    dense = layer(x)
    assert ((b(x) - dense) ** 2).sum() <= ((a(x) - dense) ** 2).sum()


def _receptive_fields(x, conv):
    """Reference im2col by explicit loops: one row per (image, output position), (C, kh, kw) order."""
    pad_h, pad_w = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
    xp = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    rows = []
    for b in range(x.shape[0]):
        for i in range(0, xp.shape[2] - dh * (kh - 1), sh):
            for j in range(0, xp.shape[3] - dw * (kw - 1), sw):
                rows.append(xp[b, :, i:i + dh * kh:dh, j:j + dw * kw:dw].reshape(-1))
    return torch.stack(rows).double()


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=2),
                                    dict(kernel_size=3, dilation=2, padding=2, bias=False)])
def test_conv_input_gram_is_the_gram_of_its_receptive_fields(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs)
    x = torch.randn(2, 3, 7, 6)
    stats = relprune.collect_stats(nn.Sequential(conv), [x], statistics=["input_gram"])
    rows = _receptive_fields(x, conv)
    assert len(rows) == conv(x).shape[0] * conv(x).shape[2] * conv(x).shape[3]
    torch.testing.assert_close(stats["0"].input_gram, rows.t() @ rows / len(rows))


def test_conv1d_gram_matches_the_equivalent_conv2d():
    torch.manual_seed(0)
    c1 = nn.Conv1d(3, 4, 3, padding=1)
    c2 = nn.Conv2d(3, 4, (1, 3), padding=(0, 1))
    x = torch.randn(2, 3, 9)
    g1 = relprune.collect_stats(nn.Sequential(c1), [x], statistics=["input_gram"])["0"].input_gram
    g2 = relprune.collect_stats(nn.Sequential(c2), [x.unsqueeze(2)], statistics=["input_gram"])["0"].input_gram
    torch.testing.assert_close(g1, g2)


def test_prune_with_reconstruction_on_a_cnn_lowers_each_layers_error_and_refuses_grouped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()
    xs = [torch.randn(16, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    stats = relprune.collect_stats(model, xs, statistics=["input_gram"])
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    relprune.prune(plain, stats, sparsity=0.6, criterion="magnitude")
    relprune.prune(model, stats, sparsity=0.6, criterion="magnitude", reconstruct=True)
    x = xs[0]
    first = lambda m: m[0](x)  # noqa: E731 - the first layer sees the same inputs in all three
    assert (first(model) - first(dense)).norm() < (first(plain) - first(dense)).norm()
    assert torch.equal(mask_of(model[0]), mask_of(plain[0]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(relprune.RelpruneError, match="groups=2"):
        relprune.collect_stats(grouped, [torch.randn(2, 4, 5, 5)], statistics=["input_gram"])


def test_conv_refit_lowers_output_error_against_per_position_least_squares():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    xs = [torch.randn(6, 2, 5, 5, dtype=torch.float64)]
    stats = relprune.collect_stats(nn.Sequential(conv), xs, statistics=["input_gram"])
    w = conv.weight.detach().reshape(3, -1)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    new = refit(w, stats["0"].input_gram, keep, percdamp=1e-12, tol=1e-12)
    rows = _receptive_fields(xs[0], conv)
    target = rows @ w.t()
    for r in range(3):
        cols = keep[r].nonzero().flatten()
        sol = torch.linalg.lstsq(rows[:, cols], target[:, r:r + 1]).solution.flatten()
        torch.testing.assert_close(new[r, cols], sol, rtol=1e-4, atol=1e-6)


def test_obs_saliency_on_a_conv_is_per_weight_in_the_weights_shape():
    from relprune.core.criteria import get_criterion
    from relprune.core.reconstruct import PERCDAMP, damped_inverse_diagonal

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 3)).double()
    stats = relprune.collect_stats(nn.Sequential(conv), [torch.randn(4, 2, 5, 5, dtype=torch.float64)],
                                   statistics=["input_gram"])
    got = get_criterion("obs").score(conv.weight.detach(), stats["0"], {})
    inv = damped_inverse_diagonal(stats["0"].input_gram, PERCDAMP).reshape(2, 2, 3)
    want = conv.weight.detach() ** 2 / inv.unsqueeze(0)
    torch.testing.assert_close(got, want)
