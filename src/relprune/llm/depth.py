"""Depth pruning: whole decoder blocks scored on calibration text and removed.

A block maps its input hidden state h to h + f(h). Scores, larger kept:

- ``influence`` - ShortGPT's block influence (Men et al. 2024): the mean over tokens of
  1 - cos(h, h + f(h)); a block that barely turns the residual stream matters little;
- ``relative`` (ours) - the block's relative contribution to the residual stream,
  the mean over tokens of ||f(h)|| / (||h|| + ||f(h)||): the share of the output that the block writes
  (the contribution statistics' relative form, at the scale of a block).

Both are measured on the dense model's hidden states, one pass through the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import RelpruneError
from .blocks import block_outputs, walk_blocks
from .sequential import decoder_blocks

BLOCK_CRITERIA = ("influence", "relative")


def block_scores(model: nn.Module, batches: Sequence[dict[str, Tensor]], criterion: str = "influence", *,
                 blocks: str | Sequence[str] | None = None) -> Tensor:
    """One score per decoder block (float64), larger for blocks that change the residual stream more."""
    if criterion not in BLOCK_CRITERIA:
        raise RelpruneError(f"block criterion must be one of {BLOCK_CRITERIA}, got {criterion!r}")
    named = decoder_blocks(model, blocks)
    model.eval()
    scores = torch.zeros(len(named), dtype=torch.float64)
    for step in walk_blocks(model, named, batches):
        step.outputs = block_outputs(step.block, step.inputs)
        total, count = 0.0, 0
        for h, out, call in zip(step.hidden, step.outputs, step.inputs, strict=True):
            per = _per_token(h, out, call.token_mask, criterion)
            total += float(per.sum())
            count += per.numel()
        scores[step.index] = total / max(count, 1)
    return scores


def live_tokens(token_mask: Tensor | None, *states: Tensor) -> list[Tensor]:
    """Hidden states as (tokens, hidden) float64 rows, padding tokens (``token_mask`` 0) left out."""
    rows = [t.double().flatten(0, -2) for t in states]
    if token_mask is None:
        return rows
    live = token_mask.flatten().bool().to(rows[0].device)
    return [r[live] for r in rows]


def _per_token(h: Tensor, out: Tensor, token_mask: Tensor | None, criterion: str) -> Tensor:
    """The block score of each live token, from the block's input ``h`` and output ``out``."""
    h, out = live_tokens(token_mask, h, out)
    if criterion == "influence":
        return 1 - nn.functional.cosine_similarity(h, out, dim=-1)
    return relative_share(h, out - h)


def relative_share(base: Tensor, write: Tensor) -> Tensor:
    """Per token, ||write|| / (||base|| + ||write||): the share of the residual stream a block (or one of its
    sublayers) writes onto ``base``."""
    f = write.norm(dim=-1)
    return f / (base.norm(dim=-1) + f).clamp_min(torch.finfo(torch.float64).tiny)


def plan_blocks(scores: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest-scored blocks (to remove), ascending."""
    if not 0 <= count < scores.numel():
        raise RelpruneError(f"cannot remove {count} of {scores.numel()} blocks: at least one must stay")
    return sorted(int(i) for i in torch.argsort(scores, stable=True)[:count])


def remove_blocks(model: nn.Module, drop: Sequence[int], *,
                  blocks: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Remove decoder blocks ``drop`` in place; the config and each attention's cache index follow.

    Returns ``{"removed": [...], "num_hidden_layers": n}``. A plain transformers folder describes
    the result (fewer layers), so :func:`~relprune.llm.save_pretrained` writes it as any model.
    """
    named = decoder_blocks(model, blocks)
    drop = sorted(set(int(i) for i in drop))
    if any(not 0 <= i < len(named) for i in drop):
        raise RelpruneError(f"block indices must lie in [0, {len(named)}), got {drop}")
    if len(drop) >= len(named):
        raise RelpruneError("removing every decoder block leaves no model; keep at least one")
    parent_name = named[0][0].rpartition(".")[0]
    if [n for n, _ in named] != [f"{parent_name}.{i}" for i in range(len(named))]:
        raise RelpruneError("depth pruning needs the decoder blocks to be one ModuleList, in order")
    kept = [b for i, (_, b) in enumerate(named) if i not in set(drop)]
    owner_name, _, attr = parent_name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by it
    config = getattr(model, "config", None)
    if config is not None:
        configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "num_hidden_layers")}
        for cfg in configs.values():
            cfg.num_hidden_layers = len(kept)
            if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == len(named):
                cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    return {"removed": drop, "num_hidden_layers": len(kept)}
