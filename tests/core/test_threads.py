"""Eigendecompositions run on a bounded thread count, and torch's setting comes back whatever happens."""

from __future__ import annotations

import pytest
import torch

from relprune.core import admm
from relprune.core.threads import EIGH_THREADS, bounded_threads


def test_the_thread_count_is_capped_inside_and_restored_after_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with bounded_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), bounded_threads(1):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with bounded_threads(4):  # a cap above the current count changes nothing
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_admm_runs_its_eigendecomposition_on_the_bounded_count(monkeypatch):
    seen = []
    real = torch.linalg.eigh

    def recording(a):
        seen.append(torch.get_num_threads())
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=g)
        admm.admm_prune(torch.randn(8, 16, generator=g), x.T @ x, sparsity=0.5)
        assert seen == [EIGH_THREADS] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
