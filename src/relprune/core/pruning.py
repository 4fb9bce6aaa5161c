"""``prune``: score every layer, allocate, compensate biases, then apply: all or nothing."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..defaults import DEFAULT_BIAS_COMPENSATION, DEFAULT_CRITERION, MAX_SEED
from ..errors import (
    LayerError,
    MissingLabelsError,
    RelpruneError,
    SingularGramError,
    SparsityError,
    StatisticNotCollectedError,
    StatsMismatchError,
)
from . import allocation
from .criteria import Criterion
from .layers import oriented, prunable_layers, warn_left_out, weight_matrix
from .masks import Masks, apply_masks, effective_weight, is_masked, mask_of, original_weight, unmask
from .recipe import Recipe
from .stats import INPUT_MOMENT_STATISTICS, LayerStats, Stats


def prune(
    model: nn.Module,
    stats: Stats | None,
    recipe: Recipe | None = None,
    *,
    sparsity: float | None = None,
    criterion: str | Criterion = DEFAULT_CRITERION,
    scope: str | None = None,
    n_m: str | tuple[int, int] | None = None,
    bias_compensation: bool = DEFAULT_BIAS_COMPENSATION,
    threshold: float | None = None,
    layers: Iterable[str] | None = None,
    reconstruct: bool | str = False,
    refine: bool = False,
    seed: int = 0,
    **criterion_options: Any,
) -> Masks:
    """Prune ``model`` in place and return the keep-masks of its pruned layers.

    The recipe is a :class:`~relprune.core.recipe.Recipe`, or spelled out: exactly one budget,
    ``sparsity`` (with ``scope``), ``n_m`` (e.g. "2:4"), or ``threshold`` (remove weights whose
    relative score is below threshold / fan-in; the achieved sparsity is ``masks.sparsity``).
    ``scope`` is the comparison group of a sparsity budget: ``"global"`` (the default),
    ``"layer"`` or ``"row"``. Sparsity counts weights already masked. Every mask is computed before
    the model is touched; on any error the model is left exactly as it was.

    ``bias_compensation=True`` adds each row's removed mean contribution ``sum_j W_ij E[x_j]`` to
    its bias, so the layer's mean output on the calibration data is unchanged; a layer without a
    bias is given one (a new ``bias`` parameter).

    ``reconstruct=True`` (or ``"exact"``) re-fits each row's kept weights to the dense layer's
    outputs on the calibration inputs by damped least squares; ``"obs"`` uses SparseGPT's column
    sweep with the mask fixed instead. Both need the ``input_gram`` statistic.
    ``refine=True`` then swaps pruned and kept weights within each row while the layer's output error
    on the calibration inputs falls (:func:`relprune.core.refine.refine_mask`; needs ``input_gram``).
    ``criterion="sparsegpt"`` chooses mask and weights together, per block of 128 columns of each
    layer as published (``scope`` does not apply); with ``reconstruct=True`` its mask is kept and
    the kept weights are re-fitted exactly from the dense ones.
    """
    if recipe is None:
        recipe = Recipe.build(criterion=criterion, sparsity=sparsity, n_m=n_m, threshold=threshold, scope=scope,
                              reconstruct=reconstruct, bias_compensation=bias_compensation, refine=refine,
                              options=criterion_options)
    elif not isinstance(recipe, Recipe):
        raise RelpruneError(f"recipe must be a relprune Recipe, got {type(recipe).__name__}")
    elif sparsity is not None or n_m is not None or threshold is not None or refine or criterion_options:
        raise RelpruneError("give either recipe= or the recipe's keyword arguments, not both")
    else:
        recipe.validate()
    if stats is not None and not isinstance(stats, Stats):
        raise StatsMismatchError(f"stats must come from collect_stats (a relprune.Stats), got {type(stats).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise RelpruneError(f"seed must be a whole number from 0 to 2^62 - 1 (defaults.MAX_SEED), got {seed!r}")
    crit = recipe.crit
    nm = recipe.nm
    sparsity, threshold, scope = recipe.sparsity, recipe.threshold, recipe.resolved_scope
    reconstruct, bias_compensation = recipe.reconstruct, recipe.bias_compensation
    criterion_options = dict(recipe.options)

    chosen = _layers_for(model, stats, crit, layers)
    if recipe.uses_gram and (stats is None or "input_gram" not in stats.statistics):
        raise StatisticNotCollectedError(
            "reconstruction, refine and joint criteria (sparsegpt, admm, gradual) need the 'input_gram' "
            "statistic; pass statistics=[..., 'input_gram'] to collect_stats")
    if bias_compensation and (stats is None or "contribution_mean" not in stats.statistics):
        raise StatisticNotCollectedError(
            "bias_compensation needs the 'contribution_mean' statistic; collect it with collect_stats"
        )

    # Everything below is in relprune's O x I layout (a transformers Conv1D stores its weight I x O).
    old = {n: oriented(layer, mask_of(layer).bool() if is_masked(layer)
                       else torch.ones_like(layer.weight, dtype=torch.bool)) for n, layer in chosen.items()}
    weights = {n: oriented(layer, effective_weight(layer)) for n, layer in chosen.items()}
    bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
    if bad:
        raise RelpruneError(f"layers {bad} hold NaN or Inf weights; restore a finite checkpoint before pruning")
    layer_stats = {}
    if stats is not None:
        needed = recipe.statistics()
        layer_stats = {n: _stats_for_weight(n, stats[n], weights[n], old[n], needed) for n in chosen}
        rebased = [n for n in chosen if layer_stats[n] is not stats[n]]
        if rebased:
            warnings.warn(
                f"layers {rebased} changed since their statistics were gathered; scoring their current "
                "weights with the recorded input moments (inputs of later layers may have changed too: "
                "call collect_stats again for exact scores)", stacklevel=2)
    new_weights: dict[str, Tensor] = {}
    if crit.joint is not None:
        keep = {}
        for name in chosen:
            with _named(name):
                new_weights[name], k = crit.joint(weights[name], layer_stats[name], sparsity if nm is None else None,
                                                  nm)
            keep[name] = k.to(old[name].device) & old[name]
    else:
        keep = _keep_by_scores(crit, chosen, weights, layer_stats, old, nm, threshold, sparsity, scope, seed,
                               criterion_options)
        if recipe.refine:
            keep = _refined(chosen, weights, layer_stats, keep, old, nm)
    if reconstruct and (crit.joint is None or (reconstruct == "exact" and not crit.refitted)):
        # After a joint method (SparseGPT) only the exact re-fit changes anything: its own weights
        # already are the fixed-mask sweep's, so the exact one starts again from the dense weights
        # (ADMM's and the gradual schedule's already are the exact re-fit of their masks).
        from .reconstruct import refit

        for name in chosen:
            with _named(name):
                new_weights[name] = refit(weight_matrix(weights[name]), layer_stats[name].input_gram,
                                          weight_matrix(keep[name]), method=reconstruct).reshape(weights[name].shape)

    bias_delta: dict[str, Tensor] = {}
    if bias_compensation:
        assert stats is not None
        for name in chosen:
            removed = (old[name] & ~keep[name]).double()
            cm = layer_stats[name].contribution_mean.to(removed.device)
            bias_delta[name] = weight_matrix(removed * cm).sum(1).to(weights[name].dtype)

    keep = {n: oriented(chosen[n], k) for n, k in keep.items()}
    new_weights = {n: oriented(chosen[n], w) for n, w in new_weights.items()}
    _apply_atomically(chosen, keep, bias_delta, model, new_weights)
    return Masks(keep, threshold=threshold)


@contextmanager
def _named(layer: str) -> Iterator[None]:
    """A singular input second moment raised with the layer's name."""
    try:
        yield
    except SingularGramError as err:
        raise SingularGramError(f"layer {layer!r}: {err}", err.needed) from None


def _refined(chosen: dict[str, nn.Module], weights: dict[str, Tensor], layer_stats: dict[str, LayerStats],
             keep: dict[str, Tensor], old: dict[str, Tensor], nm: tuple[int, int] | None) -> dict[str, Tensor]:
    """Each layer's mask after error-lowering swaps within rows (weights pruned before stay out)."""
    from .refine import refine_mask

    out = {}
    for name in chosen:
        w = weights[name]
        if nm is not None and w.dim() > 2:
            raise RelpruneError(f"refine with n_m supports Linear layers; {name!r} is a convolution")
        new = refine_mask(weight_matrix(w), layer_stats[name].input_gram, weight_matrix(keep[name]), n_m=nm,
                          fixed=~weight_matrix(old[name]))
        out[name] = new.reshape(w.shape).to(keep[name].device)
    return out


def _keep_by_scores(crit: Criterion, chosen: dict[str, nn.Module], weights: dict[str, Tensor],
                    layer_stats: dict[str, LayerStats], old: dict[str, Tensor], nm: tuple[int, int] | None,
                    threshold: float | None, sparsity: float | None, scope: str, seed: int,
                    criterion_options: dict[str, Any]) -> dict[str, Tensor]:
    """Score every layer by ``crit`` and allocate the budget: the keep-masks (already-pruned stay out)."""
    gen = torch.Generator().manual_seed(seed)
    options = {"generator": gen, **criterion_options}
    scores = {}
    for name in chosen:
        with _named(name):
            s = crit.score(weights[name], layer_stats.get(name), {**options, "layer": name})
        if tuple(s.shape) != tuple(weights[name].shape):
            raise RelpruneError(f"criterion {crit.name!r} returned shape {tuple(s.shape)} for {name!r}")
        if not torch.isfinite(s).all():
            raise RelpruneError(f"criterion {crit.name!r} gave NaN or Inf scores for layer {name!r}")
        scores[name] = torch.where(old[name], s.double().cpu(), torch.tensor(-math.inf, dtype=torch.float64))

    if nm is not None:
        keep = allocation.allocate_n_m(scores, *nm)
    elif threshold is not None:
        keep = allocation.allocate_threshold(scores, threshold)
        emptied = [n for n, k in keep.items() if not k.any() and old[n].any()]
        if emptied:
            raise SparsityError(
                f"threshold={threshold} removes every weight of layers {emptied}, which would cut the "
                f"network; use a smaller threshold (the uniform share is 1)"
            )
    else:
        keep = allocation.allocate(scores, sparsity, scope)
    return {n: k.to(old[n].device) & old[n] for n, k in keep.items()}


def _stats_for_weight(name: str, ls: LayerStats, weight: Tensor, kept: Tensor, needed: frozenset[str]) -> LayerStats:
    """``ls`` describing ``weight``: as is, re-based on it when that is exact, or refused by name.

    Weights already masked out are not compared: pruning again with the statistics taken before an
    earlier prune is allowed, as the kept weights are the ones the statistics saw.
    """
    # Statistics that hold the layer's own weights know from its version counter whether they
    # were changed in place; a comparison would see the new values on both sides.
    if not ls.weight_changed():
        stored = ls.weight.to(device=weight.device, dtype=torch.float64)
        if torch.equal(stored[kept], weight.double()[kept]):
            return ls
    # Input moments alone can score other weights; relative shares and gradients cannot.
    if needed <= INPUT_MOMENT_STATISTICS and ls.liveness is None:
        return dataclasses.replace(ls, weight=weight.detach().clone(), weight_version=None)
    what = "these statistics" if ls.liveness is None else "statistics conditioned on liveness"
    raise StatsMismatchError(
        f"layer {name!r}: the statistics were gathered with other weights (another model, or before "
        f"training or pruning changed it) and {what} cannot be re-based on the current ones; "
        "call collect_stats on the model as it is now"
    )


def _layers_for(model: nn.Module, stats: Stats | None, crit: Criterion,
                layers: Iterable[str] | None) -> dict[str, nn.Module]:
    if stats is None:
        if crit.data_driven:
            if "weight_grad" in crit.statistics:
                raise MissingLabelsError(f"criterion {crit.name!r} needs statistics from labelled batches")
            raise StatisticNotCollectedError(
                f"criterion {crit.name!r} is data-driven: pass stats from collect_stats"
            )
        if layers is None:
            warn_left_out(model)
        return prunable_layers(model, layers)
    chosen = stats.check_model(model)
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        if not wanted:
            raise LayerError("layers= is empty: name at least one layer, or pass None for all")
        missing = [n for n in wanted if n not in chosen]
        if missing:
            prunable_layers(model, missing)  # raises for absent or unsupported names
            raise StatisticNotCollectedError(f"no statistics were collected for layers {missing}")
        chosen = {n: chosen[n] for n in wanted}
    lacking = sorted(crit.statistics - stats.statistics)
    if "weight_grad" in lacking:
        raise MissingLabelsError(
            f"criterion {crit.name!r} needs gradients: collect stats from labelled batches "
            "((input, target) tuples) with statistics including 'weight_grad'"
        )
    if lacking:
        raise StatisticNotCollectedError(
            f"criterion {crit.name!r} needs statistics {lacking}, which were not collected"
        )
    return chosen


def _apply_atomically(chosen: dict[str, nn.Module], keep: dict[str, Tensor],
                      bias_delta: dict[str, Tensor], model: nn.Module,
                      new_weights: dict[str, Tensor] | None = None) -> None:
    """Apply masks, bias changes and re-fitted weights; on any failure restore every touched layer."""
    new_weights = new_weights or {}
    saved = {}
    for name, layer in chosen.items():
        raw = original_weight(layer)
        saved[name] = (
            is_masked(layer), raw, raw.detach().clone() if name in new_weights else None,
            None if not is_masked(layer) else mask_of(layer).clone(),
            layer.bias, None if layer.bias is None else layer.bias.detach().clone(),
        )
    try:
        with torch.no_grad():
            for name, delta in bias_delta.items():
                layer = chosen[name]
                if layer.bias is None:
                    # A bias-free layer gets one: the removed weights' mean output has to go somewhere.
                    layer.bias = nn.Parameter(torch.zeros_like(delta, device=layer.weight.device))
                layer.bias.add_(delta.to(layer.bias.device))
        apply_masks(model, keep)
        with torch.no_grad():
            for name, w in new_weights.items():
                raw = original_weight(chosen[name])
                raw.copy_(w.to(raw.dtype))
    except BaseException:
        for name, layer in chosen.items():
            was_masked, raw, raw_data, mask, bias, bias_data = saved[name]
            with torch.no_grad():
                if is_masked(layer) and not was_masked:
                    unmask(layer, keep_zeros=False)
                elif was_masked:
                    mask_of(layer).copy_(mask)
                if raw_data is not None:
                    raw.copy_(raw_data)
                if bias is None:
                    layer.bias = None
                else:
                    layer.bias = bias
                    bias.copy_(bias_data)
        raise
