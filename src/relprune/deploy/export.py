"""Writing pruned models for deployment, and reading them back.

Three forms, each a safetensors file plus a small JSON of metadata (and ONNX and torch.export programs):

* ``dense``  - a shrunk (or any) ``nn.Sequential`` as ordinary dense weights;
* ``masked`` - the model with its masks (the parametrisations' ``original`` and ``mask`` tensors);
* ``sparse`` - every prunable weight as a bitmask (1 bit per entry) plus its
  non-zero values, in compressed-tensors' ``sparse-bitmask`` layout (files written before it, with
  one flat bitmask per weight, still load); other tensors stored dense.

Architectures of chains (``nn.Sequential``) are stored as a list of layer specs (type and
constructor arguments), so loading needs no Python code from the writer. Any other model (a
residual net, a transformer) is stored under its own parameter names with no architecture: load
it into a fresh instance of its class (``load_exported(path, model=...)``), or write it as a
``torch.export`` program (:func:`export_program`), which loads without the class.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..core.compressed import BITMASK, compress_state, decompress_state, pays_off, prefix_of
from ..core.files import atomic_file, atomic_write_text, check_tensors_sha256, tensors_sha256
from ..core.layers import attach_packed_projections, is_prunable, module_type, weight_key
from ..core.masks import copy_model, load_state_dict, make_permanent
from ..errors import CheckpointError, ShrinkError
from .shrink import flatten_chain

FORMATS = ("dense", "masked", "sparse")

_SPEC = {
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.Conv1d: lambda m: _conv(m), nn.Conv2d: lambda m: _conv(m), nn.Conv3d: lambda m: _conv(m),
    nn.BatchNorm1d: lambda m: _bn(m), nn.BatchNorm2d: lambda m: _bn(m), nn.BatchNorm3d: lambda m: _bn(m),
    nn.ReLU: lambda m: {}, nn.ReLU6: lambda m: {}, nn.Tanh: lambda m: {}, nn.Sigmoid: lambda m: {},
    nn.GELU: lambda m: {"approximate": m.approximate}, nn.SiLU: lambda m: {}, nn.Identity: lambda m: {},
    nn.LeakyReLU: lambda m: {"negative_slope": m.negative_slope},
    nn.Hardtanh: lambda m: {"min_val": m.min_val, "max_val": m.max_val},
    nn.Dropout: lambda m: {"p": m.p}, nn.Dropout2d: lambda m: {"p": m.p},
    nn.Flatten: lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
    nn.MaxPool2d: lambda m: _pool(m), nn.AvgPool2d: lambda m: _pool(m), nn.MaxPool1d: lambda m: _pool(m),
    nn.AdaptiveAvgPool2d: lambda m: {"output_size": m.output_size},
}
_TYPES = {t.__name__: t for t in _SPEC}


def _conv(m: nn.Module) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _bn(m: nn.Module) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _pool(m: nn.Module) -> dict[str, Any]:
    keys = ("kernel_size", "stride", "padding") + (("ceil_mode",) if hasattr(m, "ceil_mode") else ())
    return {k: getattr(m, k) for k in keys}


def architecture(model: nn.Module) -> list[dict[str, Any]]:
    """The layer specs of a chain model (nested Sequentials flattened)."""
    out = []
    for name, m in flatten_chain(model):
        kind = module_type(m)
        if kind not in _SPEC:
            raise CheckpointError(f"cannot describe module {name!r} ({kind.__name__}) for export")
        out.append({"type": kind.__name__, "args": _SPEC[kind](m)})
    return out


def build(spec: list[dict[str, Any]]) -> nn.Sequential:
    """An ``nn.Sequential`` from :func:`architecture` specs."""
    layers = []
    for item in spec:
        if item.get("type") not in _TYPES:
            raise CheckpointError(f"unknown layer type {item.get('type')!r} in architecture")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in item.get("args", {}).items()}
        try:
            layers.append(_TYPES[item["type"]](**args))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"architecture entry {item['type']} {args}: {err}") from err
    return nn.Sequential(*layers)


def _flat_state(model: nn.Module) -> nn.Sequential:
    """The model's leaves re-parented into one flat Sequential, so key names match :func:`build`."""
    return nn.Sequential(*[m for _, m in flatten_chain(model)])


def _as_stored(model: nn.Module) -> tuple[nn.Module, list[dict[str, Any]] | None]:
    """(module whose state is written, its architecture): a flat chain when possible, else the model."""
    try:
        flat = _flat_state(model)
        return flat, architecture(flat)
    except (ShrinkError, CheckpointError):
        return model, None


def _write(tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path, stem: str) -> Path:
    """``stem.safetensors`` (each tensor's SHA-256 in its metadata) and ``stem.json``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, "tensor_sha256": tensors_sha256(tensors)}
    with atomic_file(path) as fh:
        fh.write(save(tensors, metadata={"relprune": json.dumps(meta)}))
    atomic_write_text(json.dumps(meta, indent=2) + "\n", folder / f"{stem}.json")
    return path


def export_dense(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Masks folded in, stored as plain dense weights."""
    plain, arch = _as_stored(make_permanent(copy_model(model)))
    meta = {"format": "dense", "architecture": arch, **(extra or {})}
    return _write(plain.state_dict(), meta, Path(folder), "dense")


def export_masked(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Weights and masks as they are, for further training."""
    flat, arch = _as_stored(copy_model(model))
    meta = {"format": "masked", "architecture": arch, **(extra or {})}
    return _write(flat.state_dict(), meta, Path(folder), "masked")


def export_program(model: nn.Module, example: Tensor | tuple[Tensor, ...], folder: str | Path) -> Path:
    """The model (masks folded in) as a ``torch.export`` program: loads with no Python class.

    ``example`` fixes the input shapes the program is traced for; the batch dimension stays dynamic
    when the model allows it. Raises ``CheckpointError`` when torch.export cannot capture the model.
    """
    plain = make_permanent(copy_model(model)).eval()
    args = (example,) if isinstance(example, Tensor) else tuple(example)
    # torch.export specialises a dimension of size 1 to the constant 1: trace a batch of two
    # copies instead, so a one-sample example still gives a program that takes any batch size.
    args = tuple(a.expand(2, *a.shape[1:]).clone() if isinstance(a, Tensor) and a.dim() and a.shape[0] == 1
                 else a for a in args)
    try:
        try:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(plain, args, dynamic_shapes=tuple({0: batch} for _ in args))
        except Exception:
            program = torch.export.export(plain, args)
    except Exception as err:
        raise CheckpointError(f"torch.export cannot capture {type(model).__name__}: "
                              f"{' '.join(str(err).split())[:200]}") from err
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "program.pt2"
    torch.export.save(program, str(path))
    return path


def export_onnx(model: nn.Module, example: Tensor | tuple[Tensor, ...], folder: str | Path) -> Path:
    """The model (masks folded in) as ``folder/model.onnx`` for ONNX Runtime, batch dimension dynamic.

    Needs the ``onnx`` extra (onnx and onnxscript, torch's exporter). Raises ``CheckpointError``
    naming the operation the exporter cannot express when the model holds one.
    """
    try:
        import onnx  # noqa: F401 - torch's exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise CheckpointError("ONNX export needs onnx and onnxscript: pip install 'relprune[onnx]'") from err
    plain = make_permanent(copy_model(model)).eval()
    args = (example,) if isinstance(example, Tensor) else tuple(example)
    args = tuple(a.expand(2, *a.shape[1:]).clone() if isinstance(a, Tensor) and a.dim() and a.shape[0] == 1
                 else a for a in args)  # as export_program: a batch of one would be fixed at one
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    batch = torch.export.Dim("batch", min=1)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's own chatter
            warnings.simplefilter("ignore")
            torch.onnx.export(plain, args, str(path), dynamo=True, external_data=False,
                              dynamic_shapes=tuple({0: batch} for _ in args), input_names=["input"])
    except Exception as err:
        path.unlink(missing_ok=True)
        text = " ".join(str(err).split())
        op = re.search(r"(aten[.:]{1,2}[A-Za-z0-9_.]+)", text)
        obstacle = f"the operation {op.group(1)} has no ONNX translation" if op else text[:200]
        raise CheckpointError(f"ONNX export of {type(model).__name__} failed: {obstacle}") from err
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return path


def export_sparse(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Each prunable weight that is smaller so as a bitmask of non-zeros plus the non-zero values, in
    compressed-tensors' ``sparse-bitmask`` layout (:mod:`relprune.core.compressed`)."""
    plain, arch = _as_stored(make_permanent(copy_model(model)))
    state = plain.state_dict()
    attach_packed_projections(plain)  # a copy: its attention's in_proj_weight is a prunable weight too
    prunable = {weight_key(n, m) for n, m in plain.named_modules() if n and is_prunable(m)}
    names = [k for k in state if k in prunable and pays_off(state[k], BITMASK)]
    tensors = compress_state(state, names, BITMASK)
    meta = {"format": "sparse", "architecture": arch, "sparse_layout": BITMASK, "sparse_weights": names,
            **(extra or {})}
    return _write(tensors, meta, Path(folder), "sparse")


def _read(path: Path, verify: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("relprune", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise CheckpointError(f"{path}: not a relprune export")
    if verify and "tensor_sha256" in meta:  # exports before issue 30 carry none
        check_tensors_sha256(tensors, meta["tensor_sha256"], str(path))
    return tensors, meta


def load_exported(path: str | Path, model: nn.Module | None = None, *,
                  verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from any exported form (a file or the folder holding one).

    A chain is rebuilt from its stored architecture; any other model needs ``model``, a fresh
    instance of its class, into which the weights are loaded. A ``program.pt2`` loads on its own.
    Each stored tensor is checked against the SHA-256 recorded when it was written (``verify=False``
    skips that); a changed one raises :class:`~relprune.IntegrityError`.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / f"{f}.safetensors" for f in FORMATS if (path / f"{f}.safetensors").is_file()]
        if not found and (path / "program.pt2").is_file():
            path = path / "program.pt2"
        elif len(found) != 1:
            raise CheckpointError(f"{path}: expected exactly one of {[f + '.safetensors' for f in FORMATS]}")
        else:
            path = found[0]
    if path.suffix == ".pt2":
        quiet = logging.getLogger("torch.export")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # torch logs its own lines about a bad archive; ours is the one line
        try:
            return torch.export.load(str(path)).module(), {"format": "program"}
        except Exception as err:
            raise CheckpointError(f"{path}: cannot load the program: {' '.join(str(err).split())[:200]}") from err
        finally:
            quiet.setLevel(level)
    tensors, meta = _read(path, verify)
    if meta.get("architecture") is None:
        if model is None:
            raise CheckpointError(f"{path} holds a model that is not a chain: pass model= (a fresh instance of "
                                  "its class) to load it, or export it with export_program")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    else:
        # The stored architecture is checked against the stored tensors on the meta device first: a
        # file must never make us allocate more than it holds.
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build(meta["architecture"]).state_dict().items()}
    if meta["format"] == "sparse" and "sparse_layout" in meta:
        tensors = _decompressed(path, tensors, meta, expected)
    elif meta["format"] == "sparse":  # the layout before compressed-tensors': one flat bitmask per weight
        _check_sparse(path, tensors, meta.get("sparse_shapes"), expected)
        for key, shape in meta["sparse_shapes"].items():
            bits = tensors.pop(f"{key}.bitmask").numpy()
            values = tensors.pop(f"{key}.values")
            nz = torch.from_numpy(np.unpackbits(bits, count=math.prod(shape)).astype(bool)).reshape(shape)
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[nz] = values
            tensors[key] = dense
    if meta["format"] == "dense":
        wrong = sorted(k for k in set(expected) | set(tensors)
                       if k not in tensors or k not in expected or tuple(tensors[k].shape) != expected[k])
        if wrong:
            raise CheckpointError(f"{path}: weights do not fit the stored architecture ({wrong[0]})")
    if meta.get("architecture") is not None:
        model = build(meta["architecture"])
    if meta["format"] == "masked":
        load_state_dict(model, tensors)
    else:
        try:
            model.load_state_dict(tensors)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit the stored architecture: {err}") from err
    model.eval()
    return model, meta


def _decompressed(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any],
                  expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The dense tensors of a sparse export, each compressed weight's shape checked against the model first."""
    layout, names = meta.get("sparse_layout"), meta.get("sparse_weights")
    if layout != BITMASK or not isinstance(names, list):
        raise CheckpointError(f"{path}: a sparse export in layout {layout!r} without its weight list")
    for key in names:
        stored = tensors.get(f"{prefix_of(key)}.shape")
        if key not in expected or stored is None or stored.flatten().tolist() != list(expected[key]):
            raise CheckpointError(f"{path}: sparse weight {key!r} of shape "
                                  f"{None if stored is None else stored.flatten().tolist()} is not in the model "
                                  f"(expected {list(expected.get(key, ()))})")
    return dict(decompress_state(tensors, tensors.__getitem__, BITMASK, names))


def _check_sparse(path: Path, tensors: dict[str, Tensor], shapes: Any, expected: dict[str, tuple[int, ...]]) -> None:
    """Each bitmask and its values agree in count with each other and with the weight they describe."""
    if not isinstance(shapes, dict):
        raise CheckpointError(f"{path}: a sparse export without sparse_shapes")
    for key, shape in shapes.items():
        if key not in expected or list(expected[key]) != list(shape):
            raise CheckpointError(f"{path}: sparse weight {key!r} of shape {shape} is not in the model "
                                  f"(expected {list(expected.get(key, ()))})")
        bits, values = tensors.get(f"{key}.bitmask"), tensors.get(f"{key}.values")
        if bits is None or values is None or bits.dtype != torch.uint8:
            raise CheckpointError(f"{path}: sparse weight {key!r} lacks its uint8 bitmask or its values")
        numel = math.prod(shape)
        if bits.numel() != -(-numel // 8):
            raise CheckpointError(f"{path}: the bitmask of {key!r} has {bits.numel()} bytes, not {-(-numel // 8)}")
        kept = int(np.unpackbits(bits.numpy(), count=numel).sum())
        if values.numel() != kept:
            raise CheckpointError(f"{path}: the bitmask of {key!r} marks {kept} values but {values.numel()} "
                                  "are stored")


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size
