"""``relprune llm prune`` (llm.oneshot): the folder it writes, bias switches, bad input."""


from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import tiny_llama, tiny_tokenizer  # noqa: E402

import relprune  # noqa: E402
from relprune.cli import main  # noqa: E402
from relprune.llm import (  # noqa: E402
    calibration_windows,
    prune_sequential,
)
from relprune.llm.text import batches_of  # noqa: E402


def test_llm_prune_writes_a_compressed_folder_that_loads_with_the_same_weights(folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["llm", "prune", "--model", str(folder), "--criterion", "wanda", "--reconstruct", "none",
                 "--sparsity", "0.5", "--calibration", str(tmp_path / "calib.txt"), "--calibration-samples", "4",
                 "--seqlen", "16", "--out", str(out)]) == 0
    assert "50.00% of the decoder weights removed" in capsys.readouterr().out
    reloaded = relprune.llm.load_causal_lm(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the king and the queen speak", return_tensors="pt")["input_ids"]
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean() == pytest.approx(0.5)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    original = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    record = json.loads((out / "relprune.json").read_text())
    assert record["criterion"] == "wanda" and record["achieved_sparsity"] == pytest.approx(0.5)
    # The pruned model's logits are the same when computed again from the saved folder.
    pruned_logits = reloaded(input_ids=ids).logits
    again = relprune.llm.load_causal_lm(out)(input_ids=ids).logits
    assert torch.equal(pruned_logits, again)
    assert main(["llm", "eval", "--model", str(out), "--text", str(tmp_path / "eval.txt"), "--seqlen", "16",
                 "--samples", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_llm_prune_saves_exactly_what_was_pruned_in_memory(folder, tmp_path):
    """The logits of the saved folder equal those of the same pruning done in Python."""
    model, tokenizer = relprune.llm.load_model(folder)
    ids = relprune.llm.tokenize_file(tokenizer, tmp_path / "calib.txt")
    windows = calibration_windows(ids, 4, 16, seed=0)
    prune_sequential(model, batches_of(windows, 8), sparsity=0.5)  # the default recipe, as the command's
    out = tmp_path / "cli"
    assert main(["llm", "prune", "--model", str(folder), "--sparsity", "0.5",
                 "--calibration", str(tmp_path / "calib.txt"), "--calibration-samples", "4", "--seqlen", "16",
                 "--out", str(out)]) == 0
    saved = relprune.llm.load_causal_lm(out)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=windows).logits, model(input_ids=windows).logits)


def test_bias_compensation_saves_a_folder_transformers_loads_with_the_same_logits(folder, tmp_path):
    model, tokenizer = relprune.llm.load_model(folder)
    windows = calibration_windows(relprune.llm.tokenize_file(tokenizer, tmp_path / "calib.txt"), 4, 16, seed=0)
    prune_sequential(model, batches_of(windows, 8), sparsity=0.5, criterion="contrib-std", reconstruct=False,
                     bias_compensation=True)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0
    from relprune.llm.save import save_pretrained

    switches = save_pretrained(model, tokenizer, tmp_path / "saved")
    assert switches == ["attention_bias", "mlp_bias"]
    saved = relprune.llm.load_causal_lm(tmp_path / "saved")
    assert saved.config.attention_bias and saved.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=windows).logits, model(input_ids=windows).logits)
    # Without compensation nothing is switched on.
    plain, _ = relprune.llm.load_model(folder)
    assert save_pretrained(plain, tokenizer, tmp_path / "plain") == []
    assert not transformers.AutoConfig.from_pretrained(tmp_path / "plain").attention_bias


def test_a_bias_no_config_switch_covers_is_refused_before_saving(tmp_path):
    model = tiny_llama()
    model.model.norm.register_parameter("weight", model.model.norm.weight)
    model.lm_head.bias = nn.Parameter(torch.zeros(model.lm_head.out_features))
    from relprune.llm.save import save_pretrained

    with pytest.raises(relprune.RelpruneError, match="lm_head"):
        save_pretrained(model, tiny_tokenizer(), tmp_path / "x")
    assert not (tmp_path / "x").exists() and not model.config.attention_bias


BAD = [
    (["llm", "prune", "--model", "no/such/thing/here", "--sparsity", "0.5", "--calibration", "{calib}",
      "--out", "{out}"], 1, "unknown model"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "1.5", "--calibration", "{calib}", "--out", "{out}"],
     2, r"\[0, 1\)"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--n-m", "2:4", "--calibration", "{calib}",
      "--out", "{out}"], 2, "not allowed with"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--calibration", "{calib}", "--seqlen", "100",
      "--out", "{out}"], 1, "beyond the model's 64 positions"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--calibration", "{short}", "--seqlen", "32",
      "--out", "{out}"], 1, "fewer than one window"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--calibration", "{calib}", "--out", "{folder}"],
     1, "already exists"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--calibration", "{missing}",
      "--out", "{out}"], 1, "does not exist"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--criterion", "nope", "--calibration", "{calib}",
      "--out", "{out}"], 2, "unknown criterion"),
    (["llm", "prune", "--model", "{folder}", "--n-m", "2:4", "--allocation", "owl", "--calibration", "{calib}",
      "--out", "{out}"], 1, "give a sparsity, not an N:M pattern"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--bias-compensation", "--reconstruct", "exact",
      "--calibration", "{calib}", "--out", "{out}"], 1, "correct it twice"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--allocation", "owl", "--owl-lambda", "0.7",
      "--calibration", "{calib}", "--out", "{out}"], 2, "owl-lambda"),
    (["llm", "prune", "--model", "{folder}", "--sparsity", "0.5", "--streamed", "--seqlen", "100",
      "--calibration", "{calib}", "--out", "{out}"], 1, "beyond the model's 64 positions"),
    (["llm", "eval", "--model", "{calib}", "--text", "{calib}"], 1, "neither a model folder nor a .gguf"),
    (["llm", "eval", "--model", "{folder}", "--text", "{calib}", "--samples", "0"], 2, "positive"),
    (["llm", "eval", "--model", "{folder}", "--text", "{calib}", "--seqlen", "16", "--samples", "100000"], 1,
     "fewer than 100000"),
]


@pytest.mark.parametrize("argv, code, message", BAD, ids=[" ".join(b[0][1:6]) for b in BAD])
def test_llm_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys, argv, code, message):
    import re

    (tmp_path / "short.txt").write_text("the king")
    values = {"folder": folder, "calib": tmp_path / "calib.txt", "short": tmp_path / "short.txt",
              "out": tmp_path / "out", "missing": tmp_path / "missing.txt"}
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        got = main([a.format(**values) for a in argv])
    except SystemExit as exit_:
        got = exit_.code
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
