"""Per-layer sparsities of a decoder: from the layers' error curves, then by search on the model's output.

``allocation="errors"`` reads every Linear's input Gram on the dense model once and gives each layer the
sparsity at which the summed relative output errors are least for the budget (a knapsack over the
curves of :func:`relprune.core.reconstruct.error_curve`). ``allocation="search"`` starts there and moves
weights between the blocks' attention and MLP parts by an evolutionary search
(:func:`relprune.core.search.search_levels`) scored by the KL divergence of the model's next-token
distribution from the dense model's on a few calibration windows; each candidate is scored with every
layer masked at its level by the same saliencies (no re-fit), and the dense weights are put back before
the real pruning starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import allocation as _allocation
from ..core import distributed as _dist
from ..core.batches import Batch
from ..core.collect import collect_stats
from ..core.layers import oriented, weight_matrix
from ..core.recipe import LEVEL_CEILING, Recipe
from ..core.reconstruct import PERCDAMP, obs_saliency, saliency_error_curve
from ..core.search import SearchResult, search_levels
from ..defaults import SEARCH_STEP, SEARCH_TOKENS, SEARCH_WINDOWS
from ..errors import CalibrationError, SparsityError
from .blocks import BlockInputs, BlockSource, input_device, walk_blocks

_log = logging.getLogger(__name__)


def error_levels(sparsity: float, spread: float, step: float = 0.01) -> list[float]:
    """The sparsities a layer may take under the ``errors`` allocation: ``sparsity +- spread`` in ``step`` s,
    inside [0, 0.99]."""
    low, high = max(0.0, sparsity - spread), min(LEVEL_CEILING, sparsity + spread)
    count = max(1, round((high - low) / step))
    return [low + (high - low) * k / count for k in range(count + 1)]


@dataclass
class LayerErrors:
    """Every pruned Linear of the blocks, in order: (block index, name within the block), its weight count,
    its error curve at ``levels`` and (if asked for) its weights' order of saliency within each row."""

    names: list[tuple[int, str]]
    sizes: list[int]
    curves: list[Tensor]
    levels: list[float]
    orders: list[Tensor] | None


def _as_pruned(block: nn.Module, layer: str, weight: Tensor) -> Tensor:
    """``weight`` in the O x I layout the layer is pruned in (a transformers Conv1D stores it transposed)."""
    try:
        return oriented(block.get_submodule(layer), weight)
    except AttributeError:  # a packed attention projection, named for its statistics: stored O x I already
        return weight


def dense_layer_errors(recipe: Recipe, named: Sequence[tuple[str, BlockSource]], captured: BlockInputs, *,
                       orders: bool = False) -> LayerErrors:
    """One pass over the dense blocks: every Linear's error curve from its input Gram (and its saliency
    order per row, lowest first, for :func:`search_sparsities`)."""
    assert recipe.sparsity is not None
    levels = error_levels(recipe.sparsity, recipe.owl_lambda)
    out = LayerErrors([], [], [], levels, [] if orders else None)
    for step in walk_blocks(None, named, (), captured=captured):
        stats = collect_stats(step.block, step.inputs, statistics=["input_gram"], liveness=False)
        for layer, ls in stats.items():
            weight = weight_matrix(_as_pruned(step.block, layer, ls.checked_weight()))
            saliency, energy = obs_saliency(weight, ls.input_gram, percdamp=PERCDAMP)
            out.names.append((step.index, layer))
            out.sizes.append(weight.numel())
            out.curves.append(saliency_error_curve(saliency, energy, levels))
            if out.orders is not None:
                kind = torch.int16 if weight.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
                out.orders.append(torch.argsort(saliency, dim=1).to(kind))
    return out


def _per_block(count: int, names: Sequence[tuple[int, str]], chosen: Sequence[float]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = [{} for _ in range(count)]
    for (i, layer), s in zip(names, chosen, strict=True):
        out[i][layer] = s
    return out


def sparsities_by_errors(recipe: Recipe, named: Sequence[tuple[str, BlockSource]],
                         captured: BlockInputs) -> list[dict[str, float]]:
    """Each block's layers' sparsities, by name, under ``allocation="errors"``."""
    assert recipe.sparsity is not None
    found = dense_layer_errors(recipe, named, captured)
    chosen = _allocation.sparsities_by_errors(found.curves, found.sizes, found.levels, recipe.sparsity)
    return _per_block(len(named), found.names, chosen)


def refuse_search(recipe: Recipe, *, streamed: bool = False) -> None:
    """Refuse, before anything is read or changed, a setting ``allocation="search"`` cannot honour."""
    if recipe.allocation != "search":
        return
    if streamed:
        raise SparsityError("the search allocation scores whole-model forward passes, so it needs the model in "
                            "memory: leave out --streamed (or choose --allocation errors, which streams)")
    if _dist.active(None):
        raise SparsityError("the search allocation scores candidates on this process's windows only; run it "
                            "without torch.distributed (or choose --allocation errors)")


def _search_windows(batches: Sequence[Batch]) -> list[Batch]:
    """The first :data:`SEARCH_WINDOWS` rows of the calibration batches, each a window of its own, cut to
    :data:`SEARCH_TOKENS` tokens."""
    out: list[Batch] = []
    for batch in batches:
        ids = batch["input_ids"]
        for row in range(ids.shape[0]):
            if len(out) == SEARCH_WINDOWS:
                return out
            window = {k: v[row:row + 1, :SEARCH_TOKENS] for k, v in batch.items()
                      if isinstance(v, Tensor) and v.dim() == 2 and v.shape[:2] == ids.shape[:2]}
            out.append(window)
    return out


class _Candidates:
    """Sets the model's pruned layers to a candidate's levels (masked by saliency from the dense weights,
    only the layers whose level changed) and scores it by KL divergence from the dense model."""

    def __init__(self, model: nn.Module, named: Sequence[tuple[str, nn.Module]], found: LayerErrors,
                 windows: list[Batch]):
        assert found.orders is not None
        device = input_device(model)
        windows = [{k: v.to(device) for k, v in w.items()} for w in windows]  # as the block capture moves them
        self.model, self.found, self.windows = model, found, windows
        self.weights = [oriented(named[i][1].get_submodule(layer), named[i][1].get_submodule(layer).weight)
                        for i, layer in found.names]
        self.dense = [w.detach().clone() for w in self.weights]
        self.at: list[int | None] = [None] * len(self.weights)  # the count removed per row now
        with torch.no_grad():
            # float32: a half-precision log p is off by ~1e-3 nats, as much as a good candidate's whole KL
            # (2 windows of 256 tokens over a 262k vocabulary hold 0.5 GiB)
            self.reference = [torch.log_softmax(self._logits(w), -1) for w in windows]

    def _logits(self, window: Batch) -> Tensor:
        out = self.model(**window, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        mask = window.get("attention_mask")
        logits = logits[0].float()
        return logits if mask is None else logits[mask[0].bool()]

    def apply(self, levels: Sequence[float]) -> None:
        with torch.no_grad():
            for j, level in enumerate(levels):
                order = self.found.orders[j]  # type: ignore[index]
                count = min(order.shape[1], max(0, round(level * order.shape[1])))
                if self.at[j] == count:
                    continue
                self.weights[j].copy_(self.dense[j])
                if count:
                    self.weights[j].scatter_(1, order[:, :count].long(), 0.0)
                self.at[j] = count

    def kl(self, levels: Sequence[float]) -> float:
        self.apply(levels)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for window, reference in zip(self.windows, self.reference, strict=True):
                log_q = torch.log_softmax(self._logits(window), -1)
                log_p = reference
                total += float((log_p.exp() * (log_p - log_q)).sum())
                tokens += log_p.shape[0]
        return total / max(tokens, 1)

    def restore(self) -> None:
        with torch.no_grad():
            for w, d in zip(self.weights, self.dense, strict=True):
                w.copy_(d)


def _units(names: Sequence[tuple[int, str]]) -> list[int]:
    """Each layer's unit: its block and the first part of its name (``self_attn``, ``mlp``)."""
    keys: dict[tuple[int, str], int] = {}
    return [keys.setdefault((i, layer.split(".")[0]), len(keys)) for i, layer in names]


def search_sparsities(model: nn.Module, recipe: Recipe, named: Sequence[tuple[str, nn.Module]],
                      captured: BlockInputs, batches: Sequence[Batch], *,
                      seed: int = 0) -> tuple[list[dict[str, float]], SearchResult]:
    """Each block's layers' sparsities, by name, under ``allocation="search"``, and the search's account.

    Starts from the ``errors`` allocation; each unit (a block's attention or MLP layers) then takes an offset
    in [-owl_lambda, owl_lambda] added to its layers' levels, chosen by :func:`relprune.core.search.
    search_levels` in at most the recipe's ``search_evaluations`` candidates (and ``search_seconds``), each
    scored by the KL divergence from the dense model on :data:`relprune.defaults.SEARCH_WINDOWS` windows of up
    to :data:`relprune.defaults.SEARCH_TOKENS` tokens. The model's weights are as before when this returns or
    raises."""
    assert recipe.sparsity is not None
    refuse_search(recipe)
    windows = _search_windows(batches)
    if not windows:
        raise CalibrationError("the search allocation needs at least one calibration window")
    found = dense_layer_errors(recipe, named, captured, orders=True)
    start = _allocation.sparsities_by_errors(found.curves, found.sizes, found.levels, recipe.sparsity)
    unit_of = _units(found.names)
    count = max(unit_of) + 1
    if count < 2:
        raise SparsityError("the search allocation needs at least two blocks or parts to move weights between")
    sizes = [0] * count
    floor = [recipe.owl_lambda] * count  # how far each unit may fall before a layer passes 0
    ceiling = [recipe.owl_lambda] * count  # ... or rise past the ceiling
    for u, n, s in zip(unit_of, found.sizes, start, strict=True):
        sizes[u] += n
        floor[u] = min(floor[u], s)
        ceiling[u] = min(ceiling[u], LEVEL_CEILING - s)

    def layer_levels(offsets: Sequence[float]) -> list[float]:
        return [min(LEVEL_CEILING, max(0.0, s + offsets[u])) for u, s in zip(unit_of, start, strict=True)]

    candidates = _Candidates(model, named, found, windows)
    try:
        def fitness(offsets: list[float]) -> float:
            return candidates.kl(layer_levels(offsets))

        result = search_levels([0.0] * count, sizes, fitness, low=[-f for f in floor], high=ceiling,
                               step=SEARCH_STEP, evaluations=recipe.search_evaluations,
                               seconds=recipe.search_seconds, seed=seed)
    finally:
        candidates.restore()
    _log.info("search allocation: %d candidates in %.1f s, KL from the dense model %.5g at the layer-error start, "
              "%.5g at the best (%d accepted)", result.evaluations, result.seconds, result.start_fitness,
              result.fitness, result.accepted)
    return _per_block(len(named), found.names, layer_levels(result.levels)), result
