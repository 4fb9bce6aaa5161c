"""Pruned language models saved compressed: the same weights and logits back, smaller files, bad files refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import WORDS, tiny_llama, tiny_tokenizer

import relprune
from relprune.cli import main
from relprune.llm import load_causal_lm, prune_sequential, prune_streamed, save_pretrained
from relprune.llm.compressed import COMPRESSED_WEIGHTS, folder_layout


def ids_batches(n=2, seqlen=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(2, len(WORDS) + 2, (2, seqlen), generator=g)} for _ in range(n)]


def weight_bytes(folder):
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget", [{"sparsity": 0.5}, {"n_m": "2:4"}])
@pytest.mark.parametrize("tie", [True, False])
def test_compressed_save_gives_back_every_tensor(tmp_path, dtype, budget, tie):
    model = tiny_llama(tie=tie)
    masks = prune_sequential(model, ids_batches(), criterion="wanda", reconstruct=False, **budget)
    model.to(dtype)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, None, tmp_path / "c", n_m=(2, 4) if "n_m" in budget else None, save_format="compressed")
    save_pretrained(model, None, tmp_path / "d")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert folder_layout(config) == ("sparse-24-bitmask" if "n_m" in budget else "sparse-bitmask")
    assert folder_layout(json.loads((tmp_path / "d" / "config.json").read_text())) is None
    loaded = load_causal_lm(tmp_path / "c")  # float32, as every relprune load
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, want[name].float()), name
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tie
    for name in masks:
        assert name.removesuffix(".weight") in config["relprune_compression"]["targets"]
    assert weight_bytes(tmp_path / "c") < weight_bytes(tmp_path / "d")


def test_logits_are_the_in_memory_pruned_models(tmp_path):
    model = tiny_llama()
    prune_sequential(model, ids_batches(), sparsity=0.7)
    save_pretrained(model, None, tmp_path / "c", save_format="compressed")
    ids = ids_batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(load_causal_lm(tmp_path / "c")(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_pruned_tensors_shrink_as_the_targets_ask(tmp_path):
    """Bytes of the pruned weights over their dense bytes: <= 0.56 at 50%, 0.36 at 70%, 0.60 at 2:4 (rows of
    128 entries and more; a row's offset and bitmask bytes weigh more in shorter ones)."""
    import transformers

    for budget, limit in (({"sparsity": 0.5}, 0.56), ({"sparsity": 0.7}, 0.36), ({"n_m": "2:4"}, 0.60)):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(WORDS) + 2, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2)).eval()
        masks = prune_sequential(model, ids_batches(), criterion="wanda", reconstruct=False, **budget)
        out = tmp_path / str(budget)
        save_pretrained(model, None, out, n_m=(2, 4) if "n_m" in budget else None, save_format="compressed")
        stored = load_file(str(out / COMPRESSED_WEIGHTS))
        prefixes = [n.removesuffix(".weight") for n in masks]
        got = sum(t.numel() * t.element_size() for k, t in stored.items() if k.rpartition(".")[0] in prefixes)
        dense = sum(masks[n].numel() * 4 for n in masks)
        assert 0.3 * limit < got / dense <= limit, budget


def test_a_dense_or_shrunk_model_is_saved_plain(tmp_path):
    import transformers

    save_pretrained(tiny_llama(), None, tmp_path / "x", save_format="compressed")
    assert "quantization_config" not in json.loads((tmp_path / "x" / "config.json").read_text())
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x") is not None


def corrupt(folder, key, value):
    path = folder / COMPRESSED_WEIGHTS
    tensors = load_file(str(path))
    tensors[key] = value(tensors[key])
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_corrupt_compressed_folders_are_refused_by_name(tmp_path, folder):
    model, tokenizer = relprune.llm.load_model(folder)
    prune_sequential(model, ids_batches(), sparsity=0.5)
    save_pretrained(model, tokenizer, tmp_path / "good", save_format="compressed")
    name = "model.layers.0.mlp.up_proj"
    import shutil

    for label, key, change, message in (
            ("count", f"{name}.compressed", lambda t: t[:-1], "marks .* values but"),
            ("mask", f"{name}.bitmask", lambda t: t[:, :2].contiguous(), "its bitmask is"),
            ("offsets", f"{name}.row_offsets", lambda t: t + 1, "row offsets")):
        bad = tmp_path / label
        shutil.copytree(tmp_path / "good", bad)
        corrupt(bad, key, change)
        with pytest.raises(relprune.IntegrityError, match=f"{COMPRESSED_WEIGHTS} changed since"):
            relprune.llm.load_model(bad)  # the manifest sees it first; the decoder's own checks below
        with pytest.raises(relprune.ModelLoadError, match=f"{name}.weight.*{message}|{message}"):
            relprune.llm.load_model(bad, verify=False)
    # A format we do not read is named, not guessed at.
    odd = tmp_path / "odd"
    shutil.copytree(tmp_path / "good", odd)
    config = json.loads((odd / "config.json").read_text())
    config["relprune_compression"]["format"] = "marlin-24"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(relprune.ModelLoadError, match="marlin-24"):
        relprune.llm.load_model(odd, verify=False)


def test_two_of_four_indices_out_of_pattern_are_refused(tmp_path):
    model = tiny_llama()
    prune_sequential(model, ids_batches(), n_m="2:4", criterion="wanda", reconstruct=False)
    save_pretrained(model, tiny_tokenizer(), tmp_path / "c", n_m=(2, 4), save_format="compressed")

    def three_bits(t):
        t = t.clone()
        t[0, 0] = 0b00010111  # three in the first group of four, one in the second
        return t

    corrupt(tmp_path / "c", "model.layers.1.self_attn.q_proj.bitmask", three_bits)
    with pytest.raises(relprune.ModelLoadError, match=r"q_proj\.weight.*two of each group of four"):
        relprune.llm.load_model(tmp_path / "c", verify=False)


def test_the_command_writes_dense_by_default_and_compressed_on_request(folder, tmp_path, capsys):
    import transformers

    common = ["llm", "prune", "--model", str(folder), "--n-m", "2:4", "--calibration", str(tmp_path / "calib.txt"),
              "--calibration-samples", "4", "--seqlen", "16"]
    assert main([*common, "--save-format", "compressed", "--out", str(tmp_path / "c")]) == 0
    assert "(compressed, " in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "d")]) == 0
    assert "(dense, " in capsys.readouterr().out
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    ours = load_causal_lm(tmp_path / "c")
    for (name, x), (_, y) in zip(plain.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert json.loads((tmp_path / "c" / "relprune.json").read_text())["save_format"] == "compressed"
    assert weight_bytes(tmp_path / "c") < 0.8 * weight_bytes(tmp_path / "d")
    assert main(["llm", "eval", "--model", str(tmp_path / "c"), "--text", str(tmp_path / "eval.txt"),
                 "--seqlen", "16", "--samples", "2"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--save-format", "zip", "--out", str(tmp_path / "z")])
    assert exit_.value.code == 2
    assert not (tmp_path / "z").exists()


def test_streamed_pruning_writes_compressed_and_reads_a_compressed_source(folder, tmp_path):
    data = ids_batches()
    model, _ = relprune.llm.load_model(folder)
    in_memory = prune_sequential(model, data, sparsity=0.5)
    streamed = prune_streamed(folder, tmp_path / "s", data, sparsity=0.5, save_format="compressed")
    assert all(torch.equal(streamed[n], m) for n, m in in_memory.items())
    assert folder_layout(json.loads((tmp_path / "s" / "config.json").read_text())) == "sparse-bitmask"
    again = load_causal_lm(tmp_path / "s")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    # A compressed folder is a source too: pruning it again at the same sparsity keeps its masks.
    twice = prune_streamed(tmp_path / "s", tmp_path / "s2", data, sparsity=0.5, criterion="magnitude",
                           reconstruct=False)
    assert all(torch.equal(twice[n] | ~m, torch.ones_like(m)) for n, m in in_memory.items())
    assert folder_layout(json.loads((tmp_path / "s2" / "config.json").read_text())) is None


def test_streamed_bias_compensation_equals_the_in_memory_pruning(folder, tmp_path):
    data = ids_batches()
    recipe = dict(sparsity=0.5, criterion="contrib-std", reconstruct=False, bias_compensation=True)
    model, _ = relprune.llm.load_model(folder)
    in_memory = prune_sequential(model, data, **recipe)
    streamed = prune_streamed(folder, tmp_path / "s", data, **recipe)
    assert all(torch.equal(streamed[n], m) for n, m in in_memory.items())
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    again = load_causal_lm(tmp_path / "s")
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_streamed_bias_compensation_a_config_cannot_hold_is_refused_before_any_block(tmp_path):
    from test_families import batches, build

    model = build("mistral")  # no attention_bias / mlp_bias switch: a folder cannot declare the new biases
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(relprune.RelpruneError, match="no switch for biases"):
        prune_streamed(tmp_path / "dense", tmp_path / "s", batches(), sparsity=0.5, criterion="contrib-std",
                       reconstruct=False, bias_compensation=True)
    assert not (tmp_path / "s").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
