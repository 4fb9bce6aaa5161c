"""Physically smaller models: remove the channels a masked model no longer uses, over the dependency graph.

After unstructured (or structured) pruning a unit - an output neuron of a Linear, an output channel
of a convolution, with everything the dependency graph (:mod:`relprune.deploy.graph`) couples to it
through residual adds, concatenations, grouped and depthwise convolutions and flattens - can go when

* every weight that reads it is zero (it feeds nothing), or
* every weight that writes it is zero: it then carries a constant (its bias, through BatchNorm and
  pointwise functions), which is folded into the biases of the layers that read it where that is
  exact (a Linear reader, or an ungrouped convolution without padding).

The result is an ordinary copy of the model with smaller layers whose outputs equal the masked
model's, checked on the example before it is returned. Channels the graph cannot shrink exactly
(they reach the output, go through a LayerNorm, ...) are left whole and listed in the report.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.masks import copy_model, make_permanent
from ..errors import ShrinkError
from .graph import DependencyGraph, Group
from .groups import shrink_groups

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ShrinkReport:
    """Units kept per layer (output rows kept, rows before), parameter counts, and what was left whole."""

    kept_units: dict[str, tuple[int, int]]
    params_before: int
    params_after: int
    refused: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        width = max([16, *(len(n) for n in self.kept_units)])
        lines = [f"{'layer':{width}} {'units kept':>12}"]
        lines += [f"{n:{width}} {k:>5} / {t:<5}" for n, (k, t) in self.kept_units.items()]
        lines.append(f"parameters: {self.params_before} -> {self.params_after} "
                     f"({self.params_after / max(self.params_before, 1):.1%})")
        return "\n".join(lines)


def flatten_chain(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaf modules of a (nested) nn.Sequential in order, or ShrinkError naming what is not a chain."""
    if not list(model.children()) or isinstance(model, _LAYERS):
        return [(prefix or type(model).__name__, model)]
    if not isinstance(model, nn.Sequential):
        raise ShrinkError(f"{prefix or 'the model'} ({type(model).__name__}) is not an nn.Sequential chain")
    out = []
    for name, child in model.named_children():
        out.extend(flatten_chain(child, f"{prefix}.{name}" if prefix else name))
    return out


def shrink(model: nn.Module, example_input: Tensor | tuple[Tensor, ...], *,
           leaves: tuple[str, ...] = ()) -> tuple[nn.Module, ShrinkReport]:
    """A smaller copy of the (masked) ``model`` with the same outputs; the model itself is not changed.

    ``example_input`` (one batch) is traced through the model to find the coupled channels, and
    the result is checked against the masked model on it. ``leaves`` names submodules torch.fx
    should not trace into. Raises ``ShrinkError`` when the model cannot be traced or fails on the
    example.
    """
    plain = make_permanent(copy_model(model)).eval()
    for m in plain.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    args = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    graph = DependencyGraph(plain, args, leaves=leaves)
    inputs = _reader_inputs(plain, graph, args)
    keep: dict[int, Tensor] = {}
    delta: dict[str, Tensor] = {}
    for gi, group in enumerate(graph.groups):
        if not group.prunable:
            continue
        kept, folds = _removable(graph, group, inputs)
        if len(kept) < group.size:
            keep[gi] = kept
            for name, d in folds.items():
                delta[name] = delta.get(name, 0) + d
    small = shrink_groups(plain, graph, keep, delta) if keep else copy.deepcopy(plain)
    with torch.no_grad():
        want, got = plain(*args), small(*args)
    if not _close(want, got):
        raise ShrinkError("the shrunk model's outputs differ from the masked model's on the example; "
                          "mark the submodule that hides a channel dependency as a leaf (leaves=[...])")
    small.train(model.training)
    sizes = {n: (m.weight.shape[0], dict(plain.named_modules())[n].weight.shape[0])
             for n, m in small.named_modules() if isinstance(m, _LAYERS)}
    refused = [(g.describe(), g.reason) for g in graph.groups if not g.prunable and g.size > 0]
    report = ShrinkReport(sizes, sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in small.parameters()),
                          refused)
    if report.params_after > report.params_before:  # folded constants gave bias-free readers a bias
        warnings.warn(f"shrink made the model larger ({report.params_before} -> {report.params_after} parameters): "
                      "few units could go and the folded constants added biases", stacklevel=2)
    return small, report


def _close(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        scale = float(a.abs().max()) if a.numel() else 0.0
        tol = 1e-4 if a.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-9
        return a.shape == b.shape and bool(((a - b).abs() <= tol * (1 + scale)).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b if not isinstance(a, Tensor) else False


def _reader_inputs(model: nn.Module, graph: DependencyGraph, args: tuple) -> dict[str, Tensor]:
    """The input each reading layer gets on the example."""
    readers = {m.module for g in graph.groups for m in g.members if m.role == "in"}
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen.setdefault(name, args[0].detach())
        return hook

    handles = [modules[n].register_forward_hook(recorder(n)) for n in readers]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return seen


def _removable(graph: DependencyGraph, group: Group, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """(indices of the units kept, bias deltas of the readers for folded constants) of one group."""
    readers = [m for m in group.members if m.role == "in"]
    writers = [m for m in group.members if m.role == "out"]
    depthwise = any(m.role == "depthwise" for m in group.members)
    index = {id(m): m.index(group.size) for m in group.members}
    keep = torch.ones(group.size, dtype=torch.bool)
    unit_folds: dict[int, dict[str, Tensor]] = {}
    for k in range(group.size):
        if readers and all(_cols(graph, m, index[id(m)][k]).eq(0).all() for m in readers):
            keep[k] = False  # feeds nothing
            continue
        if depthwise or not writers or not readers:
            continue
        if not all(_rows(graph, m, index[id(m)][k]).eq(0).all() for m in writers):
            continue
        deltas = {}
        for m in readers:
            d = _fold(graph.modules[m.module], inputs.get(m.module), index[id(m)][k])
            if d is None:
                break
            deltas[m.module] = d
        else:
            keep[k] = False  # fed nothing: a constant, folded forward
            unit_folds[k] = deltas
    if not keep.any():
        keep[0] = True  # a group keeps at least one unit (so its layers keep a shape); it carries its own constant
    folds: dict[str, Tensor] = {}
    for k, deltas in unit_folds.items():
        if not keep[k]:
            for name, d in deltas.items():
                folds[name] = folds.get(name, 0) + d
    return torch.nonzero(keep).flatten(), folds


def _cols(graph: DependencyGraph, member, idx: Tensor) -> Tensor:
    return graph.modules[member.module].weight.detach().index_select(1, idx)


def _rows(graph: DependencyGraph, member, idx: Tensor) -> Tensor:
    module = graph.modules[member.module]
    return module.weight.detach().index_select(0, idx)


def _fold(reader: nn.Module, x: Tensor | None, idx: Tensor) -> Tensor | None:
    """The reader's bias change that replaces its constant input entries ``idx``, or None when not exact."""
    if x is None:
        return None
    w = reader.weight.detach()
    if isinstance(reader, nn.Linear):
        entries = x.reshape(-1, x.shape[-1]).index_select(1, idx)
        const = entries[0]
        if not _constant(entries, const):
            return None
        return w.index_select(1, idx) @ const.to(w.dtype)
    if getattr(reader, "groups", 1) != 1 or any(p != 0 for p in _tuple(reader.padding)):
        return None  # zero padding around a constant channel is not a constant: folding would not be exact
    entries = x.index_select(1, idx)
    const = entries.flatten()[0]
    if not _constant(entries, const):
        return None
    return w.index_select(1, idx).sum(dim=tuple(range(1, w.dim()))) * const.to(w.dtype)


def _constant(values: Tensor, const: Tensor) -> bool:
    """Equal to ``const`` up to a few rounding steps (an average pool of a constant may differ in the last bit)."""
    scale = float(values.abs().max()) if values.numel() else 0.0
    eps = torch.finfo(values.dtype).eps if values.is_floating_point() else 0.0
    return bool(((values - const).abs() <= 16 * eps * scale).all())


def _tuple(padding: object) -> tuple:
    if isinstance(padding, str):
        return (0,) if padding == "valid" else (1,)
    return padding if isinstance(padding, tuple) else (padding,)
