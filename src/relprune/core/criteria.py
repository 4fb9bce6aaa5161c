"""Pruning criteria: each turns one layer's weight and statistics into a score (larger is kept).

A criterion is one function plus a ``@register`` line naming the statistics
it reads; ``prune`` gathers nothing itself, so a criterion pays only for what
it declares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import RelpruneError
from .layers import weight_matrix
from .stats import LayerStats

ScoreFn = Callable[[Tensor, "LayerStats | None", dict[str, Any]], Tensor]


@dataclass(frozen=True)
class Criterion:
    """A named score function and what it needs."""

    name: str
    score: ScoreFn
    statistics: frozenset[str]
    relative: bool
    description: str
    options: frozenset[str] = frozenset()
    #: For methods that choose the mask and new weights together (SparseGPT): a function
    #: (weight, layer stats, sparsity or None, (N, M) or None) -> (new weight, keep-mask).
    joint: Callable[..., tuple[Tensor, Tensor]] | None = None
    #: A joint method whose weights already are the exact re-fit of its mask (reconstruct="exact" adds nothing).
    refitted: bool = False

    @property
    def data_driven(self) -> bool:
        return bool(self.statistics)


CRITERIA: dict[str, Criterion] = {}


def register(name: str, *, statistics: tuple[str, ...] = (), relative: bool = False,
             description: str = "", options: tuple[str, ...] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a score function to :data:`CRITERIA`.

    ``relative`` marks scores on a scale shared by all layers (shares of a
    neuron's input), which a global threshold and threshold mode need.
    ``options`` names the keyword options ``prune`` may pass on to it.
    """

    def wrap(fn: ScoreFn) -> ScoreFn:
        CRITERIA[name] = Criterion(name, fn, frozenset(statistics), relative,
                                   description or (fn.__doc__ or "").strip(), frozenset(options))
        return fn

    return wrap


def get_criterion(criterion: str | Criterion) -> Criterion:
    """Look a criterion up by name (or pass one through)."""
    if isinstance(criterion, Criterion):
        return criterion
    try:
        return CRITERIA[criterion]
    except KeyError:
        raise RelpruneError(
            f"unknown criterion {criterion!r}; known: {', '.join(sorted(CRITERIA))}"
        ) from None


def _stats(stats: LayerStats | None) -> LayerStats:
    assert stats is not None, "prune() checks that data-driven criteria get statistics"
    return stats


@register("magnitude", description="|W|: the classic baseline")
def magnitude(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    return weight.detach().abs().double()


@register("random", description="uniform random scores: the floor any method must beat")
def random_score(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    gen = opts.get("generator")
    return torch.rand(weight.shape, generator=gen, dtype=torch.float64).to(weight.device)


@register("rc", statistics=("relative_mean",), relative=True,
          description="E[r_ij]: mean share of the neuron's input this weight carries")
def relative_contribution(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    return _stats(stats).relative_mean


@register("rc-flow", statistics=("relative_mean",), options=("importance",),
          description="E[r_ij] x I_i: the share times neuron i's importance to the output, propagated back "
                      "through the shares of the layers above (relprune.output_importance)")
def relative_contribution_flow(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    importance, layer = opts.get("importance"), opts.get("layer")
    if importance is None:
        raise RelpruneError("criterion 'rc-flow' needs importance=relprune.output_importance(model, stats, example)")
    if layer not in importance:
        raise RelpruneError(f"criterion 'rc-flow': no output importance for layer {layer!r}")
    share = _stats(stats).relative_mean
    rows = importance[layer].to(device=share.device, dtype=share.dtype)
    if rows.shape != share.shape[:1]:
        raise RelpruneError(f"criterion 'rc-flow': importance of {layer!r} has shape {tuple(rows.shape)}, "
                            f"the layer has {share.shape[0]} outputs")
    return share * rows.reshape(-1, *([1] * (share.dim() - 1)))


@register("rc-uniform", statistics=("relative_mean",), relative=True,
          description="E[r_ij] x I: the mean share relative to the uniform share 1/I (fan-in neutral)")
def relative_contribution_uniform(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    s = _stats(stats)
    return s.relative_mean * weight_matrix(s.relative_mean).shape[1]


@register("rc-ucb", statistics=("relative_mean", "relative_std"), relative=True,
          description="E[r_ij] + k Std[r_ij]: keeps weights that are sometimes large (k=ucb_k)",
          options=("ucb_k",))
def relative_contribution_ucb(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    s = _stats(stats)
    return s.relative_mean + float(opts.get("ucb_k", 1.0)) * s.relative_std


@register("contrib-std", statistics=("contribution_std",),
          description="Std[c_ij]: the information the weight carries (pair with bias compensation)")
def contribution_std(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    return _stats(stats).contribution_std


@register("contrib-share", statistics=("contribution_std",), relative=True,
          description="Var[c_ij] / sum_k Var[c_ik]: share of the neuron's output variance")
def contribution_share(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    var = _stats(stats).contribution_std ** 2
    rows = weight_matrix(var)
    return (rows / rows.sum(1, keepdim=True).clamp_min(1e-300)).reshape(var.shape)


@register("wanda", statistics=("input_sq_mean",),
          description="|W_ij| ||x_j|| (Sun et al. 2023); compare per row")
def wanda(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    return weight.double().abs() * _stats(stats).input_sq_mean.sqrt()


@register("ria", statistics=("input_sq_mean",),
          description="(|W|/row sum + |W|/column sum) ||x_j||^0.5 (Zhang et al. 2024)")
def relative_importance_activation(weight: Tensor, stats: LayerStats | None,
                                   opts: dict[str, Any]) -> Tensor:
    s = _stats(stats)
    w = weight_matrix(weight.double().abs())
    # The column sum runs over the outputs that see input j: in a grouped conv, its own group only.
    groups = s.groups
    per_group = w.reshape(groups, -1, w.shape[1])
    col = per_group.sum(1, keepdim=True).expand_as(per_group).reshape(w.shape)
    rel = w / w.sum(1, keepdim=True).clamp_min(1e-300) + w / col.clamp_min(1e-300)
    return rel.reshape(weight.shape) * s.input_sq_mean.sqrt().sqrt()


@register("snip", statistics=("weight_grad",),
          description="|W dL/dW| over labelled calibration batches (Lee et al. 2019)")
def snip(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    s = _stats(stats)
    return (s.checked_weight().double() * s.weight_grad).abs()


CRITERIA["taylor"] = Criterion("taylor", snip, frozenset({"weight_grad"}), False,
                               "first-order Taylor |W dL/dW|: the same score as snip")


@register("obs", statistics=("input_gram",),
          description="W_ij^2 / [(H + lambda I)^-1]_jj: the optimal-brain-surgeon saliency of each weight "
                      "given the inputs' correlations (Wanda is its diagonal-H case); pair with reconstruct=")
def obs_saliency(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    from .reconstruct import PERCDAMP, damped_inverse_diagonal

    inv_diag = damped_inverse_diagonal(_stats(stats).input_gram, PERCDAMP)
    return (weight_matrix(weight.double()) ** 2 / inv_diag.reshape(1, -1)).reshape(weight.shape)


def _linear_joint(solver: Callable[..., tuple[Tensor, Tensor]], name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    def joint(weight: Tensor, stats: LayerStats | None, sparsity: float | None,
              n_m: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        shape = weight.shape
        if n_m is not None and weight.dim() > 2:
            # Its N:M groups would run along (channel, kernel) columns; sparse kernels want channels.
            raise RelpruneError(f"{name} with n_m supports Linear layers; leave convolutions out with layers=")
        new, keep = solver(weight_matrix(weight), _stats(stats).input_gram, sparsity=sparsity, n_m=n_m)
        return new.reshape(shape), keep.reshape(shape)
    return joint


def _sparsegpt(weight: Tensor, hessian: Tensor, **budget: Any) -> tuple[Tensor, Tensor]:
    from .reconstruct import sparsegpt

    return sparsegpt(weight, hessian, **budget)


def _admm(weight: Tensor, hessian: Tensor, **budget: Any) -> tuple[Tensor, Tensor]:
    from .admm import admm_prune

    return admm_prune(weight, hessian, **budget)


def _gradual(weight: Tensor, hessian: Tensor, **budget: Any) -> tuple[Tensor, Tensor]:
    from .admm import gradual_prune

    return gradual_prune(weight, hessian, **budget)


def _no_score(weight: Tensor, stats: LayerStats | None, opts: dict[str, Any]) -> Tensor:
    raise RelpruneError("this criterion has no per-weight score: it chooses masks and weights together in prune()")


CRITERIA["sparsegpt"] = Criterion(
    "sparsegpt", _no_score, frozenset({"input_gram"}), False,
    "SparseGPT (Frantar & Alistarh 2023): mask and weight update together, per block of 128 columns",
    joint=_linear_joint(_sparsegpt, "sparsegpt"))
CRITERIA["admm"] = Criterion(
    "admm", _no_score, frozenset({"input_gram"}), False,
    "ADMM on the layer's L0-constrained least squares with ALPS's penalty schedule (Meng et al. 2024), "
    "the same count per row, then the exact re-fit on the support",
    joint=_linear_joint(_admm, "admm"), refitted=True)
CRITERIA["gradual"] = Criterion(
    "gradual", _no_score, frozenset({"input_gram"}), False,
    "sparsity raised in 4 steps per row, each mask chosen by the OBS saliency of the re-fitted weights",
    joint=_linear_joint(_gradual, "gradual"), refitted=True)
