"""Blind ranges of activations, and which activation follows each prunable layer.

A layer's output is traced through the forward pass with a
``TorchFunctionMode``: per-element modules (eval BatchNorm, Dropout,
Identity) carry the trace on; an activation with a blind range records where
its input lies; any other use of the output (a residual add, pooling, a
reshape, the model's return value) means the neuron always matters. This
sees functional calls (``F.relu``) as well as modules and follows any Python
control flow, where a static graph walk would not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import CalibrationError


@dataclass(frozen=True)
class BlindRange:
    """An activation whose derivative is zero outside (low, high): the neuron is live inside."""

    low: float = -math.inf
    high: float = math.inf
    name: str = "custom"

    def live(self, z: Tensor) -> Tensor:
        """Boolean mask of pre-activations outside the blind range."""
        if math.isinf(self.high):
            return z > self.low
        if math.isinf(self.low):
            return z < self.high
        return (z > self.low) & (z < self.high)

    def __str__(self) -> str:
        return f"{self.name}({self.low:g}, {self.high:g})"


RELU = BlindRange(0.0, math.inf, "relu")
RELU6 = BlindRange(0.0, 6.0, "relu6")


def hardtanh(low: float = -1.0, high: float = 1.0) -> BlindRange:
    """The live interval of Hardtanh-like clamps (both tails saturate)."""
    return BlindRange(float(low), float(high), "hardtanh")


_PASSTHROUGH = {
    F.batch_norm,
    torch.batch_norm,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.Tensor.contiguous,
}


# Calls that read a tensor's metadata, not its values (BatchNorm checks ``input.dim()``).
_METADATA = {"dim", "ndimension", "size", "numel", "nelement", "__get__", "stride", "is_contiguous",
             "is_floating_point", "is_complex", "element_size", "data_ptr", "get_device", "__len__"}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def activation_blind_range(func, args: tuple, kwargs: dict) -> BlindRange | bool | None:
    """The blind range of a call if it is an activation with one; False if it is not."""
    if func in (F.relu, torch.relu, torch.relu_, F.relu_, torch.Tensor.relu, torch.Tensor.relu_):
        return RELU
    if func is F.relu6:
        return RELU6
    if func in (F.hardtanh, F.hardtanh_):
        return hardtanh(_arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))
    if func in (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clamp_, torch.clamp_min,
                torch.Tensor.clamp_min, torch.Tensor.clamp_min_):
        low = _arg(args, kwargs, 1, "min", None)
        high = _arg(args, kwargs, 2, "max", None)
        if isinstance(low, Tensor) or isinstance(high, Tensor):
            return False
        return BlindRange(
            -math.inf if low is None else float(low),
            math.inf if high is None else float(high),
            "clamp",
        )
    return False


class _Trace:
    """What the pass learned about one layer's output."""

    __slots__ = ("blind", "live", "other_use", "sources")

    def __init__(self) -> None:
        self.live: Tensor | None = None
        self.blind: set[str] = set()
        self.other_use = False
        self.sources: list[tuple[str | None, BlindRange]] = []

    def add_live(self, mask: Tensor) -> None:
        self.live = mask if self.live is None else (self.live | mask)


class LivenessTracer(TorchFunctionMode):
    """Follows marked layer outputs to the activations that consume them.

    ``overrides`` maps a layer name to a fixed BlindRange (trace the output to
    any consumer) or to None (never blind). Layers absent from it are traced.
    """

    def __init__(self) -> None:
        super().__init__()
        self._owner: dict[int, tuple[str, Tensor]] = {}
        self.traces: dict[str, _Trace] = {}
        #: id(tensor) -> name of the module that returned it last, when the caller tracks that.
        self.producers: dict[int, str] = {}

    def reset(self) -> None:
        """Forget everything traced (between batches, and to drop tensor references)."""
        self._owner.clear()
        self.traces.clear()

    def mark(self, name: str, output: Tensor) -> None:
        """Record that ``output`` is the fresh output of layer ``name``."""
        self.traces[name] = _Trace()
        self._owner[id(output)] = (name, output)

    def _owner_of(self, obj) -> str | None:
        hit = self._owner.get(id(obj)) if isinstance(obj, Tensor) else None
        return hit[0] if hit is not None and hit[1] is obj else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _METADATA:
            return func(*args, **kwargs)
        owners = []
        for i, a in enumerate(list(args) + list(kwargs.values())):
            items = a if isinstance(a, (list, tuple)) else (a,)
            for item in items:
                owner = self._owner_of(item)
                if owner is not None:
                    owners.append((i, owner))
        if not owners:
            return func(*args, **kwargs)
        first_owner = self._owner_of(args[0]) if args else None
        for i, owner in owners:
            if i != 0 or owner != first_owner:
                self.traces[owner].other_use = True
        if first_owner is None:
            return func(*args, **kwargs)
        trace = self.traces[first_owner]
        if func in _PASSTHROUGH:
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and out.shape == args[0].shape:
                self._owner[id(out)] = (first_owner, out)
            else:
                trace.other_use = True
            return out
        blind = activation_blind_range(func, args, kwargs)
        if isinstance(blind, BlindRange):
            # Before the call: an in-place activation overwrites its input.
            trace.add_live(blind.live(args[0]))
            trace.blind.add(str(blind))
            trace.sources.append((self.producers.get(id(args[0])), blind))
            out = func(*args, **kwargs)
            if out is args[0]:  # in place: the tensor now holds the activation's output
                del self._owner[id(out)]
            return out
        trace.other_use = True
        return func(*args, **kwargs)


def find_live_sources(model: torch.nn.Module, example: Tensor,
                      layers: dict[str, torch.nn.Module]) -> dict[str, tuple[str, BlindRange] | None]:
    """For each layer, the module whose output feeds its blind-range activation, and that range.

    One eval-mode forward of ``example`` under the tracer. None where the
    layer's output has another use or no blind-range activation, or where the
    activation's input is not the output of a module (a functional op), so
    training-time code can read liveness from that module's output.
    """
    tracer = LivenessTracer()
    names = {id(m): n for n, m in model.named_modules()}
    layer_ids = {id(m): n for n, m in layers.items()}

    def record(module: torch.nn.Module, args: tuple, output) -> None:
        if isinstance(output, Tensor):
            tracer.producers[id(output)] = names[id(module)]
            if id(module) in layer_ids:
                tracer.mark(layer_ids[id(module)], output)

    handles = [m.register_forward_hook(record) for m in model.modules()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), tracer:
            try:
                model(example)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise CalibrationError(
                    f"the example batch (shape {tuple(example.shape)}) does not fit the model: "
                    f"{(str(err).splitlines() or [''])[0]}"
                ) from err
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    out: dict[str, tuple[str, BlindRange] | None] = {}
    for name in layers:
        trace = tracer.traces.get(name)
        if trace is None or trace.other_use or not trace.sources:
            out[name] = None
            continue
        srcs = set(trace.sources)
        src, blind = next(iter(srcs))
        out[name] = (src, blind) if len(srcs) == 1 and src is not None else None
    tracer.reset()
    tracer.producers.clear()
    return out
