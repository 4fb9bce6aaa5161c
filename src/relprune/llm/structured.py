"""Structured pruning of Llama-style decoders: whole attention heads and MLP channels, shrunk exactly.

The coupled units of a decoder layer are fixed by its architecture, so they are read from it rather
than traced: an MLP channel is row c of ``gate_proj`` and ``up_proj`` and column c of
``down_proj``; an attention unit is one key/value head with the query heads that share it under
grouped-query attention - rows of ``k_proj``/``v_proj`` for the key/value head, rows of ``q_proj``
and columns of ``o_proj`` for its query heads (removing whole groups keeps every layer's
query-per-key ratio). The residual stream (hidden size) is left alone: RMSNorm normalises over it.

Unit scores, larger kept: ``rc`` (ours) - the unit's total relative contribution E[r] to
``o_proj``/``down_proj``; ``fluctuation`` - FLAP's Var[x_c] ||W[:, c]||^2 over the same columns;
``share`` (ours) - the unit's share of each output's contribution variance, Var[c_rc] / sum_k Var[c_rk],
summed over the outputs (FLAP's fluctuation made relative per output, as ``contrib-share`` is);
``l2`` - the squared norm of every weight of the unit; ``random``. What reads the removed units is
corrected in one of two ways, both as biases :func:`save_shrunk` expresses with the config's bias
switches: FLAP's bias compensation (:func:`unit_compensation`) adds the mean contribution of the
removed columns to ``o_proj`` and ``down_proj``; our re-fit (:func:`shrink_refit`, the command's
default) fits their kept columns and bias to the dense output by least squares, block by block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.batches import Batch
from ..core.checks import real_number
from ..core.collect import collect_stats
from ..core.reconstruct import PERCDAMP, refit_columns
from ..core.stats import Stats
from ..core.units import Group, GroupScore, Member, group_score, score_groups, score_names
from ..defaults import DEFAULT_LLM_ROUND_TO
from ..errors import RelpruneError
from .blocks import walk_blocks
from .load import SIZES_FILE, load_shrunk  # noqa: F401 - the reader of what save_shrunk writes
from .sequential import decoder_blocks


@dataclass
class Unit:
    """One kind of coupled unit in one decoder layer."""

    layer: int
    kind: str  # "heads" | "mlp"
    count: int
    width: int  # rows (or columns) per unit in each projection it spans


def _attn(block: nn.Module) -> tuple[nn.Module, int, int, int]:
    attn = getattr(block, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in needed):
        raise RelpruneError(f"{type(block).__name__} is not a Llama-style decoder layer (self_attn.q/k/v/o_proj)")
    head_dim = int(attn.head_dim)
    kv = attn.k_proj.out_features // head_dim
    q = attn.q_proj.out_features // head_dim
    return attn, head_dim, kv, q // kv


def _mlp(block: nn.Module) -> nn.Module:
    mlp = getattr(block, "mlp", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj",
                                                                                    "down_proj")):
        raise RelpruneError(f"{type(block).__name__} has no gated MLP (mlp.gate_proj/up_proj/down_proj)")
    return mlp


def unit_cost(block: nn.Module, kind: str) -> int:
    """Parameters one unit of ``kind`` holds in ``block`` (weights and biases)."""
    if kind == "mlp":
        mlp = _mlp(block)
        hidden = mlp.down_proj.out_features
        return 3 * hidden + sum(1 for p in (mlp.gate_proj, mlp.up_proj) if p.bias is not None)
    attn, head_dim, _, rep = _attn(block)
    hidden = attn.o_proj.out_features
    per = (2 + 2 * rep) * head_dim * hidden
    per += sum(head_dim * (rep if n == "q_proj" else 1) for n in ("q_proj", "k_proj", "v_proj")
               if getattr(attn, n).bias is not None)
    return per


def decoder_groups(block: nn.Module) -> dict[str, Group]:
    """The block's coupled units as dependency-graph groups (module names relative to the block): one
    channel of ``"heads"`` is a key/value head with its query heads, one of ``"mlp"`` an MLP channel."""
    attn, head_dim, kv, rep = _attn(block)
    mlp = _mlp(block)
    q, k, v, o = (_name_in(block, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (_name_in(block, getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    heads = Group(kv, [Member(q, "out", 0, rep * head_dim), Member(k, "out", 0, head_dim),
                       Member(v, "out", 0, head_dim), Member(o, "in", 0, rep * head_dim)])
    channels = Group(mlp.down_proj.in_features, [Member(gate, "out", 0), Member(up, "out", 0), Member(down, "in", 0)])
    return {"heads": heads, "mlp": channels}


def unit_score(criterion: str) -> GroupScore:
    """The structured score ``criterion`` for a decoder's units: a registered one that needs no loss gradient
    (block-by-block passes compute none), or an error listing them."""
    if criterion not in score_names(gradients=False):
        raise RelpruneError(f"criterion must be one of {score_names(gradients=False)}, got {criterion!r}")
    return group_score(criterion)


def unit_scores(model: nn.Module, batches: Sequence[dict[str, Tensor]] | None, criterion: str = "rc", *,
                blocks: str | Sequence[str] | None = None, seed: int = 0,
                progress: bool = False) -> dict[tuple[int, str], Tensor]:
    """Score of every head group and MLP channel of every decoder layer, from dense activations
    (``progress``: a line per block on stderr, a bar on a terminal).

    ``criterion`` is a structured score of :data:`relprune.deploy.groups.GROUP_SCORES` (the dependency
    graph's, summed over the places each unit lives); its statistics are gathered on the projections that
    read the units (``o_proj``, ``down_proj``), block by block on the dense model."""
    statistics = unit_score(criterion).statistics
    named = decoder_blocks(model, blocks)
    gen = torch.Generator().manual_seed(seed)
    if statistics and not batches:
        raise RelpruneError(f"criterion {criterion!r} needs calibration batches")
    found = _reader_stats(model, named, batches or [], statistics, progress) if statistics else (
        (i, name, block, None) for i, (name, block) in enumerate(named))
    out: dict[tuple[int, str], Tensor] = {}
    for i, _, block, stats in found:
        out.update({(i, kind): v for kind, v in block_unit_scores(block, stats, criterion, gen).items()})
    return out


def block_unit_scores(block: nn.Module, stats: Stats | None, criterion: str,
                      generator: torch.Generator) -> dict[str, Tensor]:
    """One block's ``"heads"`` and ``"mlp"`` unit scores under ``criterion`` from its readers' statistics
    (:func:`reader_stats`; None for a score that reads none)."""
    groups = decoder_groups(block)
    scored = score_groups(list(groups.values()), dict(block.named_modules()), stats, criterion, generator)
    return {kind: scored[gi] for gi, kind in enumerate(groups)}


def reader_stats(block: nn.Module, inputs: Sequence[Batch], statistics: Sequence[str]) -> Stats:
    """``statistics`` of the block's projections that read its units (``o_proj``, ``down_proj``) on ``inputs``."""
    readers = [_name_in(block, _reader(block, kind)) for kind in ("heads", "mlp")]
    return collect_stats(block, inputs, layers=readers, statistics=sorted(statistics), liveness=False)


def _reader_stats(model: nn.Module, named: list[tuple[str, nn.Module]], batches: Sequence[dict[str, Tensor]],
                  statistics: Sequence[str], progress: bool = False) -> Iterator[tuple[int, str, nn.Module, Stats]]:
    """Per decoder layer, :func:`reader_stats` on dense activations: one pass through the blocks."""
    model.eval()
    for step in walk_blocks(model, named, batches, progress=progress):
        yield step.index, step.name, step.block, reader_stats(step.block, step.inputs, statistics)


def _reader(block: nn.Module, kind: str) -> nn.Linear:
    """The projection that reads the units of ``kind``: ``o_proj`` for the heads, ``down_proj`` for the MLP."""
    return _attn(block)[0].o_proj if kind == "heads" else _mlp(block).down_proj


def _name_in(block: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in block.named_modules() if m is module)


def plan_units(model: nn.Module, scores: dict[tuple[int, str], Tensor], ratio: float, *,
               blocks: str | Sequence[str] | None = None, scope: str = "uniform",
               kinds: Sequence[str] = ("heads", "mlp"),
               round_to: int = DEFAULT_LLM_ROUND_TO) -> dict[tuple[int, str], Tensor]:
    """Indices of the units each layer keeps so that ``ratio`` of the decoder layers' attention and
    MLP parameters goes.

    ``scope="uniform"``: every layer keeps the same number of head groups and of MLP channels (the
    pruned share of parameters is split between the two kinds in proportion to their size), so
    the result is a plain transformers model. ``"global"``: units of all layers compete on scores
    normalised by their layer's mean, per kind; layers then differ in size. ``round_to``: every MLP keeps
    a multiple of this many channels (or all of them), widths the runtimes' kernels and quantisation
    blocks divide evenly (as Torch-Pruning's ``round_to``); the budget is met with the rounding counted.
    """
    check_ratio(ratio)
    if scope not in ("uniform", "global"):
        raise RelpruneError(f"scope must be 'uniform' or 'global', got {scope!r}")
    check_round_to(round_to)
    keep = _plan(model, scores, ratio, blocks, scope, kinds, round_to)
    if all(keep[k].numel() == scores[k].numel() for k in keep):
        raise nothing_removed(ratio)
    return keep


def check_ratio(ratio: object) -> float:
    """A plan's ratio: a real number in (0, 1), the share of the decoder projections' parameters to remove."""
    if not 0.0 < real_number(ratio, "ratio", RelpruneError) < 1.0:
        raise RelpruneError(f"ratio must be a number in (0, 1): the share of parameters to remove, got {ratio!r}")
    return float(ratio)


def nothing_removed(ratio: float) -> RelpruneError:
    return RelpruneError(f"ratio {ratio:g} removes no whole unit (a head group or an MLP channel); give a larger ratio")


def check_round_to(round_to: object) -> int:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise RelpruneError(f"round_to must be a positive int, got {round_to!r}")
    return round_to


def rounded_drop(n: int, drop: int, round_to: int) -> int:
    """Units removed once the ``n - drop`` kept are rounded up to a multiple of ``round_to`` (or all ``n``)."""
    return n - min(n, -(-(n - drop) // round_to) * round_to)


def _plan(model: nn.Module, scores: dict[tuple[int, str], Tensor], ratio: float, blocks: str | Sequence[str] | None,
          scope: str, kinds: Sequence[str], round_to: int) -> dict[tuple[int, str], Tensor]:
    named = decoder_blocks(model, blocks)
    keys = [k for k in scores if k[1] in kinds]
    cost = {k: unit_cost(named[k[0]][1], k[1]) for k in keys}
    total = sum(cost[k] * scores[k].numel() for k in keys)
    target = ratio * total
    order = {k: torch.argsort(scores[k], stable=True) for k in keys}
    step = {k: round_to if k[1] == "mlp" else 1 for k in keys}

    def keep_with(drops: dict[tuple[int, str], int]) -> dict[tuple[int, str], Tensor]:
        return {k: torch.sort(order[k][rounded_drop(scores[k].numel(), drops.get(k, 0), step[k]):]).values
                for k in keys}

    if scope == "uniform":
        # The same fraction of each kind's units everywhere; fewest whole units meeting the target.
        def drops_at(frac: float) -> dict[tuple[int, str], int]:
            return {k: min(int(frac * scores[k].numel()), scores[k].numel() - 1) for k in keys}

        def removed_at(frac: float) -> float:
            return sum(cost[k] * rounded_drop(scores[k].numel(), d, step[k]) for k, d in drops_at(frac).items())

        frac_lo, frac_hi = 0.0, 1.0
        for _ in range(50):
            mid = (frac_lo + frac_hi) / 2
            frac_lo, frac_hi = (frac_lo, mid) if removed_at(mid) >= target else (mid, frac_hi)
        return keep_with(drops_at(frac_hi))
    normed = {k: scores[k] / scores[k].mean().clamp_min(1e-300) for k in keys}
    pool = sorted(((float(v), k) for k in keys for v in normed[k]), key=lambda t: t[0])
    drops: dict[tuple[int, str], int] = {}
    removed = 0.0
    for _, k in pool:
        if removed >= target:
            break
        n, d = scores[k].numel(), drops.get(k, 0)
        if d < n - 1:
            drops[k] = d + 1
            removed += cost[k] * (rounded_drop(n, d + 1, step[k]) - rounded_drop(n, d, step[k]))
    return keep_with(drops)


def unit_masks(model: nn.Module, keep: dict[tuple[int, str], Tensor], *,
               blocks: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """Weight-shaped keep-masks (rows and columns of removed units zeroed): the masked form."""
    named = decoder_blocks(model, blocks)
    masks: dict[str, Tensor] = {}
    for (i, kind), kept in keep.items():
        name, block = named[i]
        for proj, dim, idx in _index_sets(block, kind, kept):
            w = proj.weight
            mask = masks.setdefault(f"{name}.{_name_in(block, proj)}", torch.ones_like(w, dtype=torch.bool))
            sel = torch.zeros(w.shape[dim], dtype=torch.bool)
            sel[idx] = True
            mask &= sel.reshape(-1, 1) if dim == 0 else sel.reshape(1, -1)
    return masks


def unit_compensation(model: nn.Module, batches: Sequence[dict[str, Tensor]], keep: dict[tuple[int, str], Tensor],
                      *, blocks: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """FLAP's bias compensation (An et al. 2024) for a plan: for each ``o_proj`` and ``down_proj``,
    sum over its removed input columns c of W[:, c] E[x_c] on the calibration tokens (dense
    activations), to be added to its bias so its mean output stays where it was. Pass the result
    to :func:`shrink_units` as ``bias_delta``; call it before shrinking."""
    named = decoder_blocks(model, blocks)
    out: dict[str, Tensor] = {}
    for i, name, block, stats in _reader_stats(model, named, batches, ["contribution_mean"]):
        for kind in ("heads", "mlp"):
            if (i, kind) not in keep:
                continue
            proj = _reader(block, kind)
            s = stats[_name_in(block, proj)]
            cols = next(idx for p, dim, idx in _index_sets(block, kind, keep[i, kind]) if p is proj and dim == 1)
            removed = torch.ones(proj.in_features, dtype=torch.bool)
            removed[cols] = False
            out[f"{name}.{_name_in(block, proj)}"] = s.contribution_mean[:, removed].sum(1)
    return out


def shrink_refit(model: nn.Module, batches: Sequence[dict[str, Tensor]], keep: dict[tuple[int, str], Tensor], *,
                 blocks: str | Sequence[str] | None = None, sequential: bool = True,
                 percdamp: float = PERCDAMP, progress: bool = False) -> dict[str, Any]:
    """Remove the units not kept, in place, re-fitting what reads them; returns the per-layer sizes.

    Block by block, the kept columns of each ``o_proj`` and ``down_proj`` (and a bias) are fitted by
    least squares to the layer's dense output on the calibration tokens
    (:func:`~relprune.core.reconstruct.refit_columns`; FLAP's bias compensation is its special case
    that ignores how kept and removed columns covary). The attention units go first, so the MLP's
    fit sees the attention it will run with; with ``sequential`` (default) each block is calibrated
    on the outputs of the blocks already shrunk, else on the dense model's (``progress``: a line per block).
    """
    named = decoder_blocks(model, blocks)
    check_keep(named, keep)
    model.eval()
    for step in walk_blocks(model, named, batches, sequential=sequential, progress=progress):
        i, block = step.index, step.block
        for kind in ("heads", "mlp"):
            if (i, kind) not in keep:
                continue
            reader = _reader(block, kind)
            cols = next(idx for p, dim, idx in _index_sets(block, kind, keep[i, kind]) if p is reader and dim == 1)
            kept = torch.zeros(reader.in_features, dtype=torch.bool)
            kept[cols] = True
            name = _name_in(block, reader)
            s = collect_stats(block, step.inputs, layers=[name], statistics=["input_gram", "contribution_mean"],
                              liveness=False)[name]
            weight, bias = refit_columns(reader.weight, s.input_gram, s.input_mean.reshape(-1, reader.in_features)[0],
                                         kept.to(reader.weight.device), bias=reader.bias, percdamp=percdamp)
            with torch.no_grad():
                full = torch.zeros_like(reader.weight)
                full[:, kept] = weight
                reader.weight = nn.Parameter(full)
                reader.bias = nn.Parameter(bias)
            _shrink_block(block, kind, keep[i, kind])
    return layer_sizes(model, blocks=blocks)


def _shrink_block(block: nn.Module, kind: str, kept: Tensor) -> None:
    """Remove the units of ``kind`` not in ``kept`` from one block, in place."""
    with torch.no_grad():
        for proj, dim, idx in _index_sets(block, kind, kept):
            idx = idx.to(proj.weight.device)
            proj.weight = nn.Parameter(proj.weight.detach().index_select(dim, idx).clone())
            if dim == 0 and proj.bias is not None:
                proj.bias = nn.Parameter(proj.bias.detach()[idx].clone())
            proj.out_features, proj.in_features = proj.weight.shape


def check_keep(named: list[tuple[str, nn.Module]], keep: dict[tuple[int, str], Tensor]) -> None:
    """Refuse, before anything changes, a plan naming units a layer lacks, or one that empties a layer (the
    joint plan checks its plan against the blocks it will leave with it)."""
    for (i, kind), kept in keep.items():
        if not (0 <= i < len(named)) or kind not in ("heads", "mlp"):
            raise RelpruneError(f"keep names units the model does not have: {(i, kind)}")
        block = named[i][1]
        total = _attn(block)[2] if kind == "heads" else _mlp(block).down_proj.in_features
        idx = torch.as_tensor(kept).flatten()
        if idx.numel() == 0:
            unit = "key/value head group" if kind == "heads" else "MLP channel"
            raise RelpruneError(f"the plan removes every {unit} of layer {i}; keep at least one")
        if idx.dtype not in (torch.int32, torch.int64) or int(idx.min()) < 0 or int(idx.max()) >= total or len(
                set(idx.tolist())) != idx.numel():
            raise RelpruneError(f"layer {i} {kind}: keep must be distinct indices in [0, {total})")


def _index_sets(block: nn.Module, kind: str, kept: Tensor) -> list[tuple[nn.Linear, int, Tensor]]:
    """(projection, dimension, kept indices along it) for each projection a unit kind spans."""
    if kind == "mlp":
        mlp = _mlp(block)
        return [(mlp.gate_proj, 0, kept), (mlp.up_proj, 0, kept), (mlp.down_proj, 1, kept)]
    attn, head_dim, _, rep = _attn(block)
    kv_rows = (kept.reshape(-1, 1) * head_dim + torch.arange(head_dim)).flatten()
    q_rows = (kept.reshape(-1, 1) * rep * head_dim + torch.arange(rep * head_dim)).flatten()
    return [(attn.q_proj, 0, q_rows), (attn.k_proj, 0, kv_rows), (attn.v_proj, 0, kv_rows), (attn.o_proj, 1, q_rows)]


def shrink_units(model: nn.Module, keep: dict[tuple[int, str], Tensor], *,
                 blocks: str | Sequence[str] | None = None,
                 bias_delta: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Remove the units not kept, in place; returns the per-layer sizes (heads, kv heads, MLP width).

    ``bias_delta`` (from :func:`unit_compensation`) is added to the named projections' biases, a
    bias being created where there is none."""
    named = decoder_blocks(model, blocks)
    check_keep(named, keep)
    modules = dict(model.named_modules())
    unknown = sorted(set(bias_delta or {}) - set(modules))
    if unknown:
        raise RelpruneError(f"bias_delta names modules the model does not have: {unknown}")
    with torch.no_grad():
        for name, delta in (bias_delta or {}).items():
            proj = modules[name]
            if proj.bias is None:
                proj.bias = nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype))
            proj.bias.add_(delta.to(proj.bias.dtype))
        for (i, kind), kept in keep.items():
            _shrink_block(named[i][1], kind, kept)
    return layer_sizes(model, blocks=blocks)


def layer_sizes(model: nn.Module, *, blocks: str | Sequence[str] | None = None) -> dict[str, Any]:
    sizes = []
    for _, block in decoder_blocks(model, blocks):
        _, head_dim, kv, rep = _attn(block)
        sizes.append({"num_attention_heads": kv * rep, "num_key_value_heads": kv,
                      "intermediate_size": _mlp(block).down_proj.in_features})
    return {"head_dim": head_dim, "layers": sizes}


def save_shrunk(model: nn.Module, tokenizer: Any, folder: str | Path) -> bool:
    """Write the shrunk model; returns True when plain transformers can load it.

    Uniform sizes go into the config (``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size`` and an explicit ``head_dim``), so ``AutoModelForCausalLM.from_pretrained``
    loads the folder - provided the hidden size is a multiple of the new number of heads, which
    transformers requires. Per-layer sizes (or such a head count) cannot be expressed in a Llama
    config: they go to ``relprune_sizes.json`` and :func:`load_shrunk` builds the model from them.
    ``folder`` must be absent or empty; it is written in full or not at all.
    """
    from ..core.files import staged_folder
    from .save import refuse_occupied

    refuse_occupied(Path(folder), "save_shrunk's folder")
    with staged_folder(folder) as tmp:
        return write_shrunk(model, tokenizer, tmp)


def write_shrunk(model: nn.Module, tokenizer: Any, folder: Path) -> bool:
    """:func:`save_shrunk`'s writing, into an empty folder the caller stages (and adds its own files to)."""
    from .save import write_pretrained

    sizes = layer_sizes(model)
    first = sizes["layers"][0]
    # transformers checks that the hidden size is a multiple of the number of heads, head_dim or not.
    uniform = all(s == first for s in sizes["layers"]) and model.config.hidden_size % first[
        "num_attention_heads"] == 0
    config = model.config
    config.head_dim = sizes["head_dim"]
    if uniform:
        for key, value in sizes["layers"][0].items():
            setattr(config, key, value)
    write_pretrained(model, tokenizer, folder)
    if not uniform:
        (folder / SIZES_FILE).write_text(json.dumps(sizes, indent=2) + "\n")
    return uniform
