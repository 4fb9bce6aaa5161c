"""Every recipe refusal says the same thing through the API, `relprune prune` and `relprune llm prune`:
they all go through the recipe's one validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_run import run
from torch import nn

import relprune
from relprune.cli import main

# message, API call (model -> None), vision command flags (or None), language-model command flags (or None)
CASES = [
    ("correct it twice",
     lambda m: relprune.prune(m, None, sparsity=0.5, criterion="magnitude", reconstruct=True, bias_compensation=True),
     ["--sparsity", "0.5", "--reconstruct", "exact", "--bias-compensation"],
     ["--sparsity", "0.5", "--bias-compensation"]),
    ("scope does not apply",
     lambda m: relprune.prune(m, None, sparsity=0.5, criterion="sparsegpt", scope="row"),
     ["--sparsity", "0.5", "--criterion", "sparsegpt", "--scope", "row"],
     ["--sparsity", "0.5", "--criterion", "sparsegpt", "--scope", "layer"]),
    ("not on that scale",
     lambda m: relprune.prune(m, None, threshold=0.5, criterion="magnitude"),
     ["--threshold", "0.5", "--criterion", "magnitude"], None),
    ("one budget",
     lambda m: relprune.prune(m, None, sparsity=0.5, n_m="2:4", criterion="magnitude"),
     ["--sparsity", "0.5", "--n-m", "2:4"], None),
    ("give a sparsity, not an N:M pattern",
     lambda m: relprune.llm.prune_sequential(m, [], n_m="2:4", allocation="owl"),
     None, ["--n-m", "2:4", "--allocation", "owl"]),
]


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agree") / "model"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("message, api, vision, llm", CASES, ids=[c[0] for c in CASES])
def test_refusals_agree_across_the_api_and_both_commands(vision_model, tmp_path, capsys, message, api, vision,
                                                         llm, request):
    if api is not None:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(relprune.RelpruneError) as err:
            api(model)
        assert message in str(err.value)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if vision is not None:
        code, err = run(["prune", "--checkpoint", vision_model, *vision, "--out", tmp_path / "v"], capsys)
        assert code == 1 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "v").exists()
    if llm is not None:
        pytest.importorskip("transformers", reason="the llm extra is not installed")
        folder = request.getfixturevalue("llm_folder")
        capsys.readouterr()  # what writing the fixture printed
        code, err = run(["llm", "prune", "--model", folder, *llm, "--calibration", folder.parent / "calib.txt",
                          "--out", tmp_path / "l"], capsys)
        assert code == 1 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "l").exists()


@pytest.fixture
def llm_folder(tmp_path) -> Path:
    transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    out = tmp_path / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    (tmp_path / "calib.txt").write_text("the king " * 200)
    return out
