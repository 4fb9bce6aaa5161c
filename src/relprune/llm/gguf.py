"""GGUF files that llama.cpp runs, from a transformers folder: per-layer sizes included.

The file is written by llama.cpp's own converter (``convert_hf_to_gguf.py``'s model classes and the
``gguf-py`` beside it, run in a process of their own by :mod:`relprune.llm._gguf_convert`), never by a
hand-written binary writer. A folder whose layers all have one size goes through the converter exactly
as ``convert_hf_to_gguf.py`` would convert it. A Llama folder whose layers differ (``relprune llm shrink
--scope global``, recorded in ``relprune_sizes.json``) is written as llama.cpp's ``deci`` architecture:
the Llama block whose loader and graph read a head count, key/value head count and feed-forward length
per layer (arrays in the GGUF metadata). Blocks a depth plan dropped are simply absent.

F32, F16, BF16 and Q8_0 come from the converter; the k-quants and the other llama.cpp types from
llama.cpp's ``llama-quantize`` run on an F16 file (found on ``PATH``, beside the converter in
``build/bin``, or named by ``RELPRUNE_LLAMA_QUANTIZE``).

The converter is found in ``llama_cpp=`` (a llama.cpp source tree), ``$RELPRUNE_LLAMA_CPP``, or
relprune's cache, where :func:`fetch_converter` puts it from the ``llama-cpp-python`` source
distribution on the package index (the converter is not a package of its own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core.files import follow_umask, staged_path
from ..errors import RelpruneError

#: The llama-cpp-python release whose vendored llama.cpp converter :func:`fetch_converter` fetches (and
#: the tests and benchmarks were checked against).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_ENV = "RELPRUNE_LLAMA_CPP"
QUANTIZE_ENV = "RELPRUNE_LLAMA_QUANTIZE"
#: Types the converter writes itself.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
#: Types ``llama-quantize`` makes from an F16 file (its own names, lower case).
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                  "q5_k_s", "q5_k_m", "q6_k")
GGUF_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES
#: Transformers architectures whose per-layer sizes llama.cpp can run (through its ``deci`` graph).
PER_LAYER_ARCHITECTURES = ("LlamaForCausalLM",)
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


class GGUFError(RelpruneError, ValueError):
    """A GGUF file cannot be written: the plan, the type or the converter."""


def _is_converter(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "conversion" / "__init__.py").is_file() and (
        path / "gguf-py" / "gguf" / "__init__.py").is_file()


def cache_dir() -> Path:
    """Where :func:`fetch_converter` keeps the converter, in relprune's cache (``$RELPRUNE_CACHE``)."""
    from .known import cache_dir as relprune_cache

    return relprune_cache() / f"llama-cpp-converter-{LLAMA_CPP_PYTHON_VERSION}"


def converter_dir(llama_cpp: str | Path | None = None, *, fetch: bool = False) -> Path:
    """The llama.cpp tree whose converter is used: ``llama_cpp``, ``$RELPRUNE_LLAMA_CPP``, or the cache
    (filled by :func:`fetch_converter` when ``fetch``)."""
    for given, what in ((llama_cpp, "llama_cpp"), (os.environ.get(CONVERTER_ENV), f"${CONVERTER_ENV}")):
        if given:
            path = Path(given).expanduser()
            if not _is_converter(path):
                raise GGUFError(f"{what}={path} is not a llama.cpp source tree (it needs "
                                f"{', '.join(_CONVERTER_PARTS)})")
            return path
    cached = cache_dir()
    if _is_converter(cached):
        return cached
    if fetch:
        return fetch_converter()
    raise GGUFError(f"llama.cpp's converter is not here: pass a llama.cpp source tree (--llama-cpp DIR or "
                    f"${CONVERTER_ENV}), or fetch it once with --fetch-converter (llama-cpp-python "
                    f"{LLAMA_CPP_PYTHON_VERSION}'s source from the package index)")


def fetch_converter(*, pip: tuple[str, ...] | None = None) -> Path:
    """Download llama-cpp-python's source distribution with pip and keep its llama.cpp converter in the cache.

    ``pip`` is the command that runs pip (this interpreter's by default). The cache entry appears whole or
    not at all."""
    target = cache_dir()
    if _is_converter(target):
        return target
    from ..errors import ModelLoadError
    from .known import pip_download

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch.") as tmp:
        try:
            (archive,) = pip_download([f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], Path(tmp),
                                      "llama_cpp_python-*.tar.gz", "--no-binary", ":all:", pip=pip)
        except ModelLoadError as err:
            raise GGUFError(f"could not fetch llama.cpp's converter: {_last_line(str(err))}") from err
        staged = Path(tmp) / "converter"
        _extract_converter(archive, staged)
        follow_umask(staged)
        try:
            staged.rename(target)
        except OSError:
            if not _is_converter(target):  # another process may have put it there meanwhile
                raise
    return target


def _extract_converter(archive: Path, into: Path) -> None:
    """The converter's files of a llama-cpp-python source archive (``*/vendor/llama.cpp/<part>``)."""
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in (*_CONVERTER_PARTS, "LICENSE"):
                if not (m.isfile() or m.isdir()):
                    continue
                m.name = str(Path(*parts[3:]))
                members.append(m)
        tar.extractall(into, members=members, filter="data")
    if not _is_converter(into):
        raise GGUFError(f"{archive.name} holds no llama.cpp converter")


def quantize_binary(llama_cpp: Path | None = None) -> Path:
    """llama.cpp's ``llama-quantize``: ``$RELPRUNE_LLAMA_QUANTIZE``, on ``PATH``, or in ``llama_cpp/build/bin``."""
    env = os.environ.get(QUANTIZE_ENV)
    candidates = [Path(env)] if env else []
    found = shutil.which("llama-quantize")
    candidates += [Path(found)] if found else []
    if llama_cpp is not None:
        candidates.append(Path(llama_cpp) / "build" / "bin" / "llama-quantize")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise GGUFError(f"this type needs llama.cpp's llama-quantize (build llama.cpp and put it on PATH or name it in "
                    f"${QUANTIZE_ENV}); the converter alone writes {', '.join(CONVERTER_TYPES)}")


def plan_of(folder: str | Path) -> dict | None:
    """The per-layer sizes a shrunk folder records, checked against what llama.cpp can run; None when every
    layer has the config's sizes. Raises :class:`GGUFError` for a plan llama.cpp cannot express."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise GGUFError(f"{folder} is not a transformers folder (config.json: {err})") from err
    sizes_file = folder / "relprune_sizes.json"
    if not sizes_file.is_file():
        return None
    try:
        sizes = json.loads(sizes_file.read_text())
        layers = [{k: int(s[k]) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
                  for s in sizes["layers"]]
        head_dim = int(sizes["head_dim"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GGUFError(f"{sizes_file} is not a sizes record: {err}") from err
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in PER_LAYER_ARCHITECTURES:
        raise GGUFError(f"llama.cpp runs layers of different sizes only as Llama blocks (its 'deci' graph); this "
                        f"{arch} plan has them: shrink with --scope uniform for a GGUF file")
    if len(layers) != int(config.get("num_hidden_layers", -1)):
        raise GGUFError(f"{sizes_file} describes {len(layers)} layers, config.json {config.get('num_hidden_layers')}")
    for i, s in enumerate(layers):
        if s["intermediate_size"] < 1 or s["num_key_value_heads"] < 1 or (
                s["num_attention_heads"] % s["num_key_value_heads"]):
            # llama.cpp's deci graph skips a whole layer without feed-forward units, attention included.
            raise GGUFError(f"layer {i} of this plan ({s}) cannot run in llama.cpp: every layer needs a feed-forward "
                            "unit and whole key/value groups")
    return {"head_dim": head_dim, "layers": layers}


def export_gguf(folder: str | Path, out: str | Path, *, gguf_type: str = "f16", llama_cpp: str | Path | None = None,
                fetch: bool = False, overwrite: bool = False) -> Path:
    """Write ``out``, a GGUF file of the transformers folder ``folder`` (any plan, per-layer sizes included)
    in ``gguf_type`` (:data:`GGUF_TYPES`); returns ``out``.

    The file appears whole or not at all; ``folder`` is only read. Raises :class:`GGUFError` for an unknown
    type, a plan llama.cpp cannot run, a missing converter or ``llama-quantize``, or a converter failure
    (with its last line)."""
    folder, out = Path(folder), Path(out)
    gguf_type = str(gguf_type).lower()
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if out.exists() and not overwrite:
        raise GGUFError(f"{out} exists; choose another path or overwrite it (overwrite=True, --overwrite)")
    if out.suffix != ".gguf":
        raise GGUFError(f"the GGUF file's name must end in .gguf, got {out.name}")
    plan = plan_of(folder)
    tree = converter_dir(llama_cpp, fetch=fetch)
    quantize = quantize_binary(tree) if gguf_type in QUANTIZE_TYPES else None
    with staged_path(out) as tmp:
        first = tmp / ("f16.gguf" if quantize else out.name)
        cmd = [sys.executable, str(Path(__file__).with_name("_gguf_convert.py")), "--llama-cpp", str(tree),
               "--outtype", "f16" if quantize else gguf_type, str(folder), str(first)]
        if plan is not None:
            sizes = tmp / "sizes.json"
            sizes.write_text(json.dumps(plan))
            cmd[2:2] = ["--sizes", str(sizes)]
        _run(cmd, "llama.cpp's converter")
        if quantize is not None:
            _run([str(quantize), str(first), str(tmp / out.name), gguf_type.upper()], "llama-quantize")
    return out


def _run(cmd: list[str], what: str) -> None:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, as convert_hf_to_gguf.py uses it
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise GGUFError(f"{what} failed: {_last_line(done.stderr) or f'exit status {done.returncode}'}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
