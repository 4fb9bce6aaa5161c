"""What each decoder block receives, as the model itself passes it, and how inputs advance a block.

Decoders do not call every block alike: Gemma 2 and 3 alternate sliding-window and global layers
with their own masks and rotary tables, and any family may pass per-layer arguments. So the
arguments are captured per block and per batch from the model's own forward pass, with every
block replaced by a pass-through that records its call and hands its hidden state on unchanged
(no block is computed, the pass stops after the last block). The hidden states are then advanced
block by block by :func:`block_outputs`, so block ``i`` is fed exactly what a dense forward pass
would give it, or what the pruned blocks before it give it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core import distributed as _dist
from ..core.batches import Batch
from ..core.progress import progress as _progress
from ..core.threads import SharedCores
from ..defaults import DEFAULT_FIT_THREADS
from ..errors import CalibrationError, CheckpointError, LayerError


@dataclass
class BlockInputs:
    """Per block and per calibration batch, the call the model makes, and block 0's hidden states.

    ``calls[i][b]`` is block ``i``'s call on batch ``b``; its hidden-state argument is a stand-in
    that :func:`feed` replaces. ``hidden[b]`` is the hidden state block 0 receives on batch ``b``.
    The arguments the model computes once and shares between blocks (masks, rotary tables) are
    held once.
    """

    calls: list[list[Batch]]
    hidden: list[Tensor]


class _Stop(Exception):
    """Raised after the last block's call is recorded: nothing after the blocks is computed."""


def _hidden_of(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, Tensor):
        raise LayerError("a decoder block was called without a hidden-state tensor (first positional "
                         "argument or hidden_states=); pass blocks= naming the decoder layers")
    return h


def _with_hidden(call: Batch, hidden: Tensor) -> Batch:
    if call.args:
        return Batch((hidden, *call.args[1:]), call.kwargs, token_mask=call.token_mask)
    return Batch((), {**call.kwargs, "hidden_states": hidden}, token_mask=call.token_mask)


def _like(template: Any, hidden: Tensor) -> Any:
    """``hidden`` in the container a block returns (a tensor, or a tuple whose first item it is)."""
    if isinstance(template, Tensor):
        return hidden
    if isinstance(template, (tuple, list)) and template and isinstance(template[0], Tensor):
        return type(template)((hidden, *template[1:]))
    raise LayerError(f"a decoder block returned {type(template).__name__}; relprune needs blocks that "
                     "return their hidden state (a tensor, or a tuple that starts with it)")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: its input embedding's device (else its first parameter's)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device


def capture_block_inputs(model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[dict[str, Tensor]],
                         *, probe: nn.Module | None = None) -> BlockInputs:
    """The arguments the model passes each of ``blocks`` (in call order) on each batch.

    Every block is replaced by a pass-through for one forward pass of ``model`` per batch, so this
    costs the model's embedding and argument preparation, not its blocks. ``probe`` (block 0 by
    default; a real block when ``blocks`` live on the meta device) is called once on the first
    batch to learn the form of a block's output. The model's blocks are restored also on error.
    """
    blocks = list(blocks)
    if not blocks:
        raise LayerError("there are no decoder blocks to capture inputs for")
    index = {id(b): i for i, b in enumerate(blocks)}
    if len(index) != len(blocks):
        raise LayerError("one module stands in two decoder slots; relprune prunes each block once, so "
                         "untie the shared block first")
    probe = blocks[0] if probe is None else probe
    probe_forward = probe.forward
    calls: list[list[Batch]] = [[] for _ in blocks]
    hidden: list[Tensor] = []
    state: dict[str, Any] = {"next": 0, "mask": None, "template": None}

    def recorder(i: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            if i != state["next"]:
                raise LayerError(f"the model called decoder block {i} out of order (expected block "
                                 f"{state['next']}); pass blocks= in the order the model calls them")
            h = _hidden_of(args, kwargs)
            if i == 0:
                hidden.append(h)
            calls[i].append(Batch(tuple(args), dict(kwargs), token_mask=state["mask"]))
            state["next"] = i + 1
            if i + 1 == len(blocks):
                raise _Stop
            if state["template"] is None:
                state["template"] = probe_forward(*args, **kwargs)
            return _like(state["template"], h)
        return forward

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = input_device(model)
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, dict) or "input_ids" not in batch:
                    raise CalibrationError("language-model batches are dicts with 'input_ids' (and 'attention_mask')")
                _checked_ids(batch, getattr(embeddings, "num_embeddings", None))
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                mask = batch.get("attention_mask")
                state["mask"] = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
                state["next"] = 0
                try:
                    model(**batch, use_cache=False)
                except _Stop:
                    continue
                missing = state["next"]
                raise LayerError(f"the model's forward pass called {missing} of the {len(blocks)} decoder "
                                 "blocks; check blocks=")
    finally:
        for b in blocks:
            if "forward" in b.__dict__:
                del b.forward
    if not hidden and not _dist.active(None):
        raise CalibrationError("the calibration batches are empty")
    return BlockInputs(calls, hidden)


def refuse_non_finite(module: nn.Module, where: str = "the model") -> None:
    """Refuse a module any of whose parameters holds NaN or Inf (an embedding row or a norm included, not only
    the weights being pruned): its outputs could not be trusted, nor a re-fit on them. Buffers are left alone:
    some models keep -inf attention masks there on purpose."""
    bad = [n for n, t in module.named_parameters()
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{where} holds NaN or Inf in {bad[:3]}{' ...' if len(bad) > 3 else ''}; restore a "
                              "finite checkpoint before pruning")


def _checked_ids(batch: dict[str, Any], vocab: int | None) -> None:
    """Refuse token ids that are not whole numbers in the vocabulary, and a mask that does not fit them."""
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise CalibrationError(f"input_ids must be a 2-D tensor of whole-number token ids (batch x tokens), got {got}")
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise CalibrationError(f"input_ids hold token ids from {int(ids.min())} to {int(ids.max())}, outside the "
                               f"model's vocabulary of {vocab} ids; tokenize with the model's own tokenizer")
    mask = batch.get("attention_mask")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        raise CalibrationError(f"attention_mask must be a tensor shaped as input_ids {tuple(ids.shape)}, got "
                               f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")


def feed(calls: Sequence[Batch], hidden: Sequence[Tensor]) -> list[Batch]:
    """A block's recorded calls with their hidden states set to ``hidden`` (one per batch)."""
    return [_with_hidden(c, h) for c, h in zip(calls, hidden, strict=True)]


def block_outputs(block: nn.Module, inputs: Sequence[Batch]) -> list[Tensor]:
    """The hidden state ``block`` returns on each of ``inputs``."""
    out = []
    with torch.no_grad():
        for b in inputs:
            y = block(*b.args, **b.kwargs)
            out.append(y[0] if isinstance(y, (tuple, list)) else y)
    return out


#: A decoder block, or (for a model read from disk one block at a time) a function that loads it.
BlockSource = nn.Module | Callable[[], nn.Module]


def _real(item: BlockSource) -> nn.Module:
    return item if isinstance(item, nn.Module) else item()


def dense_hidden_states(blocks: Sequence[BlockSource], captured: BlockInputs) -> list[list[Tensor]]:
    """Every block's input hidden states in the model as it is (all computed before anything changes).

    ``blocks`` are the blocks or, for a model read from disk, functions that load each one."""
    named = [(str(i), b) for i, b in enumerate(blocks)]
    return [step.hidden for step in walk_blocks(None, named, (), captured=captured)]


def blocks_with_progress(named: Sequence[tuple[str, nn.Module]],
                         progress: bool) -> Iterable[tuple[int, tuple[str, nn.Module]]]:
    """``enumerate(named)``, reporting progress when asked: a bar on a terminal, else one line per block
    on stderr (a log file or a scheduler's output gets a line a block, not minutes of silence)."""
    return _progress(enumerate(named), desc="blocks", total=len(named), unit="done", every=0.0,
                     enabled=progress, name=lambda item: item[1][0])


@dataclass
class BlockStep:
    """One block of a :func:`walk_blocks`: its index and name, the block, what it is fed (its calls, and the
    hidden state of each).

    A caller that computes the block's outputs on ``inputs`` itself (after its changes, if it wants the
    walk to advance on them) stores them in ``outputs`` so the walk does not compute them again."""

    index: int
    name: str
    block: nn.Module
    inputs: list[Batch]
    hidden: list[Tensor]
    outputs: list[Tensor] | None = field(default=None)


def walk_blocks(model: nn.Module | None, named: Sequence[tuple[str, BlockSource]],
                batches: Iterable[dict[str, Tensor]], *, sequential: bool = True, progress: bool = False,
                captured: BlockInputs | None = None, run: bool = True) -> Iterator[BlockStep]:
    """Each decoder block with the inputs a forward pass of ``model`` gives it, one at a time.

    The caller's work on a step (scoring, pruning, re-fitting the block) runs between the walk's
    ``yield`` and its advance: with ``sequential`` the next block is fed this block's outputs as the
    caller left it, else the outputs it had when it was yielded (the dense model's, when nothing
    before it changed). ``named`` holds the blocks or, for a model read from disk, functions that load
    each one (called once, when its turn comes; the walk keeps no block after its step).
    ``progress``: a line per block on stderr, a bar on a terminal. ``captured``: the blocks' calls when
    the caller has captured them already (``model`` and ``batches`` are then not read). ``run=False``:
    the caller reads no activation, so no block is run and every step's inputs are empty. Before each block
    torch's thread count is fitted to the cores other processes left free during the last one
    (:class:`relprune.core.threads.SharedCores`; :data:`relprune.defaults.DEFAULT_FIT_THREADS`), and put back
    when the walk ends."""
    if not run:
        for i, (name, item) in blocks_with_progress(named, progress):
            yield BlockStep(i, name, _real(item), [], [])
        return
    cores = SharedCores() if DEFAULT_FIT_THREADS else None  # measured from here: the capture's pass counts
    try:
        if captured is None:
            if model is None or not all(isinstance(b, nn.Module) for _, b in named):
                raise LayerError("walk_blocks needs the model and its blocks, or the blocks' captured calls")
            captured = capture_block_inputs(model, [b for _, b in named], batches)
        hidden = captured.hidden
        for i, (name, item) in blocks_with_progress(named, progress):
            if cores is not None:
                cores.fit()  # the threads other processes left free during the last block
            block = _real(item)
            step = BlockStep(i, name, block, feed(captured.calls[i], hidden), list(hidden))
            last = i + 1 == len(named)
            before = None if sequential or last else block_outputs(block, step.inputs)
            yield step
            if not last:
                hidden = before if before is not None else (
                    step.outputs if step.outputs is not None else block_outputs(step.block, step.inputs))
            del block, step
    finally:
        if cores is not None:
            cores.restore()
