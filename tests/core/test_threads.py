"""Eigendecompositions run on a bounded thread count (ADMM runs none), and torch's setting comes back whatever
happens."""

from __future__ import annotations

import pytest
import torch

from relprune.core import admm
from relprune.core.threads import bounded_threads


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


def test_admm_runs_no_eigendecomposition_and_leaves_the_thread_count(monkeypatch):
    # The symmetric eigensolver is the call whose time exploded beside busy processes; ADMM's ridge steps use
    # Cholesky factors instead (test_admm checks they give the same bits on one thread and two).
    calls = []
    for name in ("eigh", "eigvalsh", "eig"):
        monkeypatch.setattr(torch.linalg, name, lambda *a, name=name, **k: calls.append(name))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=g)
        for budget in ({"sparsity": 0.5}, {"n_m": (2, 4)}):
            admm.admm_prune(torch.randn(8, 16, generator=g), x.T @ x, **budget)
        assert calls == [] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _Feed:
    """A fake /proc/stat and clock: each read advances one second, the others' and our CPU seconds as scripted."""

    def __init__(self, others_per_second: list[float], own_per_second: float = 2.0):
        self.t, self.busy, self.own = 0.0, 0.0, 0.0
        self.script = iter(others_per_second)
        self.own_rate = own_per_second

    def clock(self) -> float:
        return self.t

    def read(self) -> tuple[float, float]:
        return self.busy, self.own

    def tick(self) -> None:
        other = next(self.script)
        self.t += 1.0
        self.own += self.own_rate
        self.busy += self.own_rate + other


def test_shared_cores_fits_the_thread_count_to_what_others_leave_and_restores_it():
    from relprune.core.threads import SharedCores

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feed = _Feed([0.0, 1.0, 2.0, 0.4, 0.6])
        cores = SharedCores(read=feed.read, clock=feed.clock)
        cores.cores = 2
        seen = []
        for _ in range(5):
            feed.tick()
            seen.append(cores.fit())
            assert torch.get_num_threads() == seen[-1]
        # idle: both cores; one busy: one; two busy: still one (never none); 0.4 of a core: both; 0.6: one
        assert seen == [2, 1, 1, 2, 1]
        cores.restore()
        assert torch.get_num_threads() == 2
        # never above the count torch had when it was made (a user who set one thread keeps one)
        torch.set_num_threads(1)
        feed = _Feed([0.0])
        cores = SharedCores(read=feed.read, clock=feed.clock)
        cores.cores = 2
        feed.tick()
        assert cores.fit() == 1
    finally:
        torch.set_num_threads(before)


def test_shared_cores_changes_nothing_where_cpu_time_cannot_be_read():
    from relprune.core.threads import SharedCores

    before = torch.get_num_threads()
    cores = SharedCores(read=lambda: None)
    assert cores.others() is None and cores.fit() == before == torch.get_num_threads()


def test_the_block_walk_fits_threads_per_block_and_puts_them_back(monkeypatch):
    pytest.importorskip("transformers")
    from relprune.llm import blocks as llm_blocks

    fits = []

    class Recording:
        def __init__(self):
            self.restored = False

        def fit(self):
            fits.append("fit")
            return 1

        def restore(self):
            fits.append("restore")

    monkeypatch.setattr(llm_blocks, "SharedCores", Recording)
    model = torch.nn.Sequential()
    blocks = [torch.nn.Identity(), torch.nn.Identity()]
    captured = llm_blocks.BlockInputs([[llm_blocks.Batch((torch.zeros(1, 2),), {})]] * 2, [torch.zeros(1, 2)])
    steps = list(llm_blocks.walk_blocks(model, [("0", blocks[0]), ("1", blocks[1])], (), captured=captured))
    assert len(steps) == 2 and fits == ["fit", "fit", "restore"]
