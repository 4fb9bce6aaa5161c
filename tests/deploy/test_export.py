"""Export and load round-trips are bit-exact for every form."""

from __future__ import annotations

import pytest
import torch

import relprune
from relprune.deploy.export import (
    export_dense,
    export_masked,
    export_sparse,
    file_size,
    load_exported,
)
from relprune.deploy.shrink import shrink
from relprune.errors import CheckpointError
from relprune.experiments.models import build_model


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg-small"])
def test_round_trips_are_bit_exact(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10)
    x = torch.randn(8, 1, 28, 28)
    stats = relprune.collect_stats(model, [x], statistics=["relative_mean"])
    relprune.prune(model, stats, sparsity=0.9, criterion="rc")
    model.eval()
    expected = model(x)
    small, _ = shrink(model, x)
    for writer, subject in ((export_dense, small), (export_masked, model), (export_sparse, model)):
        path = writer(subject, tmp_path / writer.__name__, {"model": name})
        back, meta = load_exported(path.parent)
        assert meta["model"] == name
        assert torch.equal(back(x), subject.eval()(x))
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)
    masked_back, _ = load_exported(tmp_path / "export_masked")
    assert relprune.current_masks(masked_back).sparsity == pytest.approx(0.9, abs=1e-3)
    assert file_size(tmp_path / "export_sparse" / "sparse.safetensors") < \
        file_size(tmp_path / "export_masked" / "masked.safetensors") / 4


def test_bad_files(tmp_path):
    (tmp_path / "dense.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_exported(tmp_path)
    with pytest.raises(CheckpointError, match="No such file"):
        load_exported(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected exactly one"):
        load_exported(tmp_path / "empty")
