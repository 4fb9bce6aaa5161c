"""Masks chosen together with the weights: ADMM on the layer-wise L0-constrained least squares, and
a gradual schedule that re-chooses the mask on re-fitted weights.

Both solve, for one O x I layer with input Gram matrix H = X^T X (damped),

    min_W' ||X W^T - X W'^T||^2   subject to W' having the pattern's number of non-zeros,

which a criterion-then-re-fit recipe only approximates (its mask is chosen before the weights move).

- :func:`admm_prune` follows ALPS (Meng et al. 2024): in the coordinates where H has a unit
  diagonal, alternate a ridge step B = (H + rho I)^-1 (H W + rho D - V), a projection D of
  B + V / rho onto the pattern (largest magnitudes), and a dual step V += rho (B - D); rho grows
  while the support still changes and the support is fixed once it settles; the kept weights are
  then re-fitted exactly on it, by conjugate gradients started from ADMM's own weights
  (:func:`relprune.core.reconstruct.refit_from`, ALPS's back-solve). ``group="row"`` (our
  default, as every other language-model recipe here) keeps the same count in every output row;
  ``group="layer"`` projects over the whole layer, as the ALPS reference does.
- :func:`gradual_prune` raises the sparsity in ``steps``; at each step the mask is re-chosen by the
  optimal-brain-surgeon saliency w^2 / [(H + lambda I)^-1]_jj of the *re-fitted* weights (never
  reviving a removed weight), and the kept weights are re-fitted from the dense ones.

Both take a sparsity (unstructured) or N:M (N kept of every M consecutive inputs of a row).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import RelpruneError, SingularGramError, SparsityError
from .allocation import check_sparsity, parse_n_m, removal_count
from .reconstruct import PERCDAMP, cholesky_or_none, damped_gram, damped_inverse_diagonal, refit, refit_from
from .threads import bounded_threads

#: ALPS's published settings (its reference code's defaults for LLaMA and OPT).
RHO = 0.1
MAX_ITER = 300
UPDATE_ITER = 3
SWITCH_ITER = 30
#: Conjugate-gradient iterations of the re-fit that follows, started from ADMM's weights (ALPS's back-solve).
REFIT_ITER = 10
GROUPS = ("row", "layer")


def _check_budget(weight: Tensor, sparsity: float | None, n_m: tuple[int, int] | None) -> None:
    if (sparsity is None) == (n_m is None):
        raise SparsityError("give exactly one of sparsity= and n_m=")
    if n_m is not None:
        _, m = parse_n_m(n_m)
        if weight.shape[1] % m:
            raise SparsityError(f"N:M with M={m} needs the input size {weight.shape[1]} to be a multiple of M")
    else:
        check_sparsity(sparsity)


def project(values: Tensor, *, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
            group: str = "row") -> Tensor:
    """Keep-mask of the largest ``|values|`` under the pattern (ties in any order: a selection, which
    ADMM needs every step, is faster than the stable sort :mod:`.allocation` uses).

    Unstructured: ``removal_count(sparsity, ...)`` removed per row (``group="row"``) or over the
    whole matrix (``"layer"``); N:M: N kept of every M consecutive entries of a row.
    """
    return keep_largest(values.abs(), sparsity=sparsity, n_m=n_m, group=group)


def keep_largest(scores: Tensor, *, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
                 group: str = "row") -> Tensor:
    """Keep-mask of the largest ``scores`` under the pattern (see :func:`project`; -inf goes first).

    A row (or layer) budget thresholds at the k-th smallest value (a quickselect: half the time of
    ``topk`` on SmolLM2's layer shapes, and ADMM projects every step), with ``topk`` only where ties
    straddle the threshold; N:M groups use ``topk``.
    """
    if n_m is not None:
        n, m = n_m
        groups = scores.reshape(-1, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        drop = torch.topk(groups, m - n, dim=1, largest=False).indices
        return keep.scatter_(1, drop, False).reshape(scores.shape)
    if group == "row":
        return _keep_above_kth(scores, removal_count(sparsity, scores.shape[1]))
    return _keep_above_kth(scores.reshape(1, -1), removal_count(sparsity, scores.numel())).reshape(scores.shape)


def _keep_above_kth(scores: Tensor, count: int) -> Tensor:
    """Per row, False for the ``count`` smallest scores (ties in any order), True elsewhere."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if not count:
        return keep
    threshold = torch.kthvalue(scores, count, dim=1, keepdim=True).values
    keep = scores > threshold
    tied = (keep.sum(1) != scores.shape[1] - count).nonzero().flatten()
    if len(tied):
        # Entries equal to the threshold straddle it: choose among them as topk does.
        rows = torch.ones_like(scores[tied], dtype=torch.bool)
        rows.scatter_(1, torch.topk(scores[tied], count, dim=1, largest=False).indices, False)
        keep[tied] = rows
    return keep


def layer_error(weight: Tensor, new: Tensor, hessian: Tensor) -> float:
    """tr((W - W') H (W - W')^T): the squared output error of ``new`` against ``weight`` on the inputs."""
    d = (weight.double() - new.double())
    return float(((d @ hessian.double()) * d).sum())


def admm_prune(weight: Tensor, hessian: Tensor, *, sparsity: float | None = None,
               n_m: tuple[int, int] | None = None, group: str = "row", rho: float = RHO, max_iter: int = MAX_ITER,
               update_iter: int = UPDATE_ITER, switch_iter: int = SWITCH_ITER,
               percdamp: float = PERCDAMP) -> tuple[Tensor, Tensor]:
    """(new weight, keep-mask) of one O x I layer by ADMM with ALPS's penalty schedule, then the exact re-fit."""
    _check_budget(weight, sparsity, n_m)
    if group not in GROUPS:
        raise SparsityError(f"group must be one of {GROUPS}, got {group!r}")
    if not (rho > 0 and math.isfinite(rho)):
        raise RelpruneError(f"the ADMM penalty rho must be a positive number, got {rho!r}")
    for name, value in (("max_iter", max_iter), ("update_iter", update_iter)):
        if not (isinstance(value, int) and value >= 1):
            raise RelpruneError(f"{name} must be a whole number >= 1, got {value!r}")
    if not (isinstance(switch_iter, int) and switch_iter >= 0):
        raise RelpruneError(f"switch_iter must be a whole number >= 0, got {switch_iter!r}")
    budget = {"sparsity": sparsity, "n_m": n_m, "group": group}
    if not bool(torch.isfinite(hessian).all()):
        raise SingularGramError("the input second moment holds NaN or Inf; collect the statistics again from "
                                "finite activations")
    h, dead, _ = damped_gram(hessian, percdamp)
    scale = h.diagonal().sqrt()
    # In place, and each I x I copy dropped once spent: they are the largest part of the layer's working set,
    # which is what puts the default's peak memory above SparseGPT's.
    hn = h.div_(scale.reshape(-1, 1)).div_(scale.reshape(1, -1))
    del h
    w = weight.detach().double().clone()
    w[:, dead] = 0
    b0 = (w * scale).float()  # rows of W in the unit-diagonal coordinates
    target = (b0.double() @ hn).float()
    # float32 is enough for the ridge steps and 2x faster than float64 (see _Ridge).
    ridge = _Ridge(hn.float(), rows=weight.shape[0])
    del hn, w

    keep = project(b0, **budget)
    kept_total = int(keep.sum())
    d = b0 * keep
    d_init = d.clone()
    v = torch.zeros_like(b0)
    b = b0
    grew = False
    # The iterations' element-wise steps write into fresh or owned buffers (each value computed as before, in the
    # same order): a third fewer passes over the layer per iteration.
    for step in range(max_iter):
        rhs = torch.sub(target, v)
        rhs.add_(rho * d)
        b = ridge(rhs, rho)
        z = torch.div(v, rho).add_(b)
        new_keep = project(z, **budget)
        d = z.mul_(new_keep)
        v.add_(torch.sub(b, d).mul_(rho))
        if (step + 1) % update_iter:
            continue
        change = float((new_keep != keep).sum()) / max(kept_total, 1)
        keep = new_keep
        # ALPS's schedule: raise rho while the support moves; if it never moved, lower rho and restart.
        if change > 0.1:
            grew, rho = True, rho * 1.3
        elif change > 0.005:
            grew, rho = True, rho * 1.2
        elif change > 0:
            if grew:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = b0.clone(), d_init.clone(), torch.zeros_like(b0)
        elif grew:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        if step >= switch_iter and change < 0.0003:
            break
    keep = project(b, **budget) & ~dead.reshape(1, -1)
    del ridge, v, d, d_init, target  # the re-fit below builds its own Gram copy
    start = b.double() / scale  # back from the unit-diagonal coordinates
    return refit_from(weight.detach(), hessian, keep, start, max_iter=REFIT_ITER, percdamp=percdamp), keep


class _Ridge:
    """B = rhs (H + rho I)^-1 for the ADMM steps, from the upper Cholesky factor U of H + rho I, formed each time
    rho moves (every ``update_iter`` steps at most, as ALPS's reference forms its inverse).

    Layers with fewer rows than inputs take two triangular solves a step with U; the others one product with
    the inverse formed from U, as the reference does (fewer flops over the steps that share a rho). No
    eigendecomposition: its time explodes beside busy processes. The factor and the inverse are formed on one
    thread, so a prune gives the same bits whatever thread count torch has (block-by-block pruning changes it
    with the machine's load; LAPACK's Cholesky rounds differently on two threads, the solves and products do not).
    """

    def __init__(self, gram: Tensor, rows: int) -> None:
        self.gram = gram
        self.solves = rows < gram.shape[0]
        self.rho: float | None = None
        self.factor: Tensor | None = None  # U, on the triangular-solve route
        self.inverse: Tensor | None = None  # (H + rho I)^-1, on the product route

    def __call__(self, rhs: Tensor, rho: float) -> Tensor:
        if rho != self.rho:
            self.factor = self.inverse = None  # freed before the next one is formed
            factor = ridge_factor(self.gram, rho)
            if self.solves:
                self.factor = factor
            else:
                with bounded_threads():
                    self.inverse = torch.cholesky_inverse(factor, upper=True)
            self.rho = rho
        if self.inverse is not None:
            return rhs @ self.inverse
        # rhs U^-1 U^-T: B (U^T U) = rhs.
        x = torch.linalg.solve_triangular(self.factor, rhs, upper=True, left=False)
        return torch.linalg.solve_triangular(self.factor.mT, x, upper=False, left=False)


def ridge_factor(gram: Tensor, rho: float) -> Tensor:
    """Upper Cholesky factor U of gram + rho I (U^T U), in ``gram``'s dtype, on one thread (the same bits on any
    machine load); from a float64 factorisation where ``gram``'s own precision loses positive definiteness (a
    small ``rho`` beside a nearly singular Gram)."""
    shifted = gram.clone()
    shifted.diagonal().add_(rho)
    with bounded_threads():
        factor = cholesky_or_none(shifted, upper=True)
        del shifted
        if factor is not None:
            return factor
        shifted = gram.double()
        shifted.diagonal().add_(rho)
        factor = cholesky_or_none(shifted, upper=True)
    if factor is None:
        raise SingularGramError(f"the scaled input second moment plus the ADMM penalty {rho:g} is not positive "
                                "definite; raise the damping (percdamp) or collect more calibration tokens")
    return factor.to(gram.dtype)


def gradual_prune(weight: Tensor, hessian: Tensor, *, sparsity: float | None = None,
                  n_m: tuple[int, int] | None = None, steps: int = 4,
                  percdamp: float = PERCDAMP) -> tuple[Tensor, Tensor]:
    """(new weight, keep-mask): the sparsity raised in ``steps`` equal steps per row (N:M: one fewer
    kept per group of M each step), each mask chosen on the previous step's re-fitted weights."""
    _check_budget(weight, sparsity, n_m)
    if not (isinstance(steps, int) and steps >= 1):
        raise RelpruneError(f"steps must be a whole number >= 1, got {steps!r}")
    dead = torch.diag(hessian) == 0
    inv_diag = damped_inverse_diagonal(hessian, percdamp).reshape(1, -1)
    dense = weight.detach()
    current = dense.double().clone()
    current[:, dead] = 0
    keep = torch.ones_like(dense, dtype=torch.bool) & ~dead.reshape(1, -1)
    if n_m is not None:
        n, m = n_m
        schedule = [("nm", (k, m)) for k in range(m - 1, n - 1, -1)]
    else:
        schedule = [("s", sparsity * (k + 1) / steps) for k in range(steps)]
    for kind, target in schedule:
        # Removed weights score -inf, below every kept one, so they are never revived.
        score = torch.where(keep, current**2 / inv_diag, torch.full_like(current, -math.inf))
        chosen = keep_largest(score, n_m=target) if kind == "nm" else keep_largest(score, sparsity=target)
        keep = chosen & keep
        current = refit(dense, hessian, keep, method="exact", percdamp=percdamp).double()
    return current.to(weight.dtype), keep
