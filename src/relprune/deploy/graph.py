"""The dependency graph of a model's channels, found by tracing it with torch.fx.

Removing output channel k of a convolution is exact only if everything that channel feeds loses
it too: the BatchNorm entry, the next layers' input columns, and - through a residual add, a gated
product or a concatenation - the channels it is summed or multiplied with, whose producers must
lose theirs as well. Tracing the forward pass once (with shapes, on an example input) follows each
tensor's channel dimension through the operations and unites the channel spaces that must shrink
together into *groups*. Every structured operation (scores, budgets, shrinking) goes through the
groups this module builds.

A grouped convolution (``groups`` = G) is exact to shrink only if every group keeps as many input
and output channels as the others, in the same places: its channel spaces are *folded*, so one
unit of the group is a slot - channel j of every one of the G groups - and is removed from all of
them together (the layout Torch-Pruning's channel groups follow too).

A group is refused (``prunable`` False, with the reason) when its channels reach the model's output
or input, pass through an operation that mixes channels (a normalisation over them, a reshape
that is not a flatten), a grouped convolution whose input is laid out in a way its slots cannot
follow, or a parameter read directly by the forward pass.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layers import is_prunable
from ..core.units import Group, Member
from ..errors import ShrinkError

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
                     nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
                     nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.PReLU)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
POINTWISE_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.tanh, F.sigmoid, F.hardtanh,
                       F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.dropout, torch.relu, torch.tanh,
                       torch.sigmoid, torch.exp, torch.abs, torch.neg, operator.neg, F.max_pool1d, F.max_pool2d,
                       F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                       F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.interpolate,
                       torch.clone, torch.nn.functional.dropout2d}
POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "contiguous", "clone", "float",
                     "to", "type_as", "detach"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
          torch.div, operator.iadd, operator.imul}
BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
FLATTENS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
REDUCE_METHODS = {"mean", "sum", "amax", "max"}
#: The refusal of channels the model returns (they have no reader the graph could shrink with them).
OUTPUT_REASON = "they reach the model's output"



class _Space:
    """A channel space under union-find: every tensor dimension that carries the same channels."""

    _ids = 0

    def __init__(self, size: int, origin: str, fold: int = 1):
        self.size = size  # units; each unit is ``fold`` channels (one per group of a grouped conv)
        self.fold = fold
        self.parent: _Space = self
        self.members: list[Member] = []
        self.refusals: list[str] = []
        self.origin = origin

    def find(self) -> _Space:
        root = self
        while root.parent is not root:
            root = root.parent
        node = self
        while node.parent is not root:
            node.parent, node = root, node.parent
        return root

    @property
    def width(self) -> int:
        """Channels (units times fold) of the root."""
        root = self.find()
        return root.size * root.fold

    def member(self, module: str, role: str, offset: int, expand: int = 1) -> None:
        root = self.find()
        root.members.append(Member(module, role, offset, expand, root.fold))


def _fold(space: _Space, groups: int) -> bool:
    """Tie ``space``'s channels into slots of ``groups`` (channel j of every group); False if it cannot."""
    root = space.find()
    if root.fold == groups:
        return True
    if root.fold != 1 or root.size % groups:
        return False
    root.size //= groups
    root.fold = groups
    for m in root.members:
        m.repeat = groups
    return True


def _union(a: _Space, b: _Space, where: str) -> None:
    ra, rb = a.find(), b.find()
    if ra is rb:
        return
    if ra.width == rb.width and ra.fold != rb.fold:
        _fold(ra, rb.fold) or _fold(rb, ra.fold)
    if ra.size != rb.size or ra.fold != rb.fold:
        why = (f"{where} joins channel spaces of different sizes" if ra.width != rb.width else
               f"{where} joins channels grouped differently by grouped convolutions")
        ra.refusals.append(why)
        rb.refusals.append(why)
    rb.parent = ra
    ra.members.extend(rb.members)
    ra.refusals.extend(rb.refusals)


@dataclass
class _Layout:
    """Where a tensor's channels are: dimension ``dim`` holds ``blocks`` in order, each a channel
    space whose channels cover ``expand`` consecutive entries."""

    dim: int
    blocks: list[tuple[_Space, int]]

    def spaces(self) -> list[_Space]:
        return [s for s, _ in self.blocks]


class DependencyGraph:
    """Channel groups of ``model`` found by tracing it on ``example`` (see the module docstring).

    ``leaves`` names submodules not to trace into (their outputs then carry no channel layout,
    and any channels they read are refused). Raises ``ShrinkError`` with what to do when the model
    cannot be traced.
    """

    def __init__(self, model: nn.Module, example: Tensor | Sequence[Tensor], *, leaves: Iterable[str] = ()):
        self.model = model
        self.leaves = set(leaves)
        unknown = sorted(self.leaves - {n for n, _ in model.named_modules()})
        if unknown:
            raise ShrinkError(f"leaves names modules the model does not have: {unknown}")
        args = (example,) if isinstance(example, Tensor) else tuple(example)
        try:
            # The model itself first (in eval mode, so no running statistic moves): torch.fx's shape
            # pass prints a traceback of its own on failure.
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    model(*args)
            finally:
                model.train(was_training)
        except Exception as err:
            raise ShrinkError(f"the model fails on the example: {_line(err)}") from err
        self.graph_module = _trace(model, self.leaves)
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            with torch.no_grad():
                ShapeProp(self.graph_module).propagate(*args)
        except Exception as err:
            raise ShrinkError(f"running the traced model on the example failed: {_line(err)}") from err
        self.modules = dict(model.named_modules())
        self.spatial: dict[str, int] = {}  # output positions per sample of each conv/linear (FLOPs)
        self.groups = self._build()

    # -- building ------------------------------------------------------------
    def _build(self) -> list[Group]:
        layouts: dict[torch.fx.Node, _Layout | None] = {}
        spaces: list[_Space] = []

        def new_space(size: int, origin: str, fold: int = 1) -> _Space:
            s = _Space(size, origin, fold)
            spaces.append(s)
            return s

        def refuse(layout: _Layout | None, why: str) -> None:
            if layout is not None:
                for s in layout.spaces():
                    s.find().refusals.append(why)

        calls = Counter(str(n.target) for n in self.graph_module.graph.nodes if n.op == "call_module")
        for node in self.graph_module.graph.nodes:
            ins = [layouts.get(a) for a in node.all_input_nodes]
            meta = node.meta.get("tensor_meta")
            shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            where = _where(node)
            if node.op == "placeholder":
                if shape is not None and len(shape) >= 2:
                    s = new_space(shape[1], "input")
                    s.refusals.append("they are the model's input channels")
                    layouts[node] = _Layout(1, [(s, 1)])
                continue
            if node.op == "get_attr":
                layouts[node] = None
                continue
            if node.op == "output":
                for layout in ins:
                    refuse(layout, OUTPUT_REASON)
                continue
            if node.op == "call_module":
                layouts[node] = self._module(node, ins, shape, new_space, refuse, where)
                if calls[str(node.target)] > 1:
                    # One weight serves every call: its channels cannot be shrunk for one call alone.
                    why = f"module {node.target} is called at {calls[str(node.target)]} places"
                    for layout in (*ins, layouts[node]):
                        refuse(layout, why)
                continue
            layouts[node] = self._function(node, ins, shape, refuse, where)
        groups = []
        seen: set[int] = set()
        for s in spaces:
            root = s.find()
            if id(root) in seen:
                continue
            seen.add(id(root))
            groups.append(Group(root.size, list(root.members), list(root.refusals)))
        return groups

    def _module(self, node, ins, shape, new_space, refuse, where) -> _Layout | None:
        name = str(node.target)
        module = self.modules[name]
        x = ins[0] if ins else None
        for extra in ins[1:]:
            refuse(extra, f"{where} takes them as an extra argument")
        if is_prunable(module) and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            linear = isinstance(module, nn.Linear)
            cdim = -1 if linear else 1
            groups = 1 if linear else module.groups
            in_size = module.in_features if linear else module.in_channels
            out_size = module.out_features if linear else module.out_channels
            if shape is not None:
                self.spatial[name] = int(math.prod(shape[2:])) if not linear else int(math.prod(shape[1:-1]) or 1)
            if x is not None and not _same_dim(x.dim, cdim, len(node.all_input_nodes[0].meta["tensor_meta"].shape)):
                refuse(x, f"{name} reads another dimension than the one they are on")
                x = None
            if groups > 1 and groups == in_size == out_size:
                # Depthwise: output channel k reads input channel k only; one group runs through.
                if x is not None and len(x.blocks) == 1 and x.blocks[0][1] == 1:
                    space = x.blocks[0][0]
                    space.member(name, "depthwise", 0)
                    return _Layout(1, [(space, 1)])
                refuse(x, f"depthwise {name} reads them in a layout it cannot follow")
                out = new_space(out_size, name)
                out.refusals.append(f"depthwise {name} reads channels that cannot be pruned with these")
                out.member(name, "depthwise", 0)
                return _Layout(1, [(out, 1)])
            if groups > 1:
                # Grouped: the input and output spaces are folded into slots; the weight's column j
                # is input slot j for every group.
                if x is not None and len(x.blocks) == 1 and x.blocks[0][1] == 1 and _fold(x.blocks[0][0], groups):
                    x.blocks[0][0].find().members.append(Member(name, "in", 0))
                else:
                    refuse(x, f"grouped convolution {name} (groups={groups}) reads them in a layout whose equal "
                              "groups it cannot keep")
                out = new_space(out_size // groups, name, fold=groups)
                out.member(name, "out", 0)
                return _Layout(1, [(out, 1)])
            if x is not None:
                offset = 0
                for space, expand in x.blocks:
                    space.member(name, "in", offset, expand)
                    offset += space.width * expand
            out = new_space(out_size, name)
            out.member(name, "out", 0)
            return _Layout(cdim if linear else 1, [(out, 1)])
        if isinstance(module, NORMS):
            if x is not None and x.dim == 1 and all(e == 1 for _, e in x.blocks):
                offset = 0
                for space, _ in x.blocks:
                    space.member(name, "norm", offset)
                    offset += space.width
                return x
            refuse(x, f"{name} normalises them in a layout it cannot follow")
            return None
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)) or type(module).__name__.endswith(
                "RMSNorm"):
            refuse(x, f"{name} ({type(module).__name__}) normalises over them, so removing some changes the rest")
            return None
        if isinstance(module, POINTWISE_MODULES + POOL_MODULES):
            return x
        if isinstance(module, nn.Flatten):
            return _flattened(x, node, refuse, where)
        refuse(x, f"{name} ({type(module).__name__}) is a leaf relprune cannot see into")
        return None

    def _function(self, node, ins, shape, refuse, where) -> _Layout | None:
        target = node.target
        tensor_ins = [layout for layout in ins if layout is not None]
        if (node.op == "call_function" and target in POINTWISE_FUNCTIONS) or (
                node.op == "call_method" and target in POINTWISE_METHODS):
            return ins[0] if ins else None
        if (node.op == "call_function" and target in BINARY) or (node.op == "call_method" and target in BINARY_METHODS):
            if len(tensor_ins) == 2:
                a, b = tensor_ins
                if a.dim != b.dim and not _same_dim(a.dim, b.dim, len(shape or ())):
                    refuse(a, f"{where} combines them with another dimension")
                    refuse(b, f"{where} combines them with another dimension")
                    return None
                if [(s.width, e) for s, e in a.blocks] != [(s.width, e) for s, e in b.blocks]:
                    refuse(a, f"{where} adds differently laid-out channels")
                    refuse(b, f"{where} adds differently laid-out channels")
                    return None
                for (sa, _), (sb, _) in zip(a.blocks, b.blocks, strict=True):
                    _union(sa, sb, where)
                return a
            if len(tensor_ins) == 1:
                # With a constant, a scalar or a parameter: a parameter of channel size would need pruning.
                other = [arg for arg in node.all_input_nodes if _is_parameter(arg)]
                if other:
                    refuse(tensor_ins[0], f"{where} combines them with a parameter")
                    return None
                return tensor_ins[0]
            return None
        if (node.op == "call_function" and target is torch.cat) or (node.op == "call_function" and target is
                                                                   torch.concat):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = [ins[i] for i in range(len(node.all_input_nodes))]
            if parts and all(p is not None for p in parts) and all(_same_dim(p.dim, dim, len(shape)) for p in parts):
                return _Layout(parts[0].dim, [b for p in parts for b in p.blocks])
            for p in parts:
                refuse(p, f"{where} concatenates them along another dimension")
            return None
        if (node.op == "call_function" and target in FLATTENS) or (node.op == "call_method" and target in
                                                                    FLATTEN_METHODS):
            return _flattened(ins[0] if ins else None, node, refuse, where)
        if node.op == "call_method" and target in REDUCE_METHODS and ins and ins[0] is not None:
            x = ins[0]
            in_rank = len(node.all_input_nodes[0].meta["tensor_meta"].shape)
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            dims = [d % in_rank for d in dims]
            cdim = x.dim % in_rank
            if dims and cdim not in dims:
                keep = node.kwargs.get("keepdim", False)
                return _Layout(cdim if keep else cdim - sum(d < cdim for d in dims), x.blocks)
            refuse(x, f"{where} reduces over them")
            return None
        if (node.op == "call_function" and target in (getattr, operator.getitem)) or (
                node.op == "call_method" and target in ("size", "dim")):
            if tensor_ins and shape is not None:
                refuse(tensor_ins[0], f"{where} indexes into them")
            return None
        for layout in tensor_ins:
            refuse(layout, f"{where} is an operation relprune cannot follow (mark the module that calls it as a "
                           "leaf, or prune unstructured)")
        return None

    # -- queries -------------------------------------------------------------
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, module: str) -> Group:
        """The group holding ``module``'s output channels."""
        for g in self.groups:
            if any(m.module == module and m.role in ("out", "depthwise") for m in g.members):
                return g
        raise ShrinkError(f"{module!r} produces no channels in this graph")


def _where(node: torch.fx.Node) -> str:
    target = node.target
    label = getattr(target, "__name__", None) or str(target)
    kind = {"call_module": "module", "call_method": "method", "call_function": "function"}.get(node.op, node.op)
    return f"{kind} {label} (node {node.name})"


def _is_parameter(node: torch.fx.Node) -> bool:
    return node.op == "get_attr"


def _same_dim(a: int, b: int, rank: int) -> bool:
    return rank > 0 and a % rank == b % rank


def _flattened(x: _Layout | None, node: torch.fx.Node, refuse, where: str) -> _Layout | None:
    """A flatten of (N, C, *spatial) into (N, C * prod(spatial)): channel c covers prod(spatial) entries."""
    if x is None:
        return None
    src = node.all_input_nodes[0].meta.get("tensor_meta")
    out = node.meta.get("tensor_meta")
    if src is None or out is None:
        refuse(x, f"{where} reshapes them")
        return None
    s_in, s_out = tuple(src.shape), tuple(out.shape)
    cdim = x.dim % len(s_in)
    if len(s_out) == cdim + 1 and s_out[:cdim] == s_in[:cdim] and s_out[cdim] == math.prod(s_in[cdim:]):
        factor = math.prod(s_in[cdim + 1:])
        return _Layout(cdim, [(s, e * factor) for s, e in x.blocks])
    if s_out == s_in:
        return x
    refuse(x, f"{where} reshapes them into {list(s_out)}")
    return None


def _trace(model: nn.Module, leaves: set[str]) -> torch.fx.GraphModule:
    names = {m: n for n, m in model.named_modules()}

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (names.get(m) in leaves or is_prunable(m) or isinstance(m, NORMS)
                    or super().is_leaf_module(m, qualname))

    try:
        graph = Tracer().trace(model)
    except Exception as err:
        raise ShrinkError(
            f"cannot trace {type(model).__name__} with torch.fx ({_line(err)}); mark the submodule with "
            "data-dependent control flow as a leaf (leaves=[name]) or prune unstructured") from err
    return torch.fx.GraphModule(model, graph)


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__
