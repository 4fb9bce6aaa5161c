"""``collect_stats``: running sums per layer over calibration batches, with a few matrix products per batch.

Products run in the layer's dtype (float32 for half types) into compute-dtype buffers that move
into the float64 sums every ``FLUSH_EVERY`` batches; see :mod:`.stats` for what the sums mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..defaults import DEFAULT_LIVENESS
from ..errors import (
    CalibrationError,
    MissingLabelsError,
    NonFiniteActivationError,
)
from . import distributed as _dist
from . import layers as L
from .batches import Batch, causal_lm_loss, has_logits_target, run_model, split_batch
from .liveness import BlindRange, LivenessTracer
from .stats import (
    ACTIVATION_STATISTICS,
    EPS,
    LayerStats,
    Stats,
    needed_sums,
    new_layer_stats,
)

#: A per-layer liveness override: a blind range, a rule on the raw output, or None ("always live").
LivenessOverride = BlindRange | Callable[[Tensor], Tensor] | None

def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32



FLUSH_EVERY = 16
#: |W| of a Linear is taken this many slices of output rows at a time when it is not cached, and
#: float64 sums take their pending buffers in as many slices: temporaries stay a fraction of a weight.
ROW_SLICES = 4
#: |W| is cached (one weight's memory) when a collection holds at least this many weight-shaped
#: sums, where it adds a sixth or less to the memory and saves an |W| per batch; with fewer (``rc``
#: alone: its sum and one pending buffer) it would be a third more.
CACHE_ABS_FROM = 3
#: The input Gram matrix is symmetric: each batch adds only its upper block triangle, in this many
#: slabs of rows (10/16 of the full product), and a flush mirrors it.
GRAM_SLABS = 4
_WEIGHT_SHAPED = frozenset({"s1", "s2", "sa", "r1", "r2"})


def _slices(size: int, parts: int = ROW_SLICES) -> list[slice]:
    """``range(size)`` in ``parts`` contiguous slices (fewer when ``size`` is smaller)."""
    step = max(1, -(-size // parts))
    return [slice(r, r + step) for r in range(0, size, step)]


class _Scratch:
    """Per-layer working state of one collection: |W| (or a slice of it) and sums pending in the compute dtype.

    Every batch product lands in a compute-dtype buffer in place (``addmm_``: no temporary) and
    moves into the float64 sums every ``FLUSH_EVERY`` batches, so the float64 conversion and add
    are paid rarely while rounding stays that of a short sum.

    While every input so far was non-negative (after a ReLU, or an image), sum |x| = sum x, so the
    ``sa`` sum is not gathered but follows from ``s1`` (see :meth:`derive_abs_sum`); the first
    batch with a negative input turns that off for the rest of the collection.
    """

    def __init__(self) -> None:
        self.abs_weight: Tensor | None = None
        self.pending: dict[str | tuple[str, ...], Tensor] = {}
        self.batches = 0
        self.abs_from_s1 = True

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
        """Add x_counted^T x, upper block triangle only (:meth:`flush` mirrors it)."""
        buf = self.pending.get("gram")
        first = buf is None
        if first:
            buf = self.pending["gram"] = x.new_empty(x.shape[1], x.shape[1])
        for rows in _slices(x.shape[1], GRAM_SLABS):
            # beta=0 on the first batch: the empty buffer's contents are ignored, NaN included.
            buf[rows, rows.start:].addmm_(x_counted[:, rows].t(), x[:, rows.start:], beta=0 if first else 1)

    def flush(self, ls: LayerStats, force: bool = False) -> None:
        """Count a batch; every ``FLUSH_EVERY`` batches (or when forced, at the end) move the pending sums."""
        self.batches += 1
        if force or self.batches % FLUSH_EVERY == 0:
            self.move_pending(ls)
        if force:
            self.derive_abs_sum(ls)

    def move_pending(self, ls: LayerStats) -> None:
        """Add the compute-dtype buffers into the float64 sums and empty them."""
        for key, buf in self.pending.items():
            if key == "gram":
                _mirror_upper_blocks(buf)
            # Row slices: adding a compute-dtype buffer into float64 converts it first, and a
            # whole weight-sized conversion would be the collection's largest temporary.
            keys = key if isinstance(key, tuple) else (key,)
            for k, part in zip(keys, buf.chunk(len(keys), dim=1) if len(keys) > 1 else (buf,), strict=True):
                target, flat = ls.sums[k], part.reshape(ls.sums[k].shape)
                for rows in _slices(target.shape[0]):
                    target[rows].add_(flat[rows])
        self.pending.clear()

    def derive_abs_sum(self, ls: LayerStats) -> None:
        """Set ``sa`` from ``s1`` if it was left to follow from it (every input so far >= 0): with the
        shift k, sum_live |x| = sum_live x = s1 + n k. Needs the pending sums flushed."""
        if self.abs_from_s1 and "sa" in ls.sums and "s1" in ls.sums:
            ls.sums["sa"].copy_(ls.input_sum())
        self.abs_from_s1 = False


def _mirror_upper_blocks(buf: Tensor) -> None:
    """Fill the lower block triangle of a symmetric matrix from its upper one, in place."""
    for rows in _slices(buf.shape[0], GRAM_SLABS):
        if rows.stop < buf.shape[0]:
            buf[rows.stop:, rows].copy_(buf[rows, rows.stop:].t())


def _accumulate(layer: nn.Module, ls: LayerStats, scratch: _Scratch, x: Tensor, out_shape: torch.Size,
                live: Tensor | None, need: frozenset[str], rows: Tensor | None = None) -> None:
    """Add one batch's sums for one layer. ``live`` is the liveness mask (None: all live);
    ``rows`` (Linear only) keeps the input rows that count, e.g. tokens that are not padding."""
    cd = _compute_dtype(x)
    x = x.to(cd)
    xp = L.input_rows(layer, x)
    cache_abs = len(need & _WEIGHT_SHAPED) >= CACHE_ABS_FROM
    nonneg = bool(xp.min() >= 0) if need & {"sa", "r1", "r2"} else False
    if {"s1", "sa"} <= need and scratch.abs_from_s1:
        if nonneg:
            need = need - {"sa"}
        else:
            # The first signed input: sa so far follows from s1 so far; gathered from here on.
            scratch.move_pending(ls)
            scratch.derive_abs_sum(ls)
    else:
        scratch.abs_from_s1 = False
    if live is None:
        # Without liveness every output sees the same samples: one column of ones serves them all,
        # and the input moments come out as (1, I) rows (see _new_layer_stats).
        shape = (xp.shape[0], 1) if L.is_linear(layer) else out_shape
        g = torch.ones(shape, dtype=cd, device=x.device)
    else:
        # Kept boolean where only element-wise steps read it (g / D): the moments' products need floats.
        g = L.output_rows(layer, live)
        if need & {"s1", "s2", "sa"}:
            g = g.to(cd)
    if rows is not None:
        g = g * rows.to(cd).unsqueeze(1)
    if "gram" in need:
        # Not per neuron: every counted row (a conv: every receptive field), whatever the liveness.
        patches = L.patch_rows(layer, xp)
        kept = patches if rows is None else patches * rows.to(cd).unsqueeze(1)
        scratch.add_gram(kept, patches)
    ls.live_count.add_(L.per_output_count(layer, g))
    ls.total_count += L.samples_in(layer, g) if rows is None else int(rows.sum())
    # |x| is x itself for a non-negative input: no copy.
    a = (xp if nonneg else xp.abs()) if need & {"sa", "r1", "r2"} else None
    shared = sorted(need & {"s1", "s2", "sa"})
    if L.is_linear(layer) and g.shape[1] > 1 and len(shared) > 1:
        # The moments that share g (live samples) as their left factor: one product against their
        # inputs side by side, which runs faster than one product each; written straight into one
        # buffer (no concatenation copy).
        width = xp.shape[1]
        side = xp.new_empty(xp.shape[0], width * len(shared))
        part = {k: side[:, i * width:(i + 1) * width] for i, k in enumerate(shared)}
        xs = part.get("s1", part.get("s2"))
        if xs is not None:
            torch.sub(xp, ls.shift.to(cd).reshape(1, -1), out=xs)
            if "s2" in part:
                torch.mul(xs, xs, out=part["s2"])
        if "sa" in part:
            part["sa"].copy_(a)
        scratch.add(layer, tuple(shared), side, g, ls)
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
        if L.is_linear(layer) and not cache_abs:
            # D = |x| |W|^T with |W| taken a slice of output rows at a time: no weight-sized copy
            # of |W| exists, and each slice's product lands in place in D's columns.
            w = ls.weight.detach()
            d = torch.empty(a.shape[0], w.shape[0], dtype=cd, device=a.device)
            for chunk in _slices(w.shape[0]):
                torch.mm(a, w[chunk].to(cd).abs().t(), out=d[:, chunk])
        else:
            if scratch.abs_weight is None or scratch.abs_weight.dtype != cd:
                scratch.abs_weight = ls.weight.detach().to(cd).abs()
            d = L.forward_with(layer, a, scratch.abs_weight)
        if ls.bias is not None:
            d.add_(L.bias_view(layer, ls.bias.to(cd).abs()))
        d.add_(EPS)
        # g / D in place when only r1 needs it: D is then the one (rows x outputs) temporary.
        gd = g / d if "r2" in need else d.reciprocal_().mul_(g)
        if "r1" in need:
            scratch.add(layer, "r1", a, gd, ls)
        if "r2" in need:
            scratch.add(layer, "r2", a * a, gd.div_(d), ls)



def _resolve_statistics(statistics: Iterable[str] | None, has_labels: bool) -> frozenset[str]:
    if statistics is None:
        return frozenset(ACTIVATION_STATISTICS) | ({"weight_grad"} if has_labels else set())
    stats = frozenset([statistics] if isinstance(statistics, str) else statistics)
    needed_sums(stats)
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
    for layer in chosen.values():
        L.CROSS_ATTENTION.discard(layer)
    observed = L.observable_attention(model)
    observed.__enter__()
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
                wanted = _resolve_statistics(statistics, b.target is not None or has_logits_target(b))
                need = needed_sums(wanted)
            b = b.to(device)
            x = b.first
            stashed.clear()
            tracer.reset()
            act_need = need - {"grad"}
            # Tracing costs a Python call per torch function; after the first batch it runs only if
            # some layer has a blind range to trace (a SiLU or GELU network has none).
            tracing = liveness and (seen == 0 or traced)
            with torch.no_grad(), tracer if tracing else contextlib.nullcontext():
                run_model(model, b, seen)
            cross = [n for n, m in chosen.items() if n not in stashed and m in L.CROSS_ATTENTION]
            if cross and (layers is not None or seen):
                raise CalibrationError(f"the packed projections {cross} belong to attentions called with different "
                                       "query, key and value (cross-attention), whose rows read different inputs: "
                                       "leave them out of layers=")
            if cross:
                import warnings

                warnings.warn(f"relprune leaves out {cross}: their attentions are called with different query, key "
                              "and value (cross-attention), so their rows read different inputs", stacklevel=2)
                chosen = {n: m for n, m in chosen.items() if n not in cross}
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
                    result[name] = new_layer_stats(layer, inp, how, wanted, need)
                if act_need:
                    scratch = scratches.setdefault(name, _Scratch())
                    _accumulate(layer, result[name], scratch, inp, out_shape, live, act_need,
                                _token_rows(layer, inp, b.token_mask))
                    scratch.flush(result[name])
            stashed.clear()  # the gradient pass below calls every layer again
            if "grad" in need:
                if b.target is None and not has_logits_target(b):
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
        observed.__exit__(None, None, None)
        for h in handles:
            h.remove()
        stashed.clear()
        tracer.reset()
        _restore_modes(modes)
    if merge_ranks:
        result, wanted = _dist.merge(chosen, result, wanted, error)
    assert wanted is not None
    return Stats(result, liveness=liveness, statistics=wanted)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]



def _token_rows(layer: nn.Module, x: Tensor, token_mask: Tensor | None) -> Tensor | None:
    """The flattened token mask for a Linear whose input rows are the batch's tokens, else None."""
    if token_mask is None or not L.is_linear(layer) or tuple(x.shape[:-1]) != tuple(token_mask.shape):
        return None
    return token_mask.reshape(-1).bool()



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
        # The weight used by this forward (a masked layer's is computed from its mask on this read).
        for n, m in chosen.items():
            if m is module:
                captured[n] = m.weight

    hooks = [m.register_forward_pre_hook(grab) for m in chosen.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        # parametrize.cached: a masked layer's weight is computed once per pass, so the tensor grabbed
        # above is the one the forward uses (else each read would make a new one, outside the graph).
        with torch.enable_grad(), parametrize.cached():
            output = run_model(model, b, None)
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
