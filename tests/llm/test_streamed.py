"""Streamed pruning (llm.streamed): the same result as in memory, one block alive at a time, bad input."""


from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import WORDS, ids_batches, tiny_llama, tiny_tokenizer  # noqa: E402

import relprune  # noqa: E402
from relprune.cli import main  # noqa: E402
from relprune.llm import (  # noqa: E402
    prune_sequential,
)


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
