"""Physically smaller models: remove neurons and channels that can no longer affect the output.

After unstructured pruning, a unit (a Linear output neuron or a conv output
channel) can go when

* every weight reading it in the next layer is zero (it feeds nothing), or
* every weight into it is zero: it then outputs a constant, which is folded
  into the next layer's bias where that is exact (next layer Linear, or a
  conv without padding, or the constant is zero after the activation).

The result is an ordinary ``nn.Sequential`` of dense layers whose outputs
equal the masked model's. Only chains are handled: modules between two
prunable layers must act per channel (BatchNorm, pointwise activations,
dropout, pooling) or be the Flatten between conv and Linear; anything else
(a residual add, a normalisation across channels) is refused by name unless
``allow_approximate`` is set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.layers import is_prunable
from ..core.masks import copy_model, make_permanent
from ..errors import ShrinkError

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
              nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
              nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def flatten_chain(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaf modules of a (nested) nn.Sequential in order, or ShrinkError naming what is not a chain."""
    if is_prunable(model) or not list(model.children()):
        return [(prefix or type(model).__name__, model)]
    if not isinstance(model, nn.Sequential):
        raise ShrinkError(
            f"{prefix or 'the model'} ({type(model).__name__}) is not an nn.Sequential chain: its forward may "
            "add, concatenate or reuse outputs (e.g. a residual add), where removing units would not be exact"
        )
    out = []
    for name, child in model.named_children():
        out.extend(flatten_chain(child, f"{prefix}.{name}" if prefix else name))
    return out


@dataclass
class ShrinkReport:
    """Units kept per prunable layer, and the parameter counts before and after."""

    kept_units: dict[str, tuple[int, int]]
    params_before: int
    params_after: int

    def __str__(self) -> str:
        lines = [f"{'layer':16} {'units kept':>12}"]
        lines += [f"{n:16} {k:>5} / {t:<5}" for n, (k, t) in self.kept_units.items()]
        lines.append(f"parameters: {self.params_before} -> {self.params_after} "
                     f"({self.params_after / max(self.params_before, 1):.1%})")
        return "\n".join(lines)


def _effective(module: nn.Module) -> nn.Module:
    """A plain copy of a module: masks folded into weights, no hooks."""
    clone = make_permanent(copy_model(module))
    clone._forward_hooks.clear()
    clone._forward_pre_hooks.clear()
    return clone


def _check_between(chain: list[tuple[str, nn.Module]], start: int, stop: int, allow_approximate: bool) -> None:
    for name, m in chain[start:stop]:
        if isinstance(m, _BATCHNORM + _POINTWISE + _POOLS):
            continue
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            continue
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            continue
        if not allow_approximate:
            raise ShrinkError(
                f"module {name!r} ({type(m).__name__}) sits between prunable layers and may mix channels; "
                "removing units across it would not be exact (pass allow_approximate=True to accept that)"
            )


def _units(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def _in_columns(layer_b: nn.Module, unit: int, per_unit: int) -> slice:
    """Which of layer b's input columns (dim 1 of its weight) read unit ``unit`` of the previous layer."""
    return slice(unit * per_unit, (unit + 1) * per_unit)


def _slice_channelwise(m: nn.Module, keep: Tensor) -> nn.Module:
    if isinstance(m, _BATCHNORM):
        ref = m.weight if m.affine else m.running_mean
        new = type(m)(int(keep.sum()), eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            if m.affine:
                new.weight.copy_(m.weight[keep])
                new.bias.copy_(m.bias[keep])
            if m.track_running_stats:
                new.running_mean.copy_(m.running_mean[keep])
                new.running_var.copy_(m.running_var[keep])
                new.num_batches_tracked.copy_(m.num_batches_tracked)
        new.train(m.training)
        return new
    return m


def shrink(model: nn.Module, example_input: Tensor, *,
           allow_approximate: bool = False) -> tuple[nn.Sequential, ShrinkReport]:
    """A smaller dense ``nn.Sequential`` computing what the (masked) ``model`` computes.

    ``example_input`` (one batch, any size) gives the shapes at each Flatten.
    The model itself is not changed.
    """
    chain = [(n, _effective(m)) for n, m in flatten_chain(model)]
    for _, m in chain:
        m.eval()
    positions = [i for i, (_, m) in enumerate(chain) if is_prunable(m)]
    if len(positions) < 1:
        raise ShrinkError("the model has no prunable layer to shrink")
    for a, b in itertools.pairwise(positions):
        _check_between(chain, a + 1, b, allow_approximate)
    shapes = []
    with torch.no_grad():
        x = example_input[:1]
        for name, m in chain:
            try:
                x = m(x)
            except (RuntimeError, ValueError, TypeError) as err:
                raise ShrinkError(f"example_input of shape {tuple(example_input.shape)} does not fit the model "
                                  f"at {name!r}: {str(err).splitlines()[0]}") from err
            shapes.append(tuple(x.shape[1:]))
    params_before = sum(p.numel() for p in model.parameters())
    totals = {chain[p][0]: _units(chain[p][1]) for p in positions}

    changed = True
    while changed:
        changed = False
        for a, b in itertools.pairwise(positions):
            changed |= _shrink_pair(chain, shapes, a, b)
    new = nn.Sequential(*[m for _, m in chain])
    new.train(model.training)
    report = ShrinkReport({chain[p][0]: (_units(chain[p][1]), totals[chain[p][0]]) for p in positions},
                          params_before, sum(p.numel() for p in new.parameters()))
    return new, report


def _shrink_pair(chain: list[tuple[str, nn.Module]], shapes: list[tuple], a: int, b: int) -> bool:
    """Remove the removable units between prunable layers at chain positions a and b; True if any."""
    la, lb = chain[a][1], chain[b][1]
    if getattr(la, "groups", 1) != 1 or getattr(lb, "groups", 1) != 1:
        return False  # grouped convs tie channels together: keep them
    n = _units(la)
    width = lb.weight.shape[1]
    if width % n:
        return False
    per_unit = width // n
    wa = la.weight.detach().reshape(n, -1)
    wb = lb.weight.detach()
    feeds_nothing = torch.stack([(wb[:, _in_columns(lb, i, per_unit)] == 0).all() for i in range(n)])
    fed_nothing = (wa == 0).all(1)
    # What a unit fed nothing outputs after the modules in between: a constant per unit.
    const = torch.zeros(1, *shapes[a], dtype=la.weight.dtype)
    if la.bias is not None:
        const += la.bias.detach().reshape(1, n, *([1] * (const.dim() - 2)))
    with torch.no_grad():
        y = const
        for _, m in chain[a + 1:b]:
            y = m(y)
    y = y.reshape(1, width, *y.shape[2:]) if isinstance(lb, nn.Linear) else y
    delta = torch.zeros(lb.weight.shape[0], dtype=lb.weight.dtype)
    foldable = torch.zeros(n, dtype=torch.bool)
    for i in torch.nonzero(fed_nothing & ~feeds_nothing).flatten().tolist():
        cols = _in_columns(lb, i, per_unit)
        if isinstance(lb, nn.Linear):
            delta += wb[:, cols] @ y.reshape(-1)[cols]
            foldable[i] = True
            continue
        value = y[0, i]
        if (value == 0).all():
            foldable[i] = True
        elif all(p == 0 for p in lb._reversed_padding_repeated_twice) and (value == value.flatten()[0]).all():
            delta += wb[:, i].reshape(wb.shape[0], -1).sum(1) * value.flatten()[0]
            foldable[i] = True
    remove = feeds_nothing | (fed_nothing & foldable)
    if remove.all():
        remove[0] = False  # keep one unit so every layer stays a valid module
    if not remove.any():
        return False
    keep = ~remove
    if delta.any():
        if lb.bias is None:
            lb.bias = nn.Parameter(torch.zeros(lb.weight.shape[0], dtype=lb.weight.dtype))
        with torch.no_grad():
            lb.bias += delta
    chain[a] = (chain[a][0], _slice_out(la, keep))
    for j in range(a + 1, b):
        chain[j] = (chain[j][0], _slice_channelwise(chain[j][1], keep))
    cols = keep.repeat_interleave(per_unit)
    chain[b] = (chain[b][0], _slice_in(lb, cols))
    for j in range(a, b):  # shapes of the modules now narrower
        if len(shapes[j]) and j < b:
            shapes[j] = (int(keep.sum()) * (shapes[j][0] // n), *shapes[j][1:]) if shapes[j][0] % n == 0 else shapes[j]
    return True


def _slice_out(layer: nn.Module, keep: Tensor) -> nn.Module:
    k = int(keep.sum())
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, k, bias=layer.bias is not None)
    else:
        new = type(layer)(layer.in_channels, k, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, groups=1, bias=layer.bias is not None,
                          padding_mode=layer.padding_mode)
    new = new.to(layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight[keep])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[keep])
    return new


def _slice_in(layer: nn.Module, cols: Tensor) -> nn.Module:
    k = int(cols.sum())
    if isinstance(layer, nn.Linear):
        new = nn.Linear(k, layer.out_features, bias=layer.bias is not None)
    else:
        new = type(layer)(k, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, groups=1, bias=layer.bias is not None,
                          padding_mode=layer.padding_mode)
    new = new.to(layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, cols])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new
