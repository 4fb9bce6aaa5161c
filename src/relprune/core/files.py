"""Writing files and folders so that nothing half-written, stale or unreadable is ever left behind.

Every relprune writer goes through here:

* :func:`atomic_file` / :func:`atomic_write_text` - one file, written beside its target and renamed
  over it; the temporary file is removed when writing fails or is interrupted.
* :func:`staged_folder` - a whole output folder, written into a fresh folder beside the target and
  renamed into place in one step (``replace=True`` swaps out an earlier output the same way, so a
  reader sees the old output or the new one, never a mix). A manifest of every file's SHA-256 is
  written last (:data:`MANIFEST`), and :func:`verify_manifest` lets a reader refuse a file changed
  since.
* Permissions follow the user's umask (temporary files are created 0600 and folders 0700, and
  safetensors writes its files 0600): :func:`follow_umask` is applied before anything is renamed
  into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import IntegrityError, RelpruneError

if TYPE_CHECKING:
    from torch import Tensor

#: How a reader's caller turns the SHA-256 check off, named in every refusal.
SKIP_HINT = "verify=False (--no-verify-weights)"
#: The file in a staged folder that records each file's SHA-256 (written by :func:`staged_folder`).
MANIFEST = "relprune-manifest.json"


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything below it) the modes a plain ``open``/``mkdir`` would."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """An open file that becomes ``path`` when the block ends, and vanishes when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_path(path: str | Path) -> Iterator[Path]:
    """A scratch folder beside ``path`` for a writer that names its own files (another process, a tool); the
    block leaves the output at ``path`` inside it (its name); it is then moved to ``path`` in one step, and
    the folder is removed whether the block succeeds or raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        yield Path(tmp)
        staged = Path(tmp) / path.name
        if not staged.exists():
            raise RelpruneError(f"the writer of {path} left no {path.name} in its staging folder")
        follow_umask(staged)
        os.replace(staged, path)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` in full or not at all."""
    with atomic_file(path, "w") as fh:
        fh.write(text)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 of every file below ``folder`` (the manifest itself aside)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    record = {"sha256": {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}}
    (folder / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def verify_manifest(folder: str | Path, *, skip_hint: str = SKIP_HINT) -> bool:
    """Check every file a folder's manifest lists against its SHA-256; False when it has no manifest.

    Raises :class:`IntegrityError` naming the first file that is missing or differs, and ``skip_hint``
    (how the caller turns the check off).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        listed = json.loads(path.read_text())["sha256"]
        items = [(str(k), str(v)) for k, v in listed.items()]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise IntegrityError(f"{path} is not a relprune manifest ({err}); pass {skip_hint} to load without "
                             "checking") from err
    for name, expected in items:
        file = folder / name
        if not file.resolve().is_relative_to(folder.resolve()):
            raise IntegrityError(f"{path} lists {name!r}, which is outside the folder")
        if not file.is_file():
            raise IntegrityError(f"{folder}: {name} is listed in its manifest but missing")
        if file_sha256(file) != expected:
            raise IntegrityError(f"{folder}: {name} changed since relprune wrote it (its SHA-256 differs from "
                                 f"{MANIFEST}); pass {skip_hint} to load it anyway")
    return True


def tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (C order), whatever its dtype."""
    import torch

    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()  # hashlib reads the array's buffer: no bytes copy


def tensors_sha256(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Each tensor's SHA-256, by name: recorded in a single-file format's own metadata."""
    return {name: tensor_sha256(t) for name, t in sorted(tensors.items())}


def check_tensors_sha256(tensors: dict[str, Tensor], recorded: Any, where: str, *,
                         skip_hint: str = SKIP_HINT) -> None:
    """Refuse ``tensors`` unless each is the one whose SHA-256 was ``recorded`` (and none is missing or added)."""
    if not isinstance(recorded, dict):
        raise IntegrityError(f"{where}: its recorded SHA-256s are not a table; pass {skip_hint} to load it anyway")
    if set(recorded) != set(tensors):
        odd = sorted(set(recorded) ^ set(tensors))
        raise IntegrityError(f"{where}: holds other tensors than were written ({odd[:3]}); pass {skip_hint} to "
                             "load it anyway")
    for name, tensor in sorted(tensors.items()):
        if tensor_sha256(tensor) != recorded[name]:
            raise IntegrityError(f"{where}: {name} changed since relprune wrote it (its SHA-256 differs from the "
                                 f"one recorded); pass {skip_hint} to load it anyway")


@contextmanager
def staged_folder(target: str | Path, *, replace: bool = False, manifest: bool = True) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into; it becomes ``target`` when the block ends.

    ``target`` must be absent or empty, or (``replace=True``) an earlier output, which is swapped out
    by renames and deleted only once the new folder is in place. When the block raises (Ctrl-C
    included) the staged folder is removed and ``target`` is as it was. ``manifest`` records every
    file's SHA-256 (:func:`write_manifest`) before the rename.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = None
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        follow_umask(tmp)
        if target.exists() and replace and (not target.is_dir() or any(target.iterdir())):
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / "previous")
        elif target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / "previous", target)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
