"""The trained digits model the command tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from relprune.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A lenet300 trained one epoch on the built-in digits, that model pruned to 70%, and its export."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(root / "model")]) == 0
    # Without the re-fit, which may zero kept weights on inputs the calibration never lights up.
    assert main(["prune", "--checkpoint", str(root / "model"), "--sparsity", "0.7", "--calib-samples", "256",
                 "--reconstruct", "none", "--out", str(root / "pruned")]) == 0
    assert main(["export", "--checkpoint", str(root / "pruned"), "--out", str(root / "export")]) == 0
    return root
