"""What every benchmark script shares: the machine and library versions stamped on each result line, appending
result lines, and reading back the keys already done (so a rerun resumes). Scripts run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: ``from harness import ...``."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def run_meta(packages: Iterable[str] = ("torch", "transformers", "relprune")) -> dict[str, Any]:
    """Date, machine, core count, and the versions of ``packages`` (None when absent)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cores": os.cpu_count(),
            "versions": versions}


def append_result(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line (flushed, so an interrupted run keeps every finished row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def done_keys(path: str | Path, key: str | tuple[str, ...] = "key") -> set:
    """The ``key`` of every row already in ``path`` (an absent file holds none); a tuple of field names gives
    tuples of their values, from the rows that have them all."""
    path = Path(path)
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if isinstance(key, str):
        return {r[key] for r in rows if key in r}
    return {tuple(r[k] for k in key) for r in rows if all(k in r for k in key)}
