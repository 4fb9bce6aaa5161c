"""Pruning-aware training: loss terms that make a network easier to prune by its contributions.

Two lines in any training loop::

    reg = relprune.ContributionEntropy(model, example_input)   # attach
    loss = task_loss + alpha * reg()                           # after each forward

Each term reads the current batch's layer inputs (captured by forward hooks)
and computes shares with the matrix-product form of METHOD.md, never an
N x O x I tensor. ``reg.detach()`` removes every hook.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import layers as L
from ..core.liveness import BlindRange, find_live_sources
from ..errors import RelpruneError

EPS = 1e-12


class _Captured:
    __slots__ = ("live", "out", "x")

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.out: Tensor | None = None
        self.live: Tensor | None = None


class ContributionRegularizer(nn.Module):
    """Base: hooks that capture each prunable layer's input and liveness during forward.

    ``example`` (one input batch) lets liveness be traced once at attach time;
    without it every sample counts as live. ``max_samples`` caps how many rows
    of each batch the term looks at, bounding its cost on large batches.
    """

    #: Whether the term reads the batch's layer inputs (hooks and liveness); weight-only terms do not.
    reads_inputs: ClassVar[bool] = True

    def __init__(self, model: nn.Module, example: Tensor | None = None, *, layers: Iterable[str] | None = None,
                 liveness: bool = True, max_samples: int | None = None):
        super().__init__()
        self._layers = L.prunable_layers(model, layers)
        self.max_samples = max_samples
        self._captured: dict[str, _Captured] = {}
        self._handles: list = []
        self._observing: contextlib.AbstractContextManager | None = None
        self.sources: dict[str, tuple[str, str] | None] = {}
        if not self.reads_inputs:
            return
        self._captured = {n: _Captured() for n in self._layers}
        if any(isinstance(m, L.PackedProjection) for m in self._layers.values()):
            # An attention calls its packed projection as a module only while observed: for as long as the
            # term is attached (torch's fused attention path is off meanwhile).
            self._observing = L.observable_attention(model)
            self._observing.__enter__()
        sources = find_live_sources(model, example, self._layers) if (liveness and example is not None) else {}
        modules = dict(model.named_modules())
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_hook(self._grab_input(name)))
            src = sources.get(name)
            if src is not None:
                self._handles.append(modules[src[0]].register_forward_hook(self._grab_live(name, src[1])))
        self.sources = {n: (s[0], str(s[1])) if s else None for n, s in sources.items()}

    def _grab_input(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._captured[name].x = args[0]
            self._captured[name].out = output
        return hook

    def _grab_live(self, name: str, blind: BlindRange):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._captured[name].live = blind.live(output.detach())
        return hook

    def detach(self) -> None:
        """Remove every hook this regulariser added."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        observing, self._observing = self._observing, None
        if observing is not None:
            observing.__exit__(None, None, None)
        for c in self._captured.values():
            c.x = c.out = c.live = None

    def _layer_inputs(self) -> Iterable[tuple[nn.Module, Tensor, Tensor | None, Tensor]]:
        """(layer, prepared input rows, liveness mask or None, output) for each layer, then forget them."""
        for name, layer in self._layers.items():
            c = self._captured[name]
            if c.x is None:
                raise RelpruneError(f"regulariser: layer {name!r} has not run since the last call; "
                                    "run the model's forward before calling the regulariser")
            x, live, out = c.x, c.live, c.out
            if self.max_samples is not None and x.shape[0] > self.max_samples:
                x, out = x[: self.max_samples], out[: self.max_samples]
                live = None if live is None else live[: self.max_samples]
            c.x = c.out = c.live = None
            yield layer, L.input_rows(layer, x), live, out

    def forward(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _mask(layer: nn.Module, live: Tensor | None, like: Tensor) -> Tensor:
    """Liveness as a float tensor in the products' output layout (ones when None)."""
    if live is None:
        return torch.ones_like(like)
    return L.output_rows(layer, live).to(like.dtype)


def _bias_abs(layer: nn.Module) -> Tensor | None:
    return None if layer.bias is None else L.bias_view(layer, layer.bias.abs())


def _live_input_sums(layer: nn.Module, xp: Tensor, live: Tensor | None, out: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over live samples of |x_j| per neuron, weight-shaped; live count per neuron).

    Differentiable in the inputs, so earlier layers get the gradient of how
    their outputs shape this layer's shares.
    """
    g = _mask(layer, live, L.output_rows(layer, out.detach()))
    return L.weighted_input_sum(layer, xp.abs(), g), L.per_output_count(layer, g)


_TINY = 1e-30
_LOG_TINY = math.log(_TINY)


class _ShareEntropy(torch.autograd.Function):
    """Per row i of the shares s = |W| * sums (O x I): H(s_i / S_i) / log I, zero where S_i = 0.

    H(s / S) = log S - sum_j s_j log s_j / S, and dH/ds_k = (1 + sum_j s_j log s_j / S - log s_k
    - [s_k > 0]) / S (logs of shares clamped at 1e-30, as autograd would differentiate it): one node
    with the gradient written out instead of a dozen, which is what this term costs per step on
    small networks (its products are cheap); no normalised copy of the shares is formed.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, sums: Tensor) -> Tensor:  # type: ignore[override]
        share = weight.abs().mul_(sums)
        total = share.sum(1)
        safe = total.clamp_min(_TINY)
        log_share = share.clamp_min(_TINY).log_()
        plogp = share.mul_(log_share).sum(1)
        scale = math.log(weight.shape[1])
        h = torch.where(total > 0, (safe.log() - plogp / safe) / scale, torch.zeros_like(total))
        ctx.save_for_backward(weight, sums, log_share, total, plogp)
        ctx.scale = scale
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        weight, sums, log_share, total, plogp = ctx.saved_tensors
        safe = total.clamp_min(_TINY)
        coef = torch.where(total > 0, grad_h / (safe * ctx.scale), torch.zeros_like(total)).unsqueeze(1)
        # t = dLoss/ds = coef * (1 + plogp / S - log s - [s > 1e-30])
        # A clamped share's log is exactly log(1e-30) in the tensor's dtype; the margin keeps
        # float32 rounding of that constant from counting it as unclamped.
        t = (log_share > _LOG_TINY + 1e-3).to(log_share.dtype).add_(log_share).neg_()
        t.add_((1 + plogp / safe).unsqueeze(1)).mul_(coef)
        grad_w = t * sums * weight.sign() if ctx.needs_input_grad[0] else None
        grad_sums = t.mul_(weight.abs()) if ctx.needs_input_grad[1] else None
        return grad_w, grad_sums


def _normalised_entropy(weight: Tensor, sums: Tensor, counts: Tensor) -> Tensor | None:
    """Mean over neurons with live samples of H(share_i / sum) / log I, share = |W| * sums (O x I)."""
    if weight.shape[1] < 2 or not (counts > 0).any():
        return None
    return _ShareEntropy.apply(weight, sums)[counts > 0].mean()


class ContributionEntropy(ContributionRegularizer):
    """Mean over neurons of H(q_i) / log I, q_i = neuron i's relative shares in this batch, normalised.

    Low entropy: each neuron relies on few inputs, so the rest can go. The
    default estimator takes q_ij proportional to |W_ij| E_live|x_j| (a ratio of
    means: one data-only product per layer, gradient through |W| alone);
    ``exact=True`` uses the mean of per-sample shares E[|c_ij| / D_i] of
    METHOD.md, differentiated through D as well (several times dearer).
    """

    def __init__(self, *args, exact: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.exact = exact

    def forward(self) -> Tensor:
        terms = []
        for layer, xp, live, out in self._layer_inputs():
            w = L.oriented(layer, layer.weight)
            if self.exact:
                a = xp.abs()
                d = L.forward_with(layer, a, w.abs())
                b = _bias_abs(layer)
                d = (d if b is None else d + b) + EPS
                g = _mask(layer, live, d)
                sums = L.weighted_input_sum(layer, a, g / d)
                counts = L.per_output_count(layer, g.detach())
            else:
                sums, counts = _live_input_sums(layer, xp, live, out)
            h = _normalised_entropy(L.weight_matrix(w), L.weight_matrix(sums), counts)
            if h is not None:
                terms.append(h)
        return torch.stack(terms).mean() if terms else torch.zeros(())


class ExactContributionEntropy(ContributionEntropy):
    """:class:`ContributionEntropy` with the exact per-sample shares."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, exact=True, **kwargs)


class ContributionL1(ContributionRegularizer):
    """Per layer, sum_ij |W_ij| E_live|x_j| / sum_i E_live|z_i|; averaged over layers.

    One data-only product per layer; z is the layer's own output from the
    forward pass, so the gradient flows through it and through |W|.
    """

    def forward(self) -> Tensor:
        terms = []
        for layer, xp, live, out in self._layer_inputs():
            sums, counts = _live_input_sums(layer, xp, live, out)
            n = counts.clamp_min(1)
            num = (L.weight_matrix(L.oriented(layer, layer.weight).abs() * sums) / n[:, None]).sum()
            z = L.output_rows(layer, out)
            g = _mask(layer, live, z)
            den = (L.per_output_count(layer, z.abs() * g) / n).sum()
            terms.append(num / (den + EPS))
        return torch.stack(terms).mean()


class WeightL1(ContributionRegularizer):
    """Mean |W| over the prunable layers' weights: the baseline regulariser (needs no inputs)."""

    reads_inputs = False

    def forward(self) -> Tensor:
        total = sum(layer.weight.abs().sum() for layer in self._layers.values())
        return total / sum(layer.weight.numel() for layer in self._layers.values())


REGULARIZERS: dict[str, type[ContributionRegularizer]] = {
    "entropy": ContributionEntropy,
    "entropy-exact": ExactContributionEntropy,
    "contrib-l1": ContributionL1,
    "l1": WeightL1,
}


def make_regularizer(kind: str, model: nn.Module, example: Tensor | None = None,
                     **kwargs) -> ContributionRegularizer:
    """A regulariser by name: 'entropy', 'contrib-l1' or 'l1'."""
    if kind not in REGULARIZERS:
        raise RelpruneError(f"unknown regulariser {kind!r}; known: {', '.join(REGULARIZERS)}")
    return REGULARIZERS[kind](model, example, **kwargs)


def alpha_ramp(alpha: float, warmup: float, epochs: int, steps_per_epoch: int) -> Callable[[int, int], float]:
    """alpha(epoch, step): linear ramp from 0 over the first ``warmup`` fraction of training, then flat."""
    total = max(1, epochs * steps_per_epoch)
    ramp = warmup * total

    def fn(epoch: int, step: int) -> float:
        t = epoch * steps_per_epoch + step
        return alpha if ramp <= 0 else alpha * min(1.0, t / ramp)

    return fn
