"""The benchmarks' shared harness: result lines appended whole, keys read back for resuming."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import append_result, done_keys, run_meta


def test_rows_append_and_their_keys_come_back_single_and_as_tuples(tmp_path):
    out = tmp_path / "deep" / "results.jsonl"
    assert done_keys(out) == set() and done_keys(out, ("a", "b")) == set()
    append_result(out, {"key": "x", "a": 1, "b": "q"})
    append_result(out, {"key": "y", "a": 2})
    append_result(out, {"a": 1, "b": "r", **run_meta(("pytest", "no-such-package"))})
    assert done_keys(out) == {"x", "y"}
    assert done_keys(out, ("a", "b")) == {(1, "q"), (1, "r")}
    meta = run_meta(("pytest", "no-such-package"))
    assert meta["versions"]["no-such-package"] is None and meta["versions"]["pytest"]
    assert len(out.read_text().splitlines()) == 3
