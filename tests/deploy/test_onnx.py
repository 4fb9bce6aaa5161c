"""ONNX export: a shrunk residual net runs in ONNX Runtime with PyTorch's outputs, at any batch size."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn

from relprune.deploy.export import export_onnx
from relprune.deploy.groups import prune_groups
from relprune.errors import CheckpointError
from relprune.experiments.models import resnet20

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_a_shrunk_residual_net_gives_pytorchs_outputs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    dense = resnet20((1, 16, 16), 10).eval()
    example = torch.randn(1, 1, 16, 16)
    small = prune_groups(dense, example, 0.5, criterion="l2").model.eval()
    assert sum(p.numel() for p in small.parameters()) < 0.75 * sum(p.numel() for p in dense.parameters())
    path = export_onnx(small, example, tmp_path / "small")
    for batch in (1, 3, 16):  # the batch dimension stays free although the example had one sample
        x = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(run(path, x), small(x), rtol=1e-4, atol=1e-5)


def test_masks_are_folded_in_and_a_masked_model_is_unchanged(tmp_path):
    import relprune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    relprune.prune(model, relprune.collect_stats(model, [x]), sparsity=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(run(path, x), model(x), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_operation_onnx_lacks_is_named(tmp_path):
    class Svd(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x).S

    with pytest.raises(CheckpointError, match=r"Svd.*aten[.:]+_?linalg_svd"):
        export_onnx(Svd(), torch.randn(2, 3, 3), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_the_missing_extra_is_named(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(CheckpointError, match=r"relprune\[onnx\]"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path)
    assert not any(tmp_path.iterdir())
