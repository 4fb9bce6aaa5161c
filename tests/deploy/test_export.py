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


def test_sparse_exports_in_the_layout_before_compressed_tensors_still_load(tmp_path):
    """Files written by the earlier sparse export (one flat bitmask and the values per weight) load unchanged."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from relprune.deploy.export import architecture

    torch.manual_seed(0)
    model = build_model("lenet300", (1, 28, 28), 10)
    x = torch.randn(4, 1, 28, 28)
    relprune.prune(model, relprune.collect_stats(model, [x], statistics=["relative_mean"]), sparsity=0.8,
                   criterion="rc")
    plain = relprune.make_permanent(model).eval()
    tensors, shapes = {}, {}
    for key, value in plain.state_dict().items():
        if key.endswith(".weight") and value.dim() == 2:
            nz = value != 0
            tensors[f"{key}.bitmask"] = torch.from_numpy(np.packbits(nz.flatten().numpy()))
            tensors[f"{key}.values"] = value[nz]
            shapes[key] = list(value.shape)
        else:
            tensors[key] = value
    meta = {"format": "sparse", "architecture": architecture(plain), "sparse_shapes": shapes}
    save_file(tensors, str(tmp_path / "sparse.safetensors"), metadata={"relprune": json.dumps(meta)})
    back, _ = load_exported(tmp_path)
    assert torch.equal(back(x), plain(x))
