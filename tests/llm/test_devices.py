"""Devices and dtypes: a model pruned in bfloat16 or float16 matches its float32 pruning; bad devices refused."""

from __future__ import annotations

import pytest
import torch
from tiny import WORDS, tiny_llama

import relprune
from relprune.cli import main
from relprune.llm import load_causal_lm, prune_sequential
from relprune.llm.load import resolve_device, resolve_dtype


def ids_batches(n=2, seqlen=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(2, len(WORDS) + 2, (2, seqlen), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", [dict(criterion="obs", reconstruct="exact"), dict(criterion="sparsegpt"),
                                    dict(criterion="wanda", reconstruct=False)])
def test_half_precision_models_prune_like_float32_ones(dtype, recipe):
    """Statistics accumulate in float32 or wider whatever the model's dtype, so the masks agree with the
    float32 pruning of the same (rounded) weights almost everywhere and the weights stay in their dtype."""
    reference = tiny_llama()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(dtype).float())  # the same weights in both runs
    half = tiny_llama().to(dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in reference.state_dict().items()})
    want = prune_sequential(reference, ids_batches(), sparsity=0.5, **recipe)
    got = prune_sequential(half, ids_batches(), sparsity=0.5, **recipe)
    assert all(p.dtype == dtype for p in half.parameters())
    agree = sum(int((want[n] == got[n]).sum()) for n in want) / sum(m.numel() for m in want.values())
    assert agree > 0.97
    assert got.sparsity == pytest.approx(0.5, abs=0.01)


def test_devices_and_dtypes_are_resolved_or_refused():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(relprune.ModelLoadError, match="unknown device"):
        resolve_device("gpu7")
    with pytest.raises(relprune.ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(relprune.ModelLoadError, match="not available here"):
            resolve_device("cuda")


def test_the_command_prunes_in_bfloat16_and_refuses_an_absent_device(folder, tmp_path, capsys):
    common = ["llm", "prune", "--model", str(folder), "--sparsity", "0.5", "--calibration",
              str(tmp_path / "calib.txt"), "--calibration-samples", "4", "--seqlen", "16"]
    assert main([*common, "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "bf16")]) == 0
    model = load_causal_lm(tmp_path / "bf16")
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == pytest.approx(0.5)
    assert main(["llm", "eval", "--model", str(tmp_path / "bf16"), "--text", str(tmp_path / "eval.txt"),
                 "--seqlen", "16", "--samples", "2", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main([*common, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 1
        err = capsys.readouterr().err
        assert "not available here" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "gpu").exists()
    assert main([*common, "--streamed", "--dtype", "float16", "--out", str(tmp_path / "s")]) == 1
    assert "--streamed runs on the CPU in float32" in capsys.readouterr().err
