"""What relprune can prune, and each layer kind seen as an O x I matrix.

Every statistic is a sum over samples of (per-output weight) x (per-input
value). For Linear that sum is ``G^T X``; for a convolution it is the
weight-gradient convolution with ``G`` as grad_output, which handles stride,
padding, dilation and groups without ever building im2col rows.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import LayerError, NoPrunableLayersError

SUPPORTED = ("Linear, Conv1d, Conv2d, Conv3d, transformers' Conv1D, and nn.MultiheadAttention's packed "
             "query/key/value projection")


class PackedProjection(nn.Module):
    """``nn.MultiheadAttention``'s packed query/key/value projection (``in_proj_weight``, ``in_proj_bias``)
    seen as the Linear layer it is, so that it is pruned like any other.

    Attached to its attention as the child ``in_proj`` by :func:`prunable_layers` (it holds no tensor of its
    own: the attention's ``state_dict`` is unchanged, and its mask lives on the attention's
    ``in_proj_weight``); the attention calls it while relprune observes the model
    (:func:`observable_attention`). :func:`relprune.make_permanent` detaches it again.
    """

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        # Not a child: the attention owns this module, not the other way round.
        object.__setattr__(self, "attention", attention)
        self.in_features = attention.embed_dim
        self.out_features = 3 * attention.embed_dim

    @property
    def weight(self) -> Tensor:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.attention.in_proj_bias

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias"):  # a re-fit's new bias belongs to the attention
            setattr(self.attention, f"in_proj_{name}", value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (the attention's in_proj_weight)"


#: The child name a packed projection takes in its attention.
PACKED_NAME = "in_proj"
PrunableLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | PackedProjection
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, PackedProjection)


def attach_packed_projections(model: nn.Module) -> None:
    """Give every ``nn.MultiheadAttention`` with a packed ``in_proj_weight`` its :class:`PackedProjection`
    (``<attention>.in_proj``); an attention with separate key and value sizes, or that already has a child of
    that name, is left as it is."""
    for module in list(model.modules()):
        if (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
                and isinstance(getattr(module, "in_proj_weight", None), Tensor)
                and PACKED_NAME not in module._modules and not hasattr(module, PACKED_NAME)):
            module._modules[PACKED_NAME] = PackedProjection(module)


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by qualified name, packed attention projections attached first (so a layer name
    relprune gave out, such as ``<attention>.in_proj``, is found in any copy or fresh build of the model)."""
    attach_packed_projections(model)
    return dict(model.named_modules())


def detach_packed_projections(model: nn.Module) -> None:
    """Remove what :func:`attach_packed_projections` added (the model is plain torch again)."""
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module._modules.get(PACKED_NAME),
                                                                    PackedProjection):
            del module._modules[PACKED_NAME]


def weight_owner(layer: nn.Module) -> tuple[nn.Module, str]:
    """The module whose parameter is ``layer``'s weight, and that parameter's name: ``(layer, "weight")``, or
    for a packed projection ``(its attention, "in_proj_weight")``."""
    if isinstance(layer, PackedProjection):
        return layer.attention, "in_proj_weight"
    return layer, "weight"


def weight_key(name: str, layer: nn.Module) -> str:
    """The ``state_dict`` key of layer ``name``'s (unmasked) weight: ``name.weight``, or for a packed
    projection ``<attention>.in_proj_weight``."""
    if isinstance(layer, PackedProjection):
        parent = name.rpartition(".")[0]
        return f"{parent}.in_proj_weight" if parent else "in_proj_weight"
    return f"{name}.weight" if name else "weight"

_CONV_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}
_CONV_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def module_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class: a masked layer is an instance of the subclass ``torch.nn.utils.parametrize``
    injects (``ParametrizedLinear``), whose base is the class the user built."""
    cls = type(module)
    return cls.__bases__[0] if getattr(module, "parametrizations", None) is not None and cls.__name__.startswith(
        "Parametrized") else cls


def is_transposed(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 family): a Linear whose weight is stored I x O.

    Detected by name and shape attributes, so core needs no transformers import.
    """
    return (module_type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), Tensor) and module.weight.dim() == 2)


def is_linear(module: nn.Module) -> bool:
    """A Linear, a transformers ``Conv1D`` or a packed attention projection: rows of tokens times an O x I
    matrix."""
    return isinstance(module, (nn.Linear, PackedProjection)) or is_transposed(module)


def is_prunable(module: nn.Module) -> bool:
    """True for the layer kinds relprune prunes (Linear, Conv1d/2d/3d, transformers' Conv1D)."""
    return isinstance(module, PRUNABLE_TYPES) or is_transposed(module)


def oriented(layer: nn.Module, t: Tensor) -> Tensor:
    """A weight-shaped tensor between the parameter's layout and the O x I (x kernel) one relprune
    computes in: transposed for ``Conv1D``, unchanged otherwise (the map is its own inverse)."""
    return t.t() if is_transposed(layer) else t


def weight_shape(layer: nn.Module) -> torch.Size:
    """The weight's shape in relprune's O x I (x kernel) layout."""
    return oriented(layer, layer.weight).shape


def left_out_layers(model: nn.Module) -> dict[str, str]:
    """Layers of a supported kind that relprune leaves out by default, with the reason.

    - a weight tied to another module's parameter (e.g. ``lm_head`` and the input embedding):
      masking it would change the other module too (refused when named);
    - a language model's output embedding (``get_output_embeddings()``, usually ``lm_head``):
      left out by default, as the Wanda and SparseGPT reference code do; name it to prune it.
    """
    out: dict[str, str] = {}
    if not isinstance(model, nn.Module):
        return out
    attach_packed_projections(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, module in model.named_modules():
        if name and is_prunable(module) and name not in out:
            own = weight_key(name, module)
            tied = [o for o in owners.get(id(module.weight), []) if o != own]
            if tied:
                out[name] = f"its weight is tied to {', '.join(tied)}, which pruning it would change too"
    head = _output_embedding(model)
    if head is not None:
        name = next((n for n, m in model.named_modules() if m is head), None)
        if name and is_prunable(head) and name not in out:
            out[name] = OUTPUT_EMBEDDING_REASON
    return out


OUTPUT_EMBEDDING_REASON = "a language model's output embedding is left out by default; name it in layers= to prune it"


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def warn_left_out(model: nn.Module) -> None:
    """Say by name which layers of a supported kind are left out (see :func:`left_out_layers`)."""
    skipped = left_out_layers(model)
    if skipped:
        import warnings

        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items())
        warnings.warn(f"relprune leaves out {sorted(skipped)} ({reasons})", stacklevel=3)


class _StandIn(nn.Module):
    """An identity projection of width ``n`` standing in for an attention's ``out_proj``."""

    def __init__(self, like: nn.Linear):
        super().__init__()
        self.weight = torch.eye(like.in_features, dtype=like.weight.dtype, device=like.weight.device)
        self.bias = None if like.bias is None else torch.zeros_like(like.bias)


@contextlib.contextmanager
def observable_attention(model: nn.Module) -> Iterator[None]:
    """Every ``nn.MultiheadAttention`` calls its projections as modules while the block runs.

    The attention modules read ``in_proj_weight`` and ``out_proj.weight`` inside one fused function, so
    hooks on them see nothing: here each attention first calls its :class:`PackedProjection` on the
    input (self-attention: query, key and value are one tensor), computes its heads from those
    projections through an identity in-projection and an identity output projection, then calls the
    real ``out_proj`` on them. The same numbers: multiplying by the identity is exact. An attention
    whose query, key and value differ (cross-attention) keeps its own in-projection and records so in
    :data:`CROSS_ATTENTION`. torch's fused fast paths of ``MultiheadAttention`` and
    ``TransformerEncoderLayer`` (which bypass every Linear's forward) are switched off meanwhile.
    """
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    for mha in attentions:
        mha.forward = _observed_forward(mha)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for mha in attentions:
            mha.__dict__.pop("forward", None)


#: Packed projections whose attention was called with different query, key and value while observed:
#: one set of statistics cannot describe rows that read different inputs, so they are not observed.
CROSS_ATTENTION: weakref.WeakSet[PackedProjection] = weakref.WeakSet()


def _stand_in(mha: nn.MultiheadAttention, packed: bool) -> nn.Module:
    """A shallow twin of ``mha`` (its own class, unparametrised) whose output projection is the identity and,
    with ``packed``, whose in-projection is too (three stacked identities, no bias)."""
    twin = object.__new__(module_type(mha))
    twin.__dict__.update(mha.__dict__)
    twin.__dict__.pop("forward", None)
    real = mha._modules["out_proj"]
    twin._modules = {**mha._modules, "out_proj": _StandIn(real)}
    if packed:
        like = real.weight
        eye = torch.eye(mha.embed_dim, dtype=like.dtype, device=like.device)
        twin._parameters = {**mha._parameters, "in_proj_weight": torch.cat([eye, eye, eye]),
                            "in_proj_bias": None if mha.in_proj_bias is None else torch.zeros_like(mha.in_proj_bias)}
    elif parametrize.is_parametrized(mha, "in_proj_weight"):  # the masked weight, as the attention reads it
        twin._parameters = {**mha._parameters, "in_proj_weight": mha.in_proj_weight}
    return twin


def _observed_forward(mha: nn.MultiheadAttention):
    own = module_type(mha).forward

    def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        projection = mha._modules.get(PACKED_NAME)
        packed = isinstance(projection, PackedProjection)
        if packed and not (query is key is value):
            CROSS_ATTENTION.add(projection)
            packed = False
        if packed:
            query, key, value = projection(query).chunk(3, dim=-1)
        heads, weights = own(_stand_in(mha, packed), query, key, value, *args, **kwargs)
        return mha._modules["out_proj"](heads), weights

    return forward


def prunable_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Qualified name -> layer for every prunable layer, or for ``names`` after checking them.

    Layers in :func:`left_out_layers` are skipped by default and refused when named.
    """
    if not isinstance(model, nn.Module):
        raise LayerError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(names, str):
        names = [names]
    modules = named_layers(model)
    skipped = left_out_layers(model)
    if names is None:
        found = {n: m for n, m in modules.items() if n and is_prunable(m) and n not in skipped}
        if not found and is_prunable(model):
            found = {"": model}
        if not found:
            raise NoPrunableLayersError(
                f"{type(model).__name__} has no prunable layer "
                f"(supported: {SUPPORTED})"
            )
        return found
    names = list(names)
    if not names:
        raise LayerError("layers= is empty: name at least one layer, or pass None for all")
    out = {}
    for name in names:
        if name not in modules:
            raise LayerError(f"model has no module named {name!r}")
        module = modules[name]
        if name in skipped and skipped[name] != OUTPUT_EMBEDDING_REASON:
            raise LayerError(f"layer {name!r} cannot be pruned: {skipped[name]}")
        if not is_prunable(module):
            raise LayerError(
                f"layer {name!r} is a {type(module).__name__}, which relprune cannot prune "
                f"(supported: {SUPPORTED})"
            )
        out[name] = module
    return out


def conv_dims(layer: nn.Module) -> int:
    """Number of spatial dimensions: 0 for Linear."""
    return 0 if is_linear(layer) else layer.weight.dim() - 2


def weight_matrix(weight: Tensor) -> Tensor:
    """The O x I view of a Linear or conv weight (conv: in_channels/groups x kernel volume)."""
    return weight.reshape(weight.shape[0], -1)


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """Layer input as it enters the products: Linear (N, I); conv padded explicitly.

    Padding is applied here, with the layer's own padding mode (also 'same'
    and asymmetric pads), so later products use padding 0 and a shift applied
    afterwards treats padded zeros as the real zeros they are.
    """
    if is_linear(layer):
        return x.reshape(-1, x.shape[-1])
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pad, mode=mode)
    return x


def gram_supported(layer: nn.Module) -> bool:
    """Whether the input Gram matrix (reconstruction, SparseGPT, OBS) is defined for ``layer``:
    Linear layers and ungrouped 1-d and 2-d convolutions (over their receptive fields)."""
    return is_linear(layer) or (getattr(layer, "groups", 1) == 1 and conv_dims(layer) in (1, 2))


def patch_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """A prepared input (see :func:`input_rows`) as the rows the weight matrix multiplies.

    Linear: unchanged. A convolution: every receptive field as one row (im2col), its entries in the
    (channel, *kernel) order of :func:`weight_matrix`, so ``patch_rows @ weight_matrix.T`` is the
    output at every position.
    """
    if is_linear(layer):
        return x
    if not gram_supported(layer):
        raise ValueError(f"{type(layer).__name__} with groups={layer.groups} has no patch rows")
    kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
    if conv_dims(layer) == 1:
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)  # (B, C * k, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_rows(layer: nn.Module, y: Tensor) -> Tensor:
    """Per-output tensor in the layout the products take: Linear (N, O); conv unchanged."""
    if is_linear(layer):
        return y.reshape(-1, y.shape[-1])
    return y


def forward_with(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """A prepared input (see :func:`input_rows`) through the layer with another weight and no bias."""
    if is_linear(layer):
        return x @ weight.t()
    d = conv_dims(layer)
    return _CONV_FORWARD[d](x, weight, None, layer.stride, 0, layer.dilation, layer.groups)


def weighted_input_sum(layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Sum over samples of g[sample, i] * x[sample, j], shaped like the weight.

    ``x`` comes from :func:`input_rows`, ``g`` has the layout of :func:`output_rows`.
    """
    if is_linear(layer):
        return g.t() @ x
    d = conv_dims(layer)
    return _CONV_WEIGHT_GRAD[d](
        x, layer.weight.shape, g, layer.stride, 0, layer.dilation, layer.groups
    )


def bias_view(layer: nn.Module, t: Tensor) -> Tensor:
    """Broadcast a per-output vector against the layer's output layout."""
    if is_linear(layer):
        return t
    return t.reshape(1, -1, *([1] * conv_dims(layer)))


def per_output_count(layer: nn.Module, g: Tensor) -> Tensor:
    """Sum of g over samples (and positions), per output: shape (O,)."""
    if is_linear(layer):
        return g.sum(0)
    return g.transpose(0, 1).reshape(g.shape[1], -1).sum(1)


def samples_in(layer: nn.Module, y: Tensor) -> int:
    """How many samples (rows, or output positions x images) an output holds."""
    if is_linear(layer):
        return y.numel() // y.shape[-1]
    return y.numel() // y.shape[1]
