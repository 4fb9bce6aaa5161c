"""Mask refinement without training (in the manner of DSnoT, Zhang et al. 2024): swap pruned and kept
weights within a row while the contributions' second moments say the swap lowers the output error.

Without a re-fit, row r of a layer pruned by a keep-mask m loses the contributions c_j = w_j x_j of
its removed inputs; the expected squared error is e = d^T H d with d = w * (1 - m) and
H = E[x x^T] (the Gram matrix the statistics already hold: E[c_j c_k] = w_j w_k H_jk). Restoring
a removed j and removing a kept k changes it by

    2 w_k g_k + w_k^2 H_kk - 2 w_j g_j + w_j^2 H_jj - 2 w_j w_k H_jk,   g = H d,

so each step restores the j whose return lowers e most and removes the k that then costs least
(within j's group of M for N:M), and is taken only when the change is negative: the error never
rises, the count per row (and per group) never changes. All rows move at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import RelpruneError, SparsityError

#: Swaps per row at most. On a 256 x 512 layer with outlier inputs the error stops falling well before.
MAX_SWAPS = 64


def row_errors(weight: Tensor, hessian: Tensor, keep: Tensor) -> Tensor:
    """d^T H d per row, d the removed part of the row: the output error of the mask without a re-fit."""
    d = weight.double() * (~keep)
    return ((d @ hessian.double()) * d).sum(1)


def refine_mask(weight: Tensor, hessian: Tensor, keep: Tensor, *, n_m: tuple[int, int] | None = None,
                fixed: Tensor | None = None, max_swaps: int = MAX_SWAPS, tol: float = 1e-9) -> Tensor:
    """The keep-mask after greedy error-lowering swaps within each row (or each N:M group).

    ``fixed`` marks removed weights that must stay removed (pruned earlier)."""
    if keep.shape != weight.shape or weight.dim() != 2:
        raise SparsityError(f"refine_mask takes an O x I weight and a mask of its shape, got {tuple(weight.shape)} "
                            f"and {tuple(keep.shape)}")
    if hessian.shape != (weight.shape[1],) * 2:
        raise SparsityError(f"the Gram matrix must be {weight.shape[1]} x {weight.shape[1]}, "
                            f"got {tuple(hessian.shape)}")
    if not (isinstance(max_swaps, int) and max_swaps >= 0):
        raise RelpruneError(f"max_swaps must be a whole number >= 0, got {max_swaps!r}")
    if n_m is not None and weight.shape[1] % n_m[1]:
        raise SparsityError(f"N:M with M={n_m[1]} needs the input size {weight.shape[1]} to be a multiple of M")
    w = weight.detach().double()
    h = hessian.detach().double().to(w.device)
    hd = h.diagonal().reshape(1, -1)
    keep = keep.detach().bool().clone()
    g = (w * ~keep) @ h
    rows = torch.arange(w.shape[0], device=w.device)
    column_group = None if n_m is None else torch.arange(w.shape[1], device=w.device) // n_m[1]
    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    scale = row_errors(w, h, keep).clamp_min(torch.finfo(torch.float64).tiny)
    frozen = torch.zeros_like(keep) if fixed is None else fixed.detach().to(keep.device).bool()
    for _ in range(max_swaps):
        restore = torch.where(keep | frozen, inf, -2 * w * g + w**2 * hd)
        if n_m is None:
            j = restore.argmin(1)
        else:
            m = n_m[1]
            # The group whose best restore plus best removal (cross term aside) gains most.
            cost_k = torch.where(keep, 2 * w * g + w**2 * hd, inf)
            pair = restore.reshape(len(rows), -1, m).min(2).values + cost_k.reshape(len(rows), -1, m).min(2).values
            group = pair.argmin(1)
            j = group * m + restore.reshape(len(rows), -1, m)[rows, group].argmin(1)
        wj = w[rows, j]
        g_after = g - wj.reshape(-1, 1) * h[j]
        cost = torch.where(keep, 2 * w * g_after + w**2 * hd, inf)
        if column_group is not None:  # only within j's group of M
            cost = torch.where(column_group.reshape(1, -1) == column_group[j].reshape(-1, 1), cost, inf)
        k = cost.argmin(1)
        change = restore[rows, j] + cost[rows, k]
        take = active & torch.isfinite(change) & (change < -tol * scale)
        if not take.any():
            break
        r = rows[take]
        keep[r, j[take]] = True
        keep[r, k[take]] = False
        g[take] = g_after[take] + w[r, k[take]].reshape(-1, 1) * h[k[take]]
        active &= take
    return keep
