"""Contribution statistics: running sums per layer, their matrix-product forms, merge, finalise.

For a layer W (O x I), inputs x, liveness L (1 where the neuron's
pre-activation lies outside the next activation's blind range) and
D = |x| |W|^T + |b| + eps, every statistic is a ratio of sums of the form
``sum_samples g_i x_j``, computed as one matrix product (Linear) or one
weight-gradient convolution (conv) per batch; see METHOD.md. Products run in
the layer's dtype (float32 for half types), sums accumulate in float64, and
inputs are shifted by a per-channel mean of the first batch so variances do
not cancel.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..defaults import DEFAULT_LIVENESS
from ..errors import (
    CalibrationError,
    MissingLabelsError,
    NonFiniteActivationError,
    RelpruneError,
    StatisticNotCollectedError,
    StatsMismatchError,
)
from . import layers as L
from .liveness import BlindRange, LivenessTracer

EPS = 1e-12

#: Each public statistic -> the running sums it needs.
STATISTICS: dict[str, frozenset[str]] = {
    "contribution_mean": frozenset({"s1"}),
    "contribution_std": frozenset({"s1", "s2"}),
    "abs_contribution_mean": frozenset({"sa"}),
    "relative_mean": frozenset({"r1"}),
    "relative_std": frozenset({"r1", "r2"}),
    "input_sq_mean": frozenset({"s1", "s2"}),
    "input_gram": frozenset({"gram"}),
    "weight_grad": frozenset({"grad"}),
}
#: Statistics that are not weight-shaped (Linear layers only): the I x I input second moment.
GRAM_STATISTICS = frozenset({"input_gram"})
#: Sums that are moments of the inputs alone: no per-output factor but liveness.
_INPUT_MOMENTS = frozenset({"s1", "s2", "sa", "gram"})
#: Statistics built only from input moments: without liveness they hold for any weights of the layer.
INPUT_MOMENT_STATISTICS = frozenset(s for s, sums in STATISTICS.items() if sums <= _INPUT_MOMENTS)
# What ``statistics=None`` gathers: every weight-shaped statistic of the activations.
ACTIVATION_STATISTICS = tuple(s for s in STATISTICS if s != "weight_grad" and s not in GRAM_STATISTICS)

LivenessOverride = BlindRange | Callable[[Tensor], Tensor] | None


def _needed_sums(statistics: Iterable[str]) -> frozenset[str]:
    sums: set[str] = set()
    for s in statistics:
        if s not in STATISTICS:
            raise CalibrationError(f"unknown statistic {s!r}; known: {', '.join(STATISTICS)}")
        sums |= STATISTICS[s]
    return frozenset(sums)


def _shift_as_weight(shift: Tensor, weight_shape: torch.Size, groups: int) -> Tensor:
    """The per-input-channel shift broadcast to the weight's shape (each output sees its group's inputs)."""
    o = weight_shape[0]
    k = shift.reshape(groups, -1).repeat_interleave(o // groups, dim=0)  # (O, in/groups)
    return k.reshape(o, -1, *([1] * (len(weight_shape) - 2))) if len(weight_shape) > 2 else k


@dataclass
class LayerStats:
    """Running sums for one layer; properties turn them into weight-shaped statistics.

    All statistics are over live samples when liveness was on (over all
    samples otherwise); a neuron never live gets zeros.
    """

    kind: str
    weight: Tensor
    bias: Tensor | None
    groups: int
    statistics: frozenset[str]
    liveness: str | None
    shift: Tensor
    live_count: Tensor
    total_count: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    grad_batches: int = 0
    #: ``weight`` is the layer's own tensor, not a copy, while this matches its version counter
    #: (None: an owned copy). Changing the weights in place afterwards invalidates these statistics.
    weight_version: int | None = None

    def weight_changed(self) -> bool:
        """True when the layer's weights were changed in place since the statistics were gathered."""
        return self.weight_version is not None and self.weight._version != self.weight_version

    def checked_weight(self) -> Tensor:
        """The weights the statistics were gathered with (raises if they have changed since)."""
        if self.weight_changed():
            raise StatsMismatchError(
                "the layer's weights were changed in place after collect_stats (training, a re-fit, "
                "load_state_dict); call collect_stats again")
        return self.weight

    # -- finalised statistics ------------------------------------------------
    def _sum(self, key: str, stat: str) -> Tensor:
        if key not in self.sums:
            raise StatisticNotCollectedError(
                f"statistic {stat!r} was not collected; pass statistics=[..., {stat!r}] "
                f"(or None for all) to collect_stats"
            )
        return self.sums[key]

    def _n(self) -> Tensor:
        return self.live_count.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def _per_live(self, key: str, stat: str) -> Tensor:
        return self._sum(key, stat) / self._n().clamp_min(1)

    def _shift_as_weight(self) -> Tensor:
        return _shift_as_weight(self.shift, self.weight.shape, self.groups)

    def _w(self) -> Tensor:
        return self.checked_weight().double()

    @property
    def input_mean(self) -> Tensor:
        """E_live[x_j] for neuron i, weight-shaped."""
        mean = self._per_live("s1", "contribution_mean") + self._shift_as_weight()
        return torch.where(self._n() > 0, mean, torch.zeros_like(mean))

    @property
    def input_var(self) -> Tensor:
        """Var_live[x_j] for neuron i (population variance), weight-shaped."""
        m1 = self._per_live("s1", "contribution_std")
        return (self._per_live("s2", "contribution_std") - m1 * m1).clamp_min(0)

    @property
    def contribution_mean(self) -> Tensor:
        """E[c_ij] = W_ij E[x_j]."""
        return self._w() * self.input_mean

    @property
    def contribution_std(self) -> Tensor:
        """Std[c_ij] = |W_ij| Std[x_j]."""
        return self._w().abs() * self.input_var.sqrt()

    @property
    def input_sq_mean(self) -> Tensor:
        """E[x_j^2] over the neuron's live samples (Wanda's squared input norm per sample)."""
        return self.input_var + self.input_mean**2

    @property
    def abs_contribution_mean(self) -> Tensor:
        """E[|c_ij|]."""
        return self._w().abs() * self._per_live("sa", "abs_contribution_mean")

    @property
    def relative_mean(self) -> Tensor:
        """E[r_ij], r_ij = |c_ij| / (sum_k |c_ik| + |b_i| + eps)."""
        return self._w().abs() * self._per_live("r1", "relative_mean")

    @property
    def relative_std(self) -> Tensor:
        """Std[r_ij]."""
        second = self._w() ** 2 * self._per_live("r2", "relative_std")
        return (second - self.relative_mean**2).clamp_min(0).sqrt()

    @property
    def input_gram(self) -> Tensor:
        """E[x x^T] over the calibration tokens (I x I; SparseGPT's Hessian up to a factor 2)."""
        return self._sum("gram", "input_gram") / max(self.total_count, 1)

    @property
    def weight_grad(self) -> Tensor:
        """Mean over calibration batches of dLoss/dW."""
        return self._sum("grad", "weight_grad") / max(self.grad_batches, 1)

    def get(self, stat: str) -> Tensor:
        """A statistic by name (as in ``STATISTICS``)."""
        if stat not in STATISTICS:
            raise StatisticNotCollectedError(f"unknown statistic {stat!r}")
        return getattr(self, stat)

    # -- merging -------------------------------------------------------------
    def __add__(self, other: LayerStats) -> LayerStats:
        if not isinstance(other, LayerStats):
            return NotImplemented
        if (other.kind, tuple(other.weight.shape), other.liveness is None) != (
            self.kind, tuple(self.weight.shape), self.liveness is None
        ) or other.sums.keys() != self.sums.keys():
            raise StatsMismatchError("cannot merge statistics of different layers or settings")
        if not torch.equal(other.checked_weight(), self.checked_weight()):
            raise StatsMismatchError("cannot merge statistics gathered with different weights")
        o = other._rebased(self.shift)
        sums = {k: v + o[k] for k, v in self.sums.items()}
        return LayerStats(
            self.kind, self.weight, self.bias, self.groups, self.statistics, self.liveness,
            self.shift, self.live_count + other.live_count, self.total_count + other.total_count,
            sums, self.grad_batches + other.grad_batches, self.weight_version,
        )

    def _rebased(self, shift: Tensor) -> dict[str, Tensor]:
        """This layer's sums re-expressed around another input shift."""
        sums = dict(self.sums)
        if "s1" in sums and not torch.equal(shift, self.shift):
            d = self._shift_as_weight() - _shift_as_weight(shift, self.weight.shape, self.groups)
            n = self._n()
            if sums["s1"].shape[0] == 1 < d.shape[0]:
                d, n = d[:1], n[:1]  # lean (1, I) input moments: every row saw the same samples
            if "s2" in sums:
                sums["s2"] = sums["s2"] + 2 * d * sums["s1"] + n * d * d
            sums["s1"] = sums["s1"] + n * d
        return sums


class Stats(Mapping[str, LayerStats]):
    """Layer name -> LayerStats for one model. Add two to merge disjoint calibration sets."""

    def __init__(self, layers: dict[str, LayerStats], *, liveness: bool, statistics: frozenset[str]):
        self._layers = dict(layers)
        self.liveness = liveness
        self.statistics = frozenset(statistics)

    def __getitem__(self, name: str) -> LayerStats:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        total = next(iter(self._layers.values())).total_count if self._layers else 0
        return (f"Stats({len(self)} layers, liveness={self.liveness}, "
                f"statistics={sorted(self.statistics)}, samples at first layer={total})")

    def __add__(self, other: Stats) -> Stats:
        if not isinstance(other, Stats):
            return NotImplemented
        if other.keys() != self.keys():
            raise StatsMismatchError("cannot merge statistics of different layer sets")
        return Stats({k: self[k] + other[k] for k in self}, liveness=self.liveness,
                     statistics=self.statistics)

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's layers these stats describe; raises if names or weight shapes differ."""
        modules = dict(model.named_modules())
        missing = [n for n in self if n not in modules]
        if missing:
            raise StatsMismatchError(f"statistics name layers the model lacks: {missing}")
        out = {}
        for name, ls in self.items():
            m = modules[name]
            if not L.is_prunable(m) or tuple(L.weight_shape(m)) != tuple(ls.weight.shape):
                shape = tuple(L.weight_shape(m)) if L.is_prunable(m) else None
                raise StatsMismatchError(
                    f"layer {name!r}: statistics were gathered for weight shape "
                    f"{tuple(ls.weight.shape)}, the model has {type(m).__name__} with {shape}"
                )
            out[name] = m
        return out

    # -- persistence (merge across machines) ---------------------------------
    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (sums and metadata, no pickle)."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"liveness": self.liveness, "statistics": sorted(self.statistics), "layers": {}}
        for name, ls in self.items():
            p = f"{name}::"
            tensors[p + "weight"] = ls.checked_weight().detach().contiguous().cpu()
            tensors[p + "shift"] = ls.shift.contiguous().cpu()
            tensors[p + "live_count"] = ls.live_count.contiguous().cpu()
            if ls.bias is not None:
                tensors[p + "bias"] = ls.bias.detach().contiguous().cpu()
            for k, v in ls.sums.items():
                tensors[p + "sum." + k] = v.contiguous().cpu()
            meta["layers"][name] = {
                "kind": ls.kind, "groups": ls.groups, "statistics": sorted(ls.statistics),
                "liveness": ls.liveness, "total_count": ls.total_count, "grad_batches": ls.grad_batches,
            }
        save_file(tensors, str(path), metadata={"relprune_stats": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        """Read what :meth:`save` wrote."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise StatsMismatchError(f"{path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("relprune_stats")
                if raw is None:
                    raise StatsMismatchError(f"{path} is not a relprune statistics file")
                meta = json.loads(raw)
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except (SafetensorError, json.JSONDecodeError) as err:
            raise StatsMismatchError(f"{path} is not a readable relprune statistics file: {err}") from err
        layers = {}
        for name, m in meta["layers"].items():
            p = f"{name}::"
            sums = {k[len(p) + 4:]: v for k, v in t.items() if k.startswith(p + "sum.")}
            layers[name] = LayerStats(
                m["kind"], t[p + "weight"], t.get(p + "bias"), m["groups"], frozenset(m["statistics"]),
                m["liveness"], t[p + "shift"], t[p + "live_count"], m["total_count"], sums, m["grad_batches"],
            )
        return cls(layers, liveness=meta["liveness"], statistics=frozenset(meta["statistics"]))


# -- collection -----------------------------------------------------------------

def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class Batch:
    """One calibration batch in the form every caller's batch is normalised to.

    The model is called as ``model(*args, **kwargs)``. ``token_mask`` (shape of the Linear
    inputs' leading dimensions, e.g. (batch, tokens)) marks the rows that count: padding
    tokens never enter a statistic. ``target`` feeds gradient statistics.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Tensor | None = None
    token_mask: Tensor | None = None

    @property
    def first(self) -> Any:
        """The first tensor argument (what error messages describe)."""
        return self.args[0] if self.args else next(iter(self.kwargs.values()), None)

    def to(self, device: torch.device) -> Batch:
        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, Tensor) else v
        return Batch(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()},
                     move(self.target), move(self.token_mask))


def split_batch(batch: Any) -> Batch:
    """Normalise a calibration batch.

    Accepted: a tensor; a tuple/list (input first, target second); a dict with ``input`` (and
    ``target``/``label``/``labels``); a dict of keyword arguments as Hugging Face models take them
    (``input_ids``, ``attention_mask``, ..., ``labels`` as the target; a 2-D ``attention_mask``
    also masks tokens out of every statistic); or a :class:`Batch`.
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Tensor):
        return Batch((batch,))
    if isinstance(batch, (tuple, list)) and batch:
        return Batch((batch[0],), target=batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping) and "input" in batch:
        target = next((batch[k] for k in ("target", "label", "labels") if k in batch), None)
        return Batch((batch["input"],), target=target)
    if isinstance(batch, Mapping) and batch and all(isinstance(k, str) for k in batch):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        mask = kwargs.get("attention_mask")
        token_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        return Batch((), kwargs, target=batch.get("labels"), token_mask=token_mask)
    raise CalibrationError(
        f"a calibration batch must be a tensor, a tuple/list whose first element is the input, "
        f"or a dict (with key 'input', or of keyword arguments); got {type(batch).__name__}"
    )


FLUSH_EVERY = 16
#: |W| of a Linear is taken this many slices of output rows at a time when it is not cached, and
#: float64 sums take their pending buffers in as many slices: temporaries stay a fraction of a weight.
ROW_SLICES = 4
#: |W| is cached (one weight's memory) when a collection holds at least this many weight-shaped
#: sums, where it adds a sixth or less to the memory and saves an |W| per batch; with fewer (``rc``
#: alone: its sum and one pending buffer) it would be a third more.
CACHE_ABS_FROM = 3
_WEIGHT_SHAPED = frozenset({"s1", "s2", "sa", "r1", "r2"})


def _row_slices(rows: int) -> list[slice]:
    step = max(1, -(-rows // ROW_SLICES))
    return [slice(r, r + step) for r in range(0, rows, step)]


class _Scratch:
    """Per-layer working state of one collection: |W| (or a slice of it) and sums pending in the compute dtype.

    Every batch product lands in a compute-dtype buffer in place (``addmm_``: no temporary) and
    moves into the float64 sums every ``FLUSH_EVERY`` batches, so the float64 conversion and add
    are paid rarely while rounding stays that of a short sum.
    """

    def __init__(self) -> None:
        self.abs_weight: Tensor | None = None
        self.pending: dict[str | tuple[str, ...], Tensor] = {}
        self.batches = 0

    def add(self, layer: nn.Module, key: str | tuple[str, ...], x: Tensor, g: Tensor, ls: LayerStats) -> None:
        buf = self.pending.get(key)
        if L.is_linear(layer):
            if buf is None:
                self.pending[key] = g.t() @ x
            else:
                buf.addmm_(g.t(), x)
        elif buf is None:
            self.pending[key] = L.weighted_input_sum(layer, x, g)
        else:
            buf.add_(L.weighted_input_sum(layer, x, g))

    def add_gram(self, x_counted: Tensor, x: Tensor) -> None:
        buf = self.pending.get("gram")
        if buf is None:
            self.pending["gram"] = x_counted.t() @ x
        else:
            buf.addmm_(x_counted.t(), x)

    def flush(self, ls: LayerStats, force: bool = False) -> None:
        self.batches += 1
        if force or self.batches % FLUSH_EVERY == 0:
            for key, buf in self.pending.items():
                # Row slices: adding a compute-dtype buffer into float64 converts it first, and a
                # whole weight-sized conversion would be the collection's largest temporary.
                keys = key if isinstance(key, tuple) else (key,)
                for k, part in zip(keys, buf.chunk(len(keys), dim=1) if len(keys) > 1 else (buf,), strict=True):
                    target, flat = ls.sums[k], part.reshape(ls.sums[k].shape)
                    for rows in _row_slices(target.shape[0]):
                        target[rows].add_(flat[rows])
            self.pending.clear()


def _accumulate(layer: nn.Module, ls: LayerStats, scratch: _Scratch, x: Tensor, out_shape: torch.Size,
                live: Tensor | None, need: frozenset[str], rows: Tensor | None = None) -> None:
    """Add one batch's sums for one layer. ``live`` is the liveness mask (None: all live);
    ``rows`` (Linear only) keeps the input rows that count, e.g. tokens that are not padding."""
    cd = _compute_dtype(x)
    x = x.to(cd)
    xp = L.input_rows(layer, x)
    if live is None:
        # Without liveness every output sees the same samples: one column of ones serves them all,
        # and the input moments come out as (1, I) rows (see _new_layer_stats).
        shape = (xp.shape[0], 1) if L.is_linear(layer) else out_shape
        g = torch.ones(shape, dtype=cd, device=x.device)
    else:
        g = L.output_rows(layer, live).to(cd)
    if rows is not None:
        g = g * rows.to(cd).unsqueeze(1)
    if "gram" in need:
        # Not per neuron: every counted row (a conv: every receptive field), whatever the liveness.
        patches = L.patch_rows(layer, xp)
        kept = patches if rows is None else patches * rows.to(cd).unsqueeze(1)
        scratch.add_gram(kept, patches)
    ls.live_count.add_(L.per_output_count(layer, g))
    ls.total_count += L.samples_in(layer, g) if rows is None else int(rows.sum())
    a = xp.abs() if need & {"sa", "r1", "r2"} else None
    shared = sorted(need & {"s1", "s2", "sa"})
    if L.is_linear(layer) and g.shape[1] > 1 and len(shared) > 1:
        # The moments that share g (live samples) as their left factor: one product against their
        # inputs side by side, which runs faster than one product each.
        xs = xp - ls.shift.to(cd).reshape(1, -1)
        parts = {"s1": xs, "s2": xs * xs, "sa": a}
        scratch.add(layer, tuple(shared), torch.cat([parts[k] for k in shared], dim=1), g, ls)
        need = need - set(shared)
    if need & {"s1", "s2"}:
        view = (1, -1) if L.is_linear(layer) else (1, -1, *([1] * L.conv_dims(layer)))
        xs = xp - ls.shift.to(cd).reshape(view)
        if "s1" in need:
            scratch.add(layer, "s1", xs, g, ls)
        if "s2" in need:
            scratch.add(layer, "s2", xs * xs, g, ls)
    if "sa" in need:
        scratch.add(layer, "sa", a, g, ls)
    if need & {"r1", "r2"}:
        if L.is_linear(layer) and len(need & _WEIGHT_SHAPED) < CACHE_ABS_FROM:
            # D^T = |W| |x|^T (outputs x rows), |W| taken a slice of rows at a time: no weight-sized
            # copy of |W| exists, and each slice's product lands in place.
            w = ls.weight.detach()
            dt = torch.empty(w.shape[0], a.shape[0], dtype=cd, device=a.device)
            for rows in _row_slices(w.shape[0]):
                torch.mm(w[rows].to(cd).abs(), a.t(), out=dt[rows])
            if ls.bias is not None:
                dt.add_(ls.bias.to(cd).abs().unsqueeze(1))
            dt.add_(EPS)
            if "r2" not in need:
                # g / D in place, in D^T's own (contiguous) layout: the one (outputs x rows) temporary.
                gdt = dt.reciprocal_().mul_(g.t())
                scratch.add(layer, "r1", a, gdt.t(), ls)
                return
            d = dt.t()
        else:
            if scratch.abs_weight is None or scratch.abs_weight.dtype != cd:
                scratch.abs_weight = ls.weight.detach().to(cd).abs()
            d = L.forward_with(layer, a, scratch.abs_weight)
            if ls.bias is not None:
                d.add_(L.bias_view(layer, ls.bias.to(cd).abs()))
            d.add_(EPS)
        gd = g / d
        if "r1" in need:
            scratch.add(layer, "r1", a, gd, ls)
        if "r2" in need:
            scratch.add(layer, "r2", a * a, gd / d, ls)


def _sum_shape(layer: nn.Module, key: str, liveness: str | None, weight_shape: torch.Size) -> tuple[int, ...]:
    """Weight-shaped, except the I x I gram, and input moments of a Linear without liveness: every
    output sees the same samples, so one (1, I) row holds them (O times less memory)."""
    if key == "gram":
        fan_in = math.prod(weight_shape[1:])
        return (fan_in, fan_in)
    if key in _INPUT_MOMENTS and liveness is None and L.is_linear(layer):
        return (1, weight_shape[1])
    return tuple(weight_shape)


def _new_layer_stats(layer: nn.Module, x: Tensor | None, liveness: str | None, statistics: frozenset[str],
                     need: frozenset[str], shift: Tensor | None = None) -> LayerStats:
    """Zero sums for ``layer``, centred on the mean of ``x``'s input channels (or on ``shift``)."""
    # The layer's own weights, not a copy (a copy would cost as much memory as the model): their
    # version counter tells later if they were changed in place.
    w = L.oriented(layer, layer.weight.detach())
    if shift is None:
        assert x is not None
        # Per input channel: Linear rows are (N, I), conv inputs (B, C, *spatial); channels are dim 1.
        rows = x.reshape(-1, x.shape[-1]) if L.is_linear(layer) else x
        dims = (0, *range(2, rows.dim()))
        shift = rows.double().mean(dim=dims) if need & {"s1", "s2"} else torch.zeros(
            rows.shape[1], dtype=torch.float64, device=x.device)
    if "gram" in need and not L.gram_supported(layer):
        raise CalibrationError(f"statistic 'input_gram' (SparseGPT, reconstruction, obs) supports Linear layers and "
                               f"ungrouped 1-d/2-d convolutions; {type(layer).__name__} (groups="
                               f"{getattr(layer, 'groups', 1)}) is not (pass layers= to leave it out)")
    sums = {k: torch.zeros(_sum_shape(layer, k, liveness, w.shape), dtype=torch.float64, device=w.device)
            for k in need}
    return LayerStats(
        kind=type(layer).__name__, weight=w, weight_version=w._version,
        bias=None if layer.bias is None else layer.bias.detach().clone(),
        groups=getattr(layer, "groups", 1), statistics=statistics, liveness=liveness,
        shift=shift, live_count=torch.zeros(w.shape[0], dtype=torch.float64, device=w.device),
        sums=sums,
    )


def _empty_layer_stats(layer: nn.Module, liveness: str | None, shift: Tensor,
                       statistics: frozenset[str]) -> LayerStats:
    """Zero sums for a rank that saw no calibration batch (distributed calibration)."""
    return _new_layer_stats(layer, None, liveness, statistics, _needed_sums(statistics), shift=shift)


def _resolve_statistics(statistics: Iterable[str] | None, has_labels: bool) -> frozenset[str]:
    if statistics is None:
        return frozenset(ACTIVATION_STATISTICS) | ({"weight_grad"} if has_labels else set())
    stats = frozenset([statistics] if isinstance(statistics, str) else statistics)
    _needed_sums(stats)
    if not stats:
        raise CalibrationError("statistics= is empty: name at least one statistic, or pass None for all")
    return stats


def _check_finite(name: str, what: str, t: Tensor) -> None:
    # A NaN or Inf anywhere makes the sum non-finite: one cheap reduction on the common path.
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "Inf"
        raise NonFiniteActivationError(f"{bad} in the {what} of layer {name!r} during calibration")


def _snapshot_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Iterable[str] | None = None,
    liveness: bool = DEFAULT_LIVENESS,
    statistics: Iterable[str] | None = None,
    blind_ranges: Mapping[str, LivenessOverride] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = False,
    distributed: bool | None = None,
) -> Stats:
    """Gather contribution statistics of the prunable layers over calibration batches.

    Runs ``model`` in eval mode without gradients (one extra forward and
    backward per batch only when ``weight_grad`` is asked for, which needs
    labelled batches). ``blind_ranges`` overrides liveness per layer: a
    BlindRange or a callable applied to the layer's raw output, or None for
    "always live". The model's parameters, buffers, hooks and modes are left
    as they were, also when an error is raised.

    Under torch.distributed (a process group initialised, e.g. by torchrun), every rank calls this
    with its own share of the batches and gets the statistics of all ranks' batches together
    (``distributed=None``, the default; ``False`` keeps each rank's own, ``True`` insists on a
    process group). A rank may have no batches; an error on one rank is raised on every rank.
    """
    from . import distributed as _dist

    merge_ranks = _dist.active(distributed)
    chosen = L.prunable_layers(model, layers)
    if layers is None:
        L.warn_left_out(model)
    overrides = dict(blind_ranges or {})
    unknown = [n for n in overrides if n not in chosen]
    if unknown:
        raise CalibrationError(f"blind_ranges names layers that are not being collected: {unknown}")
    wrong = [n for n, r in overrides.items() if not (r is None or isinstance(r, BlindRange) or callable(r))]
    if wrong:
        raise CalibrationError(f"blind_ranges values must be a BlindRange, a callable or None; see {wrong}")
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise CalibrationError(
            f"batches must be an iterable of batches (a list or a DataLoader), got {type(batches).__name__}; "
            "wrap a single batch in a list"
        )
    if statistics is not None:
        _resolve_statistics(statistics, True)  # validate names before any work
    modes = _snapshot_modes(model)
    layer_names = {id(m): n for n, m in chosen.items()}
    stashed: dict[str, tuple[Tensor, torch.Size, int, Tensor | None]] = {}
    tracer = LivenessTracer()

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        name = layer_names[id(module)]
        x = args[0]
        # An override reads the raw output here, before anything downstream can change it in place.
        if name in stashed:
            # One weight, several call sites: the statistics would describe one call only.
            raise CalibrationError(f"layer {name!r} is called more than once in one forward pass (one module "
                                   "at several places); give each place its own module, or leave it out with "
                                   "layers=")
        rule = overrides.get(name) if liveness else None
        mask = None if rule is None else _override_mask(name, rule, output)
        stashed[name] = (x, output.shape, x._version, mask)
        tracer.mark(name, output)

    handles = [m.register_forward_hook(hook) for m in chosen.values()]
    result: dict[str, LayerStats] = {}
    scratches: dict[str, _Scratch] = {}
    wanted: frozenset[str] | None = None
    need: frozenset[str] = frozenset()
    traced = False
    error: Exception | None = None
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        iterator: Iterable[Any] = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="calibration", unit="batch", disable=None, leave=False)
        seen = 0
        for batch in iterator:
            b = split_batch(batch)
            x = b.first
            if not isinstance(x, Tensor):
                raise CalibrationError(f"calibration input must be a tensor, got {type(x).__name__}")
            if x.numel() == 0 or x.shape[0] == 0:
                raise CalibrationError(f"calibration batch {seen} is empty (shape {tuple(x.shape)})")
            if b.token_mask is not None and not b.token_mask.any():
                raise CalibrationError(f"calibration batch {seen}: its attention_mask masks every token")
            if wanted is None:
                wanted = _resolve_statistics(statistics, b.target is not None or _has_logits_target(b))
                need = _needed_sums(wanted)
            b = b.to(device)
            x = b.first
            stashed.clear()
            tracer.reset()
            act_need = need - {"grad"}
            # Tracing costs a Python call per torch function; after the first batch it runs only if
            # some layer has a blind range to trace (a SiLU or GELU network has none).
            tracing = liveness and (seen == 0 or traced)
            with torch.no_grad(), tracer if tracing else contextlib.nullcontext():
                _run_model(model, b, seen)
            for name, layer in chosen.items():
                if name not in stashed:
                    raise CalibrationError(f"layer {name!r} was not called by the model's forward pass")
                inp, out_shape, version, override = stashed[name]
                _check_finite(name, "input", inp)
                if inp._version != version:
                    raise CalibrationError(
                        f"the input of layer {name!r} was modified in place later in the forward pass; "
                        "make that operation out of place to collect statistics"
                    )
                live, how = _liveness_for(name, tracer, overrides, liveness, override)
                if name not in result:
                    result[name] = _new_layer_stats(layer, inp, how, wanted, need)
                if act_need:
                    scratch = scratches.setdefault(name, _Scratch())
                    _accumulate(layer, result[name], scratch, inp, out_shape, live, act_need,
                                _token_rows(layer, inp, b.token_mask))
                    scratch.flush(result[name])
            stashed.clear()  # the gradient pass below calls every layer again
            if "grad" in need:
                if b.target is None and not _has_logits_target(b):
                    raise MissingLabelsError(
                        "statistic 'weight_grad' needs labelled batches: (input, target) tuples, "
                        "dicts with 'input' and 'target', or keyword dicts with 'labels' or 'input_ids'"
                    )
                _accumulate_grads(model, chosen, result, b, loss_fn)
            stashed.clear()
            if seen == 0:
                traced = any(r.liveness is not None and not r.liveness.startswith("override:")
                             for r in result.values())
            seen += 1
        if seen == 0 and not merge_ranks:
            raise CalibrationError("the calibration batches are empty: no batch was yielded")
        for name, scratch in scratches.items():
            scratch.flush(result[name], force=True)
    except Exception as err:
        if not merge_ranks:
            raise
        error = err  # the other ranks are waiting in the merge: tell them, then raise everywhere
    finally:
        for h in handles:
            h.remove()
        stashed.clear()
        tracer.reset()
        _restore_modes(modes)
    if merge_ranks:
        result, wanted = _dist.merge(chosen, result, wanted, error, _empty_layer_stats)
    assert wanted is not None
    return Stats(result, liveness=liveness, statistics=wanted)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _has_logits_target(b: Batch) -> bool:
    """A keyword batch with ``input_ids`` serves as its own causal-LM target."""
    return b.target is None and isinstance(b.kwargs.get("input_ids"), Tensor)


def _token_rows(layer: nn.Module, x: Tensor, token_mask: Tensor | None) -> Tensor | None:
    """The flattened token mask for a Linear whose input rows are the batch's tokens, else None."""
    if token_mask is None or not L.is_linear(layer) or tuple(x.shape[:-1]) != tuple(token_mask.shape):
        return None
    return token_mask.reshape(-1).bool()


def _run_model(model: nn.Module, b: Batch, batch: int | None) -> Any:
    """The model's forward pass; a batch it cannot take becomes a CalibrationError naming its shape."""
    x = b.first
    try:
        return model(*b.args, **b.kwargs)
    except RelpruneError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        where = f"calibration batch {batch}" if batch is not None else "a calibration batch"
        raise CalibrationError(
            f"{where} (shape {tuple(x.shape)}, {x.dtype}) does not fit the model: {_first_line(err)}"
        ) from err


def causal_lm_loss(logits: Tensor, labels: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy: position t predicts token t+1; masked or -100 labels are skipped."""
    labels = labels[:, 1:].clone()
    if token_mask is not None:
        labels[~token_mask[:, 1:].bool()] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)


def _override_mask(name: str, rule: BlindRange | Callable[[Tensor], Tensor], out: Tensor) -> Tensor:
    mask = rule.live(out) if isinstance(rule, BlindRange) else rule(out)
    if not isinstance(mask, Tensor) or mask.shape != out.shape:
        raise CalibrationError(f"liveness override for {name!r} must return a mask shaped like the output")
    return mask.bool()


def _liveness_for(name: str, tracer: LivenessTracer, overrides: Mapping[str, LivenessOverride],
                  enabled: bool, override: Tensor | None) -> tuple[Tensor | None, str | None]:
    """The liveness mask of one layer for this batch, and a description of where it came from."""
    if not enabled:
        return None, None
    if name in overrides:
        rule = overrides[name]
        return (None, None) if rule is None else (override, f"override:{rule}")
    trace = tracer.traces.get(name)
    if trace is None or trace.other_use or trace.live is None:
        return None, None
    return trace.live, "+".join(sorted(trace.blind))


def _accumulate_grads(model: nn.Module, chosen: dict[str, nn.Module], result: dict[str, LayerStats],
                      b: Batch, loss_fn: Callable[[Tensor, Tensor], Tensor] | None) -> None:
    """Add dLoss/dW for this batch without touching ``.grad`` or ``requires_grad`` for good.

    An output with ``.logits`` (a Hugging Face model) gets the causal-LM loss on shifted labels
    (``labels``, else ``input_ids``) unless ``loss_fn`` is given; otherwise cross-entropy.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    captured: dict[str, Tensor] = {}

    def grab(module: nn.Module, args: tuple) -> None:
        # The weight used by this forward: after any masking pre-hook has run.
        for n, m in chosen.items():
            if m is module:
                captured[n] = m.weight

    hooks = [m.register_forward_pre_hook(grab) for m in chosen.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        # Pre-hooks registered after a masking hook run after it, so the mask is applied.
        with torch.enable_grad():
            output = _run_model(model, b, None)
            target = b.target if b.target is not None else b.kwargs.get("input_ids")
            logits = getattr(output, "logits", None)
            try:
                if loss_fn is not None:
                    loss = loss_fn(output if logits is None else logits, target)
                elif logits is not None:
                    loss = causal_lm_loss(logits, target, b.token_mask)
                else:
                    loss = F.cross_entropy(output, target)
            except (RuntimeError, ValueError, IndexError) as err:
                raise CalibrationError(
                    f"the loss failed on output {tuple((output if logits is None else logits).shape)} and "
                    f"target {tuple(target.shape)} "
                    f"{target.dtype}: {_first_line(err)}; pass (input, target) batches that fit the model "
                    "or a loss_fn"
                ) from err
            weights = [captured[n] for n in chosen]
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for n, gr in zip(chosen, grads, strict=False):
            if gr is not None:
                result[n].sums["grad"] += L.oriented(chosen[n], gr).double()
            result[n].grad_batches += 1
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
