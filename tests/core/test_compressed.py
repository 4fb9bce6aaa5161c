"""The sparse weight layouts: exact round trips, the byte counts, and refusals of files whose parts disagree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relprune.core.compressed import (
    BITMASK,
    BITMASK_24,
    compress,
    compress_state,
    compressed_nbytes,
    decompress,
    decompress_state,
    pays_off,
)
from relprune.errors import CheckpointError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_bitmask(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' ``bitmask_compress`` (0.14), line for line, on the 2-D view."""
    bytemasks = tensor != 0
    row_counts = bytemasks.sum(dim=-1)
    row_offsets = torch.cumsum(row_counts, 0) - row_counts
    values = tensor[bytemasks]
    bitmasks_packed = torch.from_numpy(np.packbits(bytemasks.numpy(), axis=-1, bitorder="little"))
    return {"compressed": values, "bitmask": bitmasks_packed, "row_offsets": row_offsets}


def pruned(shape, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return w * (torch.rand(shape, generator=g) < density)


def two_of_four(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    groups = w.float().abs().reshape(shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
    return w * keep.reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (16, 64), (4, 3, 3, 3), (1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_bitmask_round_trips_exactly_and_matches_compressed_tensors(dtype, shape, density):
    w = pruned(shape, density, dtype)
    parts = compress(w, BITMASK)
    ref = reference_bitmask(w.reshape(shape[0], -1))
    for key in ref:
        assert torch.equal(parts[key], ref[key]), key
    assert parts["shape"].tolist() == list(shape)
    back = decompress(parts, BITMASK)
    assert back.dtype == dtype and torch.equal(back, w)
    assert compressed_nbytes(w, BITMASK) == sum(t.numel() * t.element_size() for t in parts.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 16), (3, 4), (5, 2, 2, 2)])
def test_two_of_four_round_trips_with_two_bits_in_every_group(dtype, shape):
    w = two_of_four(shape, dtype)
    w[0, ...] = 0  # a row with every weight zero still keeps two entries a group
    parts = compress(w, BITMASK_24)
    rows = shape[0]
    cols = w[0].numel()
    assert tuple(parts["compressed"].shape) == (rows, cols // 2)
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=cols, bitorder="little")
    assert (bits.reshape(rows, -1, 4).sum(-1) == 2).all()
    assert torch.equal(decompress(parts, BITMASK_24), w)
    assert compressed_nbytes(w, BITMASK_24) == sum(t.numel() * t.element_size() for t in parts.values())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), density=st.floats(0, 1), seed=st.integers(0, 100))
def test_any_pattern_round_trips(rows, cols, density, seed):
    w = pruned((rows, cols), density, torch.float32, seed)
    assert torch.equal(decompress(compress(w), BITMASK), w)


def test_bytes_follow_the_density():
    w = pruned((512, 512), 0.5, torch.float32)
    assert compressed_nbytes(w) / (w.numel() * 4) == pytest.approx(0.5 + 1 / 32, abs=0.01)
    assert not pays_off(pruned((64, 64), 1.0, torch.float32))
    assert pays_off(w) and not pays_off(torch.zeros(8))
    half = pruned((512, 512), 0.5, torch.bfloat16)
    assert compressed_nbytes(two_of_four((512, 512), torch.bfloat16), BITMASK_24) / (half.numel() * 2) <= 0.57


def test_a_weight_that_is_not_two_of_four_is_refused():
    with pytest.raises(CheckpointError, match="more than two non-zero"):
        compress(torch.ones(2, 8), BITMASK_24, "x.weight")
    with pytest.raises(CheckpointError, match="multiple of 4"):
        compress(torch.zeros(2, 6), BITMASK_24, "x.weight")


def test_parts_that_disagree_are_refused_by_name():
    w = pruned((6, 20), 0.5, torch.float32)
    good = compress(w)

    def broken(**change):
        return decompress({**good, **change}, BITMASK, "layer.weight")

    with pytest.raises(CheckpointError, match=r"layer\.weight.*marks \d+ values but"):
        broken(compressed=good["compressed"][:-1])
    with pytest.raises(CheckpointError, match="bitmask is"):
        broken(bitmask=good["bitmask"][:, :1])
    with pytest.raises(CheckpointError, match="row offsets"):
        broken(row_offsets=good["row_offsets"] + 1)
    with pytest.raises(CheckpointError, match="lacks"):
        decompress({k: v for k, v in good.items() if k != "bitmask"}, BITMASK, "layer.weight")
    with pytest.raises(CheckpointError, match="empty dimension"):
        broken(shape=torch.tensor([6, 0]))
    w24 = two_of_four((4, 8), torch.float32)
    parts = compress(w24, BITMASK_24)
    three = parts["bitmask"].clone()
    three[0, 0] = 0b00010111  # three bits in the first group, one in the second: the count still fits
    with pytest.raises(CheckpointError, match="exactly two of each group"):
        decompress({**parts, "bitmask": three}, BITMASK_24, "w")


def test_state_level_round_trip_reads_one_weight_at_a_time():
    state = {"a.weight": pruned((8, 8), 0.4, torch.float32), "a.bias": torch.randn(8),
             "b.weight": pruned((4, 16), 0.5, torch.float16)}
    stored = compress_state(state, ["a.weight", "b.weight"])
    assert "a.weight" not in stored and "a.bitmask" in stored and torch.equal(stored["a.bias"], state["a.bias"])
    back = dict(decompress_state(stored, stored.__getitem__))
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    with pytest.raises(CheckpointError, match="not in the state dict"):
        compress_state(state, ["nope.weight"])
    with pytest.raises(CheckpointError, match="named like compressed parts"):
        compress_state({**state, "a.bitmask": torch.zeros(1)}, ["a.weight"])
