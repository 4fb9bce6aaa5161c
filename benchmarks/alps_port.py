"""ALPS (Meng et al. 2024) as its authors run it: a line-by-line port of ``ALPS_prune.ALPS_admm`` and its
batched conjugate gradients from mazumder-lab/ALPS (``alps.py``, MIT licence), for one layer on the CPU.

Kept as the reference does it, where relprune's own :func:`relprune.core.admm.admm_prune` differs:
the unstructured budget is spent over the whole layer (not per row), the inverse (H + rho I)^-1 is
rebuilt from the eigendecomposition at every schedule step, and the final re-fit is 10 plain
conjugate-gradient iterations on the support (rtol 1e-4) in the unit-diagonal coordinates.
``register()`` adds it as the joint criterion ``alps-reference`` so the benchmark can run it as a peer row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _project_layer(values: Tensor, drop: int) -> Tensor:
    flat = values.reshape(-1).clone()
    _, idx = torch.topk(-flat**2, drop)
    flat[idx] = 0
    return flat.reshape(values.shape)


def _project_nm(values: Tensor, n: int, m: int) -> Tensor:
    # values is I x O (the reference's B); groups of m run along each output's inputs.
    cols, rows = values.shape
    groups = values.t().reshape(-1, m)
    _, idx = torch.topk(-groups**2, m - n, dim=1)
    groups = groups.scatter(1, idx, torch.zeros(groups.shape[0], m - n, dtype=values.dtype))
    return groups.reshape(rows, cols).t()


def _cg_batch(a: Tensor, b: Tensor, support: Tensor, x0: Tensor, rtol: float, maxiter: int) -> Tensor:
    """The reference's ``cg_batch`` without a preconditioner: solve A X = B on each column's support."""
    x = x0
    r = (b - a @ x) * support
    z = r
    p = torch.zeros_like(z)
    r1 = r2 = z1 = z2 = r
    b_norm = torch.norm(b, dim=1)
    stop = rtol * b_norm
    for k in range(1, maxiter + 1):
        z = r
        if k == 1:
            p, r1, z1 = z, r, z
        else:
            r2, z2, p1 = r1, z1, p
            r1, z1 = r, z
            den = (r2 * z2).sum(0)
            den[den == 0] = 1e-8
            p = z1 + ((r1 * z1).sum(0) / den).unsqueeze(0) * p1
        ap = a @ p
        den = (p * ap).sum(0)
        den[den == 0] = 1e-8
        alpha = (r1 * z1).sum(0) / den
        x = x + alpha.unsqueeze(0) * p
        r = (r1 - alpha.unsqueeze(0) * ap) * support
        if (torch.norm(a @ x - b, dim=1) <= stop).all():
            break
    return x


def alps_admm(weight: Tensor, xtx: Tensor, sp: float = 0.0, nm_n: int = 0, nm_m: int = 0, rho: float = 0.1,
              max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30) -> Tensor:
    """The pruned O x I weight, as ``ALPS_admm`` computes it from ``xtx`` = X^T X (nm_n kept of nm_m)."""
    w = weight.detach().float().clone()
    xtx = xtx.detach().float().clone()
    diag = torch.arange(xtx.shape[0])
    xtx[diag, diag] += 0.01 * torch.mean(torch.diag(xtx)).item()
    x_norm = torch.diag(xtx).sqrt() + 1e-8
    xtx = xtx / x_norm
    xtx = (xtx.T / x_norm).T
    ytx = torch.matmul(w * x_norm, xtx)
    b = (w * x_norm).t().clone()
    b_orig = b.clone()
    v = torch.zeros_like(b)
    totp, num_cout = b.shape
    evals, evecs = torch.linalg.eigh(xtx.double())
    xtx_inv = (evecs @ ((1 / (evals + rho)) * evecs).T).float()
    init_rho = False
    params = totp * num_cout
    k_spar = int(np.round((1 - sp) * params))

    def project(values: Tensor) -> Tensor:
        return _project_layer(values, params - k_spar) if nm_n == 0 else _project_nm(values, nm_n, nm_m)

    if nm_n:
        k_spar = totp * num_cout * nm_n / nm_m
    d = project(b)
    d_prev_supp = (d == 0).float()
    d_init = d.clone()
    for i_admm in range(max_iter):
        b = xtx_inv @ (ytx.T - v + rho * d)
        d = project((v + rho * b) / rho)
        d_supp = (d == 0).float()
        v = v + rho * (b - d)
        if (i_admm + 1) % update_iter == 0:
            supp_change = torch.sum((d_supp - d_prev_supp) ** 2)
            if supp_change / k_spar > 0.1:
                init_rho = True
                rho *= 1.3
            elif supp_change / k_spar > 0.005:
                init_rho = True
                rho *= 1.2
            elif supp_change > 0.5:
                if init_rho:
                    rho *= 1.1
                else:
                    rho /= 5
                    b = b_orig.clone()
                    d = d_init.clone()
                    v = torch.zeros_like(b)
            else:
                if init_rho:
                    break
                rho /= 5
            d_prev_supp = d_supp.clone()
            rho = min(rho, 1e6)
            xtx_inv = (evecs @ ((1 / (evals + rho)) * evecs).T).float()
            if i_admm >= switch_iter and supp_change / k_spar < 0.0003:
                break
    b = project(b)
    b = _cg_batch(xtx, ytx.T, (b != 0).float(), b, rtol=1e-4, maxiter=10)
    return (b.t() / x_norm).to(weight.dtype)


def register() -> None:
    """Add ``alps-reference`` to relprune's criteria (a peer row of the benchmark, Linear layers only)."""
    from relprune.core.criteria import CRITERIA, Criterion

    def joint(weight: Tensor, stats, sparsity: float | None, n_m: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        if n_m is None:
            new = alps_admm(weight, stats.input_gram, sp=sparsity)
        else:
            new = alps_admm(weight, stats.input_gram, nm_n=n_m[0], nm_m=n_m[1])
        return new, new != 0

    def no_score(*_args):
        raise RuntimeError("alps-reference chooses masks and weights together")

    CRITERIA["alps-reference"] = Criterion("alps-reference", no_score, frozenset({"input_gram"}), False,
                                           "ALPS as published (port of its reference code)", joint=joint)
