"""``relprune train`` under torchrun: two gloo ranks on CPU, one model written, one result line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.distributed as dist

from relprune.experiments.experiment import load_model


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_train_under_torchrun_writes_once_and_prints_once(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "relprune", "train", "--model", "lenet300", "--dataset", "digits", "--epochs", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("test accuracy") == 1
    assert done.stderr.count("train epoch 2/2") == 1  # rank 0 logs, rank 1 does not
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    _, info = load_model(out)
    assert info.metrics["test_acc"] > 0.5
