"""Re-fitting kept weights on calibration inputs: SparseGPT, and the same update with a mask given.

Both minimise ||X W^T - X W_hat^T||^2 over the kept entries of each row, by the optimal brain
surgeon update of Frantar & Alistarh (2023): columns are visited left to right; removing (or
rounding) column i's weights moves the error onto the columns not yet visited through the upper
Cholesky factor of H^-1, H = X^T X. Work is done on column blocks with lazy updates.

- ``sparsegpt`` chooses the mask itself, block by block, from w^2 / [H^-1]_ii^2 of the already
  updated weights (unstructured: the lowest ``sparsity`` share of each block of columns over all
  rows; N:M: the N lowest of every M consecutive columns of a row).
- ``refit`` takes a mask chosen by any criterion and re-fits the kept weights ("reconstruction";
  bias compensation is its zeroth-order case): by default exactly, each row's kept weights solving
  its own damped least squares (H_SS + lambda I) w_S = H_S: w; or, with ``method="obs"``, by the
  SparseGPT sweep above with the mask fixed, which only moves weights to the right of a removed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import RelpruneError, SingularGramError, SparsityError
from .threads import bounded_threads

BLOCKSIZE = 128
PERCDAMP = 0.01


def damped_gram(hessian: Tensor, percdamp: float, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """(H + lambda I in ``dtype``, the inputs that never fire, H's mean diagonal): never-firing inputs
    (zero diagonal) get a unit one first, and lambda is ``percdamp`` times the mean diagonal after that."""
    h = hessian.detach().to(dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    mean = torch.mean(torch.diag(h))
    h.diagonal().add_(percdamp * mean)
    return h, dead, mean


def cholesky_or_none(matrix: Tensor, *, upper: bool = False) -> Tensor | None:
    """The Cholesky factor of ``matrix`` (lower, or upper: U^T U), or None where it is not positive definite
    in its own precision (the callers each say what to do then: retry in float64, or name the damping)."""
    factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    return factor if int(info) == 0 and bool(torch.isfinite(factor).all()) else None


def damped_cholesky(hessian: Tensor, percdamp: float, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(lower Cholesky factor of H + lambda I, the inputs that never fire), lambda = ``percdamp`` x mean
    diagonal, never-firing inputs (zero diagonal) given a unit one.

    Raises :class:`SingularGramError` with the damping that would fix it (from H's smallest
    eigenvalue) when the damped matrix is still not positive definite.
    """
    h, dead, mean = damped_gram(hessian, percdamp, dtype)
    factor = cholesky_or_none(h)
    if factor is not None:
        return factor, dead
    if not bool(torch.isfinite(h).all()) or not float(mean) > 0:
        raise SingularGramError("the input second moment holds NaN, Inf or no positive diagonal; no damping "
                                "fixes it: collect the statistics again from finite activations")
    with bounded_threads():
        smallest = float(torch.linalg.eigvalsh(h.double()).min()) - percdamp * float(mean)
    needed = (-smallest / float(mean)) * 1.01 + 1e-6
    raise SingularGramError(
        f"the input second moment is not positive definite even with {percdamp:g} x its mean diagonal of "
        f"damping; a damping of {needed:.3g} would make it so (or use more calibration tokens)", needed)


def _upper_inverse_cholesky(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1 and the inputs that never fire (zero diagonal)."""
    factor, dead = damped_cholesky(hessian, percdamp, torch.float32)
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True), dead


def damped_inverse_diagonal(hessian: Tensor, percdamp: float) -> Tensor:
    """diag((H + lambda I)^-1) in float64, lambda = ``percdamp`` x mean diagonal (never-firing inputs: 1)."""
    factor, _ = damped_cholesky(hessian, percdamp)
    return torch.cholesky_inverse(factor).diagonal()


def _obs(weight: Tensor, hessian: Tensor, choose, blocksize: int, percdamp: float) -> tuple[Tensor, Tensor]:
    """The column sweep shared by both entry points. ``choose(block, hinv_diag, start)`` gives the
    removal mask of a block of the (already updated) weights, or of the first M columns at i % M."""
    w = weight.detach().clone().float()
    hinv, dead = _upper_inverse_cholesky(hessian, percdamp)
    w[:, dead] = 0
    removed = torch.zeros_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        drop1 = choose(w1, torch.diag(h1), i1, None)
        for i in range(i2 - i1):
            if drop1 is None or (choose.per_group and i % choose.group == 0):
                drop1 = choose(w1, torch.diag(h1), i1, (i, drop1))
            col = w1[:, i]
            q = col.clone()
            q[drop1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        removed[:, i1:i2] = drop1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype), ~removed


class _Unstructured:
    per_group = False

    def __init__(self, sparsity: float):
        self.sparsity = sparsity

    def __call__(self, w1: Tensor, hdiag: Tensor, start: int, at) -> Tensor:
        score = w1**2 / hdiag.reshape(1, -1) ** 2
        # As the reference: everything at or below the k-th smallest score of the block goes.
        thresh = torch.sort(score.flatten())[0][int(score.numel() * self.sparsity)]
        return score <= thresh


class _NM:
    per_group = True

    def __init__(self, n: int, m: int):
        self.n, self.group = n, m

    def __call__(self, w1: Tensor, hdiag: Tensor, start: int, at) -> Tensor:
        if at is None:
            return torch.zeros_like(w1, dtype=torch.bool)
        i, drop = at
        score = w1[:, i:i + self.group] ** 2 / hdiag[i:i + self.group].reshape(1, -1) ** 2
        drop.scatter_(1, i + torch.topk(score, self.n, dim=1, largest=False)[1], True)
        return drop


class _Given:
    per_group = False

    def __init__(self, keep: Tensor):
        self.keep = keep

    def __call__(self, w1: Tensor, hdiag: Tensor, start: int, at) -> Tensor:
        return ~self.keep[:, start:start + w1.shape[1]]


def sparsegpt(weight: Tensor, hessian: Tensor, *, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
              blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP) -> tuple[Tensor, Tensor]:
    """SparseGPT on one O x I weight: (updated weight with zeros where pruned, keep-mask).

    Exactly one of ``sparsity`` (unstructured, chosen per block of ``blocksize`` columns) and
    ``n_m`` = (N, M): N of every M consecutive inputs are removed from each row.
    """
    if (sparsity is None) == (n_m is None):
        raise SparsityError("sparsegpt takes exactly one of sparsity= and n_m=")
    if n_m is not None:
        n, m = n_m
        if weight.shape[1] % m:
            raise SparsityError(f"N:M with M={m} needs the input size {weight.shape[1]} to be a multiple of M")
        if blocksize % m:
            raise SparsityError(f"blocksize {blocksize} must be a multiple of M={m}")
        # In our N:M convention N is what is kept; SparseGPT's prunen is what is removed.
        return _obs(weight, hessian, _NM(m - n, m), blocksize, percdamp)
    if not 0 <= sparsity < 1 or math.isnan(sparsity):
        raise SparsityError(f"sparsity must be in [0, 1), got {sparsity}")
    return _obs(weight, hessian, _Unstructured(sparsity), blocksize, percdamp)


#: What the damping pulls the re-fitted weights toward: the dense weights (as SparseGPT's and ALPS's
#: updates do: the damped error (w - w0)^T (H + lambda I) (w - w0)) or zero (a ridge penalty on the
#: kept weights). On a 256 x 512 layer with outlier inputs "dense" had 16% less output error at 50%.
ANCHORS = ("dense", "zero")


@dataclass(frozen=True)
class Refit:
    """A re-fit of a layer's kept weights to its dense outputs on the calibration inputs, the mask fixed.

    ``fit(weight, hessian, keep, *, blocksize, percdamp, tol, max_iter, anchor)`` returns the new weight
    (removed entries zero); ``label`` is its word in a method label (``"+refit"``), ``summary`` a phrase
    for the commands' help."""

    name: str
    label: str
    summary: str
    fit: Callable[..., Tensor]


#: The re-fits by name. Adding one is a function and :func:`register_refit` here: the recipe, both
#: commands' ``--reconstruct``, the bench and the method labels take their choices from this registry.
REFITS: dict[str, Refit] = {}


def register_refit(name: str, *, label: str, summary: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fit`` as the re-fit ``name`` (see :class:`Refit`)."""
    def decorate(fit: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in REFITS or any(r.label == label for r in REFITS.values()):
            raise RelpruneError(f"a re-fit named {name!r} or labelled {label!r} is registered already")
        REFITS[name] = Refit(name, label, summary, fit)
        return fit
    return decorate


@register_refit("exact", label="+refit", summary="least squares")
def _exact(weight: Tensor, hessian: Tensor, keep: Tensor, *, blocksize: int, percdamp: float, tol: float,
           max_iter: int, anchor: str) -> Tensor:
    return _least_squares(weight, hessian, keep, percdamp, tol, max_iter, anchor)


@register_refit("obs", label="+obs", summary="SparseGPT's sweep with the mask fixed")
def _obs_sweep(weight: Tensor, hessian: Tensor, keep: Tensor, *, blocksize: int, percdamp: float, tol: float,
               max_iter: int, anchor: str) -> Tensor:
    return _obs(weight, hessian, _Given(keep), blocksize, percdamp)[0]


def refit(weight: Tensor, hessian: Tensor, keep: Tensor, *, method: str = "exact", blocksize: int = BLOCKSIZE,
          percdamp: float = PERCDAMP, tol: float = 1e-4, max_iter: int = 25, anchor: str = "dense") -> Tensor:
    """The kept weights re-fitted to the dense layer's outputs on the calibration inputs (mask fixed).

    ``method`` names a re-fit of :data:`REFITS`. ``hessian`` is X^T X up to a positive factor; damping
    adds ``percdamp`` times its mean diagonal. ``"exact"`` solves to a relative residual of ``tol``, or
    stops after ``max_iter`` iterations: on SmolLM2's layers 25 iterations come within 0.1% of the
    converged output error (100+ to converge). A row that keeps every weight is its own exact fit and
    comes back unchanged, so a layer with nothing removed is not rewritten. ``anchor`` (exact re-fit
    only): the damping pulls the kept weights toward the dense ones (``"dense"``, minimising
    (w - w0)^T (H + lambda I) (w - w0)) or toward zero (``"zero"``, the least squares plus lambda ||w||^2).
    """
    if keep.shape != weight.shape:
        raise SparsityError(f"mask shape {tuple(keep.shape)} does not match weight {tuple(weight.shape)}")
    if method not in REFITS:
        raise RelpruneError(f"refit method must be one of {tuple(REFITS)}, got {method!r}")
    if anchor not in ANCHORS:
        raise RelpruneError(f"refit anchor must be one of {ANCHORS}, got {anchor!r}")
    keep = keep.bool()
    whole = keep.all(1)
    if whole.all():
        return weight.detach().clone()
    new = REFITS[method].fit(weight, hessian, keep, blocksize=blocksize, percdamp=percdamp, tol=tol,
                             max_iter=max_iter, anchor=anchor)
    new[whole] = weight.detach()[whole].to(new.dtype)
    return new


def refit_from(weight: Tensor, hessian: Tensor, keep: Tensor, start: Tensor, *, max_iter: int = 10,
               tol: float = 1e-4, percdamp: float = PERCDAMP) -> Tensor:
    """The exact re-fit (:func:`refit`, ``method="exact"``, anchored at the dense weights) started from
    ``start`` instead of the dense weights on the mask: a solver's own estimate of the kept weights (ADMM's),
    which the conjugate gradients then polish in fewer iterations. As ALPS's back-solve: at most ``max_iter``
    iterations, stopping once the largest row residual is within ``tol`` of the largest right-hand side."""
    if keep.shape != weight.shape or start.shape != weight.shape:
        raise SparsityError(f"mask {tuple(keep.shape)} and start {tuple(start.shape)} must match the weight "
                            f"{tuple(weight.shape)}")
    keep = keep.bool()
    whole = keep.all(1)
    new = _least_squares(weight, hessian, keep, percdamp, tol, max_iter, start=start)
    new[whole] = weight.detach()[whole].to(new.dtype)
    return new


def _least_squares(weight: Tensor, hessian: Tensor, keep: Tensor, percdamp: float, tol: float,
                   max_iter: int, anchor: str = "dense", start: Tensor | None = None) -> Tensor:
    """Per row r: w_S = (H_SS + lambda I)^-1 (H' w_r)_S on its kept columns S, zeros elsewhere, with
    H' = H + lambda I (``anchor="dense"``) or H (``"zero"``).

    All rows at once by conjugate gradients restricted to each row's kept columns, with a
    diagonal (Jacobi) preconditioner: one (O x I) @ (I x I) product per iteration instead of a
    Cholesky factorisation per row. From the dense weights on the mask, the iterations stop at a residual
    ``tol`` times the starting one; from a given ``start``, at ``tol`` times the right-hand side's.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    h, dead, _ = damped_gram(hessian, percdamp, dtype)
    m = (keep & ~dead).to(dtype)
    # Row r: H' w_r, the dense row's fit on every column.
    target = w @ (h if anchor == "dense" else hessian.to(dtype))
    x = (w if start is None else start.detach().to(dtype)) * m
    r = (target - x @ h) * m
    inv_diag = 1 / torch.diag(h)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    # A warm start's residual is already small: relative to it, the stop would ask for far more than the
    # cold start does, so it is measured against the right-hand side (ALPS's back-solve does the same).
    stop = tol * (r if start is None else target * m).norm(dim=1).max().clamp_min(torch.finfo(dtype).tiny)
    for _ in range(max_iter):
        hp = (p @ h) * m
        alpha = rz / (p * hp).sum(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        x += alpha * p
        r -= alpha * hp
        if r.norm(dim=1).max() <= stop:
            break
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        p = z + rz_next / rz.clamp_min(torch.finfo(dtype).tiny) * p
        rz = rz_next
    return (x * m).to(weight.dtype)


def refit_columns(weight: Tensor, second_moment: Tensor, mean: Tensor, keep: Tensor, *,
                  bias: Tensor | None = None, percdamp: float = PERCDAMP) -> tuple[Tensor, Tensor]:
    """(weight on the kept columns, bias) fitted to the dense layer's outputs once input columns are removed.

    Structured pruning removes whole input columns of a layer (the outputs of pruned heads or
    channels), the same columns for every row, so one damped least squares with an intercept serves
    all rows: with C = E[x x^T] - mu mu^T the input covariance on the calibration tokens (from
    ``second_moment`` E[x x^T] and ``mean`` mu), the kept columns S get
    W'_S = W C_{:,S} (C_SS + lambda I)^-1 and the bias b' = b + W mu - W'_S mu_S, minimising
    E||W x + b - W'_S x_S - b'||^2. Keeping W_S and adding W_{~S} mu_{~S} to the bias (FLAP's bias
    compensation) is the same fit with the covariance between kept and removed columns ignored.
    ``keep`` is a boolean over the input columns; damping adds ``percdamp`` times C_SS's mean diagonal.
    """
    keep = keep.bool()
    if keep.dim() != 1 or keep.numel() != weight.shape[1]:
        raise SparsityError(f"keep must be a boolean over the {weight.shape[1]} input columns")
    if not keep.any():
        raise SparsityError("refit_columns needs at least one kept column")
    dtype = torch.float64
    w = weight.detach().to(dtype)
    mu = mean.detach().to(dtype).reshape(-1)
    cov = second_moment.detach().to(dtype) - torch.outer(mu, mu)
    c_ss = cov[keep][:, keep].clone()
    damp = percdamp * c_ss.diagonal().mean().clamp_min(torch.finfo(dtype).tiny)
    c_ss.diagonal().add_(damp)
    rhs = w @ cov[:, keep]  # O x |S|
    chol, info = torch.linalg.cholesky_ex(c_ss)
    if int(info) != 0:  # not positive definite even damped: fall back to a least-squares solve
        new = torch.linalg.lstsq(c_ss, rhs.T).solution.T
    else:
        new = torch.cholesky_solve(rhs.T, chol).T
    b = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if bias is None else bias.detach().to(dtype)
    new_bias = b + w @ mu - new @ mu[keep]
    return new.to(weight.dtype), new_bias.to(weight.dtype)


def obs_saliency(weight: Tensor, hessian: Tensor, *, percdamp: float = PERCDAMP) -> tuple[Tensor, float]:
    """Each weight's optimal-brain-surgeon saliency ``w^2 / [H^-1]_jj`` (float64; the output error of removing
    it alone, the others re-fitted) and the layer's output energy ``tr(W H W^T)``, from one Cholesky of the
    damped Gram. Inputs that never fire have saliency 0."""
    w = weight.detach().double()
    factor, dead = damped_cholesky(hessian, percdamp)  # H + lambda I = L L^T, factored once for both below
    saliency = w.pow(2) / torch.cholesky_inverse(factor).diagonal().reshape(1, -1)
    saliency[:, dead] = 0
    return saliency, float((w @ factor).pow(2).sum())  # tr(W L L^T W^T)


def error_curve(weight: Tensor, hessian: Tensor, levels: Sequence[float], *, percdamp: float = PERCDAMP) -> Tensor:
    """The layer's relative output error at each sparsity of ``levels`` (float64), from its input Gram alone.

    Each row loses its weights of least optimal-brain-surgeon saliency ``w^2 / [H^-1]_jj`` (the error of
    removing one weight with the others re-fitted), and the removed saliencies are summed (the diagonal
    approximation: how removed weights interact is ignored), then divided by the layer's output energy
    ``tr(W H W^T)``. No forward pass: one Cholesky of the damped Gram and one sort per layer."""
    return saliency_error_curve(*obs_saliency(weight, hessian, percdamp=percdamp), levels)


def saliency_error_curve(saliency: Tensor, energy: float, levels: Sequence[float]) -> Tensor:
    """:func:`error_curve` from the saliencies and energy of :func:`obs_saliency`: at each level, the lowest
    saliencies of every row summed over the energy (linear between whole counts removed)."""
    columns = saliency.shape[1]
    cumulative = torch.cat([torch.zeros(saliency.shape[0], 1, dtype=torch.float64),
                            torch.sort(saliency.double(), dim=1).values.cumsum(1)], dim=1).sum(0)
    out = []
    for level in levels:
        position = level * columns  # a fractional count: the curve is linear between whole counts
        low = min(math.floor(position), columns)
        high = min(low + 1, columns)
        out.append(float(cumulative[low] + (position - low) * (cumulative[high] - cumulative[low])))
    return torch.tensor(out, dtype=torch.float64) / max(energy, 1e-300)
