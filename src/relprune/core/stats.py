"""Contribution statistics of a layer: its running sums, the statistics they give, merge and files.

For a layer W (O x I), inputs x, liveness L (1 where the neuron's
pre-activation lies outside the next activation's blind range) and
D = |x| |W|^T + |b| + eps, every statistic is a ratio of sums of the form
``sum_samples g_i x_j``; :mod:`.collect` gathers them (see METHOD.md). Sums are
float64, and inputs are shifted by a per-channel mean of the first batch so
variances do not cancel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import (
    CalibrationError,
    StatisticNotCollectedError,
    StatsMismatchError,
)
from . import layers as L
from .files import atomic_file, check_tensors_sha256, tensors_sha256
from .masks import unchanged_since

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



def needed_sums(statistics: Iterable[str]) -> frozenset[str]:
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


@dataclass(kw_only=True)
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
        return self.weight_version is not None and not unchanged_since(self.weight, self.weight_version)

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
        o = other.rebased(self.shift)
        sums = {k: v + o[k] for k, v in self.sums.items()}
        return replace(self, live_count=self.live_count + other.live_count,
                       total_count=self.total_count + other.total_count, sums=sums,
                       grad_batches=self.grad_batches + other.grad_batches)

    def rebased(self, shift: Tensor) -> dict[str, Tensor]:
        """This layer's sums re-expressed around another input shift."""
        sums = dict(self.sums)
        if "s1" in sums and not torch.equal(shift, self.shift):
            d, n = self._as_input_moment(self._shift_as_weight()
                                         - _shift_as_weight(shift, self.weight.shape, self.groups))
            if "s2" in sums:
                sums["s2"] = sums["s2"] + 2 * d * sums["s1"] + n * d * d
            sums["s1"] = sums["s1"] + n * d
        return sums

    def input_sum(self) -> Tensor:
        """sum_live x_j per weight: the shifted sum ``s1`` with its shift k undone (s1 + n k); for a
        non-negative input this is also the ``sa`` sum, sum_live |x_j|."""
        k, n = self._as_input_moment(self._shift_as_weight())
        return self.sums["s1"] + n * k

    def _as_input_moment(self, per_weight: Tensor) -> tuple[Tensor, Tensor]:
        """A weight-shaped per-input tensor and the live counts, shaped like the input-moment sums:
        one row for lean (1, I) sums (every row saw the same samples), weight-shaped otherwise."""
        n = self._n()
        if self.sums["s1"].shape[0] == 1 < per_weight.shape[0]:
            return per_weight[:1], n[:1]
        return per_weight, n


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
        modules = L.named_layers(model)
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
        """Write to a safetensors file (sums and metadata, no pickle; each tensor's SHA-256 recorded), in full
        or not at all."""
        from safetensors.torch import save

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
        meta["tensor_sha256"] = tensors_sha256(tensors)
        payload = save(tensors, metadata={"relprune_stats": json.dumps(meta)})
        with atomic_file(path) as fh:
            fh.write(payload)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Stats:
        """Read what :meth:`save` wrote; each tensor is checked against its recorded SHA-256 (``verify=False``
        skips that)."""
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
        if verify and "tensor_sha256" in meta:  # files written before issue 30 carry none
            check_tensors_sha256(t, meta["tensor_sha256"], str(path))
        layers = {}
        for name, m in meta["layers"].items():
            p = f"{name}::"
            sums = {k[len(p) + 4:]: v for k, v in t.items() if k.startswith(p + "sum.")}
            layers[name] = LayerStats(
                kind=m["kind"], weight=t[p + "weight"], bias=t.get(p + "bias"), groups=m["groups"],
                statistics=frozenset(m["statistics"]), liveness=m["liveness"], shift=t[p + "shift"],
                live_count=t[p + "live_count"], total_count=m["total_count"], sums=sums,
                grad_batches=m["grad_batches"])
        return cls(layers, liveness=meta["liveness"], statistics=frozenset(meta["statistics"]))



def _sum_shape(layer: nn.Module, key: str, liveness: str | None, weight_shape: torch.Size) -> tuple[int, ...]:
    """Weight-shaped, except the I x I gram, and input moments of a Linear without liveness: every
    output sees the same samples, so one (1, I) row holds them (O times less memory)."""
    if key == "gram":
        fan_in = math.prod(weight_shape[1:])
        return (fan_in, fan_in)
    if key in _INPUT_MOMENTS and liveness is None and L.is_linear(layer):
        return (1, weight_shape[1])
    return tuple(weight_shape)


def new_layer_stats(layer: nn.Module, x: Tensor | None, liveness: str | None, statistics: frozenset[str],
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
        kind=L.module_type(layer).__name__, weight=w, weight_version=w._version,
        bias=None if layer.bias is None else layer.bias.detach().clone(),
        groups=getattr(layer, "groups", 1), statistics=statistics, liveness=liveness,
        shift=shift, live_count=torch.zeros(w.shape[0], dtype=torch.float64, device=w.device),
        sums=sums,
    )


def empty_layer_stats(layer: nn.Module, liveness: str | None, shift: Tensor,
                       statistics: frozenset[str]) -> LayerStats:
    """Zero sums for a rank that saw no calibration batch (distributed calibration)."""
    return new_layer_stats(layer, None, liveness, statistics, needed_sums(statistics), shift=shift)

