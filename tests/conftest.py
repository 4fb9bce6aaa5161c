from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    root = Path(os.environ.get("RELPRUNE_TEST_DATA", SHARED_DATA))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"shared benchmark data not found at {root}")
    return root
