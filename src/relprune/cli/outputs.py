"""What every command shares about its outputs: progress lines, output folders checked before any work,
refusals to replace an earlier run's files, and removal of the folders a failed command created."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import RelpruneError


def say(text: str) -> None:
    """Progress lines on stderr, so stdout keeps only results."""
    print(text, file=sys.stderr, flush=True)


def writable_folder(path: str | Path) -> Path:
    """``path`` as an output folder that exists and can be written, checked before any work."""
    import tempfile

    from ..errors import RelpruneError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RelpruneError(f"--out {path} is a file, not a folder")
    try:
        make_folder(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise RelpruneError(f"--out {path} cannot be written: {err.strerror or err}") from err
    return path


#: Folders this process created for its outputs; main removes those still without a file when a
#: command fails or is interrupted, so a failed command leaves nothing behind.
CREATED: list[Path] = []


def make_folder(path: Path) -> None:
    """``mkdir -p path``, remembering the top-most folder it had to create."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if missing:
        CREATED.append(missing[-1])


def remove_created() -> None:
    import shutil

    for folder in reversed(CREATED):
        if folder.is_dir() and not any(f.is_file() or f.is_symlink() for f in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
    CREATED.clear()


def refuse_replacing(out: Path, names: tuple[str, ...], overwrite: bool, what: str) -> None:
    """Refuse (before any work) to write over ``names`` in ``out`` that an earlier run left, unless told to."""
    present = [n for n in names if (out / n).exists()]
    if present and not overwrite:
        raise RelpruneError(f"--out {out} already holds {what} ({present[0]}); choose another --out, or pass "
                            "--overwrite to replace it")

