"""Issue 30's language-model cases: each refused by name before anything changes, or done right."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from test_llm_hostile import _listing, _run  # noqa: E402
from tiny import ids_batches, tiny_llama  # noqa: E402

import relprune  # noqa: E402
from relprune.llm import load_model, prune_sequential, prune_streamed  # noqa: E402


@pytest.mark.parametrize("ratio", ["0", "0.0", "-0.1", "nan"])
def test_llm_shrink_ratio_that_removes_nothing_is_refused(folder, tmp_path, capsys, ratio):
    before = _listing(tmp_path)
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", ratio, "--calibration", tmp_path / "calib.txt",
                      "--calibration-samples", "2", "--seqlen", "16", "--out", tmp_path / "o"], capsys)
    assert code in (1, 2) and len(err.splitlines()) == 1 and ("ratio" in err), err
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("ratio", [0, 0.0, 1, "0.3", True, float("nan")])
def test_plan_units_refuses_a_ratio_that_is_not_a_share(ratio):
    from relprune.llm.structured import plan_units, unit_scores

    model = tiny_llama()
    scores = unit_scores(model, ids_batches(), "fluctuation")
    with pytest.raises(relprune.RelpruneError, match="ratio"):
        plan_units(model, scores, ratio)


@pytest.mark.parametrize("where", ["model.embed_tokens.weight", "model.norm.weight",
                                   "model.layers.1.input_layernorm.weight"])
def test_nan_outside_the_pruned_weights_is_refused_before_any_change(where, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.get_parameter(where)[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(relprune.RelpruneError, match=f"NaN or Inf in.*{where.split('.')[-2]}"):
        prune_sequential(model, ids_batches(), sparsity=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k], ) or torch.isnan(before[k]).any() for k in before)
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(relprune.RelpruneError, match="NaN or Inf"):
        prune_streamed(tmp_path / "nan", tmp_path / "out", ids_batches(), sparsity=0.5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[2, 3, 500]]), "outside the model's vocabulary"),
    (torch.tensor([[-1, 3, 4]]), "outside the model's vocabulary"),
    (torch.tensor([[2.0, 3.0]]), "whole-number token ids"),
    (torch.tensor([2, 3, 4]), "2-D"),
    ([[2, 3, 4]], "2-D tensor"),
])
def test_bad_token_ids_are_a_calibration_error(ids, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(relprune.CalibrationError, match=message):
        prune_sequential(model, [{"input_ids": ids}], sparsity=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_mask_shaped_unlike_the_ids_is_refused():
    with pytest.raises(relprune.CalibrationError, match="attention_mask"):
        prune_sequential(tiny_llama(), [{"input_ids": torch.tensor([[2, 3, 4]]),
                                         "attention_mask": torch.ones(1, 2)}], sparsity=0.5)


def test_a_per_layer_shrunk_folder_loads_everywhere_relprune_reads_models(folder, tmp_path, capsys):
    from relprune.llm.structured import load_shrunk, plan_units, save_shrunk, shrink_refit, unit_scores

    model, tokenizer = load_model(folder)
    batches = ids_batches()
    scores = unit_scores(model, batches, "fluctuation")
    # Uneven scores per layer, so the global plan gives the layers different sizes.
    scores = {k: v * (10.0 if k[0] == 0 else 1.0) for k, v in scores.items()}
    keep = plan_units(model, scores, 0.4, scope="global", round_to=1)  # tiny MLPs: no rounding
    shrink_refit(model, batches, keep)
    assert not save_shrunk(model, tokenizer, tmp_path / "small")  # per-layer sizes: not plain transformers
    loaded, _ = load_model(tmp_path / "small")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.testing.assert_close(load_shrunk(tmp_path / "small")(input_ids=ids).logits, model(input_ids=ids).logits)
    code, err = _run(["llm", "eval", "--model", tmp_path / "small", "--text", tmp_path / "eval.txt",
                      "--seqlen", "16", "--samples", "2"], capsys)
    assert code == 0, err
    # Shrinking the shrunk folder again goes on from its per-layer sizes.
    code, err = _run(["llm", "shrink", "--model", tmp_path / "small", "--ratio", "0.2", "--calibration",
                      tmp_path / "calib.txt", "--calibration-samples", "2", "--seqlen", "16", "--out",
                      tmp_path / "smaller"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "smaller" / "relprune.json").read_text())
    assert record["parameters"] < record["dense_parameters"] == sum(p.numel() for p in loaded.parameters())


def test_llm_errors_name_the_subcommand(folder, tmp_path, capsys):
    code, err = _run(["llm", "eval", "--model", folder, "--text", tmp_path / "missing.txt"], capsys)
    assert code == 1 and err.startswith("relprune llm eval: error:"), err


def test_llm_shrink_and_eval_say_what_they_do_in_a_log(folder, tmp_path, capsys):
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.3", "--calibration", tmp_path / "calib.txt",
                      "--calibration-samples", "2", "--seqlen", "16", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    assert "\r" not in err and "scoring heads and MLP channels" in err and "blocks: 2/2 done" in err
    assert "re-fitting o_proj and down_proj" in err
    code, err = _run(["llm", "eval", "--model", tmp_path / "s", "--text", tmp_path / "eval.txt", "--seqlen", "16",
                      "--samples", "2"], capsys)
    assert code == 0 and "evaluating 2 windows" in err and "perplexity: 2/2 batches" in err, err


def test_gguf_conversion_progress_is_lines_in_a_log(capsys):
    import importlib

    from relprune.llm.load import _gguf_progress_as_lines

    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    own = module.tqdm
    with _gguf_progress_as_lines(transformers):
        assert module.tqdm is not own
        assert list(module.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert module.tqdm is own
    err = capsys.readouterr().err
    assert "\r" not in err and "converting GGUF tensors: 3/3 tensors" in err
