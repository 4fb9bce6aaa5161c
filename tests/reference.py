"""The per-sample oracle: statistics computed directly from the N x O x I contribution tensor.

Deliberately naive and independent of relprune's matrix-product code: it
builds im2col rows with ``Tensor.unfold`` and checks them against the layer's
own output before using them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-12


def patches(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample input rows (N, groups, I) and output layout helper for any supported layer."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1]), torch.tensor(0)
    d = layer.weight.dim() - 2
    pad = layer._reversed_padding_repeated_twice
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    for i in range(d):
        k, s, dil = layer.kernel_size[i], layer.stride[i], layer.dilation[i]
        xp = xp.unfold(2 + i, (k - 1) * dil + 1, s)[..., ::dil]
    # xp: (B, C, *out_spatial, *kernel) -> (B * positions, C, kernel volume)
    b, c = xp.shape[:2]
    out_spatial = xp.shape[2:2 + d]
    xp = xp.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    rows = xp.reshape(-1, c * int(torch.tensor(layer.kernel_size).prod()))
    g = layer.groups
    return rows.reshape(rows.shape[0], g, -1), torch.tensor([b, *out_spatial])


def contributions(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """c (N, O, I) and pre-activation z (N, O), validated against ``layer(x)``."""
    rows, _out_shape = patches(layer, x)
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    g = rows.shape[1]
    og = w.shape[0] // g
    c = torch.cat([w[i * og:(i + 1) * og][None] * rows[:, i, None, :] for i in range(g)], dim=1)
    z = c.sum(-1)
    if layer.bias is not None:
        z = z + layer.bias.detach()
    y = layer(x).detach()
    if isinstance(layer, nn.Linear):
        y_rows = y.reshape(-1, y.shape[-1])
    else:
        y_rows = y.movedim(1, -1).reshape(-1, y.shape[1])
    torch.testing.assert_close(z, y_rows, rtol=1e-9, atol=1e-9)
    return c, z


def to_rows(layer: nn.Module, t: Tensor) -> Tensor:
    """An output-shaped tensor as (N, O) rows matching :func:`contributions`."""
    if isinstance(layer, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def reference_stats(layer: nn.Module, xs: list[Tensor], live_fn=None) -> dict[str, Tensor]:
    """All statistics over the batches ``xs``; ``live_fn(z_rows) -> bool (N, O)`` (None: all live)."""
    cs, lives, _bs = [], [], []
    for x in xs:
        c, z = contributions(layer, x)
        cs.append(c)
        lives.append(torch.ones_like(z, dtype=torch.bool) if live_fn is None else live_fn(z))
    c = torch.cat(cs)
    live = torch.cat(lives).to(c.dtype)[:, :, None]
    n = live.sum(0)
    bias = layer.bias.detach().abs() if layer.bias is not None else torch.zeros(c.shape[1], dtype=c.dtype)
    r = c.abs() / (c.abs().sum(-1, keepdim=True) + bias[None, :, None] + EPS)
    w = layer.weight.detach()
    x_rows = torch.cat([patches(layer, x)[0] for x in xs])  # (N, groups, I)
    x_rows = x_rows.repeat_interleave(c.shape[1] // x_rows.shape[1], dim=1)  # (N, O, I)

    def mean(t):
        return (live * t).sum(0) / n.clamp_min(1)

    def std(t):
        m = mean(t)
        return ((live * (t - m) ** 2).sum(0) / n.clamp_min(1)).sqrt()

    shape = w.shape
    return {
        "live_count": n[:, 0],
        "total_count": torch.tensor(c.shape[0]),
        "contribution_mean": mean(c).reshape(shape),
        "contribution_std": std(c).reshape(shape),
        "abs_contribution_mean": mean(c.abs()).reshape(shape),
        "relative_mean": mean(r).reshape(shape),
        "relative_std": std(r).reshape(shape),
        "input_sq_mean": mean(x_rows**2).reshape(shape),
    }
