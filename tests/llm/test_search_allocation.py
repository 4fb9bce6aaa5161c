"""The search allocation on a tiny Llama: its fitness is the KL divergence of a model masked by hand, the
weights are as before after it (also when it fails), it keeps the budget, it returns the layer-error start
when it has no time, and settings it cannot honour are refused before anything changes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import ids_batches, tiny_llama  # noqa: E402

from relprune.core.collect import collect_stats  # noqa: E402
from relprune.core.recipe import Recipe  # noqa: E402
from relprune.core.reconstruct import obs_saliency  # noqa: E402
from relprune.errors import RelpruneError, SparsityError  # noqa: E402
from relprune.llm import prune_sequential  # noqa: E402
from relprune.llm import search as S  # noqa: E402
from relprune.llm.blocks import capture_block_inputs, walk_blocks  # noqa: E402
from relprune.llm.sequential import block_recipe, block_sparsities, decoder_blocks, llm_recipe  # noqa: E402


def _setup(layers=3, sparsity=0.6, **keywords):
    model = tiny_llama(layers=layers)
    batches = ids_batches(n=2, seqlen=12, pad_last=3)
    recipe = block_recipe(llm_recipe(None, dict(sparsity=sparsity, allocation="search", **keywords)))
    named = decoder_blocks(model)
    captured = capture_block_inputs(model, [b for _, b in named], batches)
    return model, batches, recipe, named, captured


def _saliencies(named, captured):
    """Every layer's saliencies on its dense inputs, gathered here (not taken from the search)."""
    out = {}
    for step in walk_blocks(None, named, (), captured=captured):
        for layer, ls in collect_stats(step.block, step.inputs, statistics=["input_gram"], liveness=False).items():
            out[(step.index, layer)] = obs_saliency(ls.weight, ls.input_gram)[0]
    return out


def _reference_kl(state, layers, saliency, names, levels, windows):
    """The candidate built by hand: a copy of the dense model, each row losing its ``round(level * columns)``
    weights of least saliency; the KL divergence per token from torch's kl_div."""
    dense, pruned = tiny_llama(layers=layers), tiny_llama(layers=layers)
    dense.load_state_dict(state)
    pruned.load_state_dict(state)
    blocks = decoder_blocks(pruned)
    with torch.no_grad():
        for (i, layer), level in zip(names, levels, strict=True):
            w = blocks[i][1].get_submodule(layer).weight
            drop = torch.sort(saliency[(i, layer)], dim=1).indices[:, :round(level * w.shape[1])]
            w.scatter_(1, drop, 0.0)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:
            mask = window["attention_mask"][0].bool()
            p = torch.log_softmax(dense(**window).logits[0].float(), -1)[mask]
            q = torch.log_softmax(pruned(**window).logits[0].float(), -1)[mask]
            total += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
            tokens += int(mask.sum())
    return total / tokens


def test_the_fitness_is_the_kl_divergence_of_the_model_masked_by_hand(monkeypatch):
    model, batches, recipe, named, captured = _setup()
    monkeypatch.setattr(S, "SEARCH_WINDOWS", 3)
    monkeypatch.setattr(S, "SEARCH_TOKENS", 10)
    windows = S._search_windows(batches)
    assert [tuple(w["input_ids"].shape) for w in windows] == [(1, 10)] * 3
    assert int(windows[2]["attention_mask"].sum()) == 9  # batch 0's last row: its last 3 of 12 tokens padded
    found = S.dense_layer_errors(recipe, named, captured, orders=True)
    saliency = _saliencies(named, captured)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = S._Candidates(model, named, found, windows)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        levels = (0.2 + 0.6 * torch.rand(len(found.names), generator=g)).tolist()
        expected = _reference_kl(dense, len(named), saliency, found.names, levels, windows)
        assert candidates.kl(levels) == pytest.approx(expected, rel=2e-3, abs=1e-7)
    assert candidates.kl([0.0] * len(found.names)) == pytest.approx(0.0, abs=1e-3)
    candidates.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k


def test_the_search_keeps_the_budget_and_leaves_the_weights_as_they_were():
    model, batches, recipe, named, captured = _setup(sparsity=0.6, search_evaluations=12)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    levels, result = S.search_sparsities(model, recipe, named, captured, batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k
    sizes = {(i, n): named[i][1].get_submodule(n).weight.numel() for i, block in enumerate(levels) for n in block}
    removed = sum(block[n] * sizes[(i, n)] for i, block in enumerate(levels) for n in block)
    assert removed / sum(sizes.values()) == pytest.approx(0.6, abs=1e-9)
    assert result.fitness <= result.start_fitness and result.evaluations == 12
    assert all(0.6 - 2 * 0.08 - 1e-9 <= s <= 0.6 + 2 * 0.08 + 1e-9 for block in levels for s in block.values())


def test_a_failing_candidate_leaves_the_weights_as_they_were(monkeypatch):
    model, batches, recipe, named, captured = _setup(search_evaluations=10)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = S._Candidates.kl

    def failing(self, levels):
        calls.append(1)
        if len(calls) == 3:
            self.apply([0.9] * len(levels))
            raise KeyboardInterrupt
        return real(self, levels)

    monkeypatch.setattr(S._Candidates, "kl", failing)
    with pytest.raises(KeyboardInterrupt):
        S.search_sparsities(model, recipe, named, captured, batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k


def test_without_time_to_search_the_masks_are_the_errors_allocations():
    kw = dict(criterion="wanda", reconstruct=False, sparsity=0.6, owl_lambda=0.1)
    expected = prune_sequential(tiny_llama(layers=3), ids_batches(), allocation="errors", **kw)
    got = prune_sequential(tiny_llama(layers=3), ids_batches(), allocation="search", search_seconds=1e-9, **kw)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_the_search_allocation_prunes_to_the_budget_with_the_default_solver():
    masks = prune_sequential(tiny_llama(layers=3), ids_batches(), sparsity=0.6, allocation="search",
                             search_evaluations=6)
    assert masks.sparsity == pytest.approx(0.6, abs=0.02)
    per_layer = {n: 1 - float(m.float().mean()) for n, m in masks.items()}
    assert len({round(v, 2) for v in per_layer.values()}) > 1


@pytest.mark.parametrize("keywords, words", [
    (dict(search_evaluations=0), "evaluations must be at least 2"),
    (dict(search_evaluations=-5), "evaluations must be at least 2"),
    (dict(search_seconds=0.0), "positive number of seconds"),
    (dict(search_seconds=-2.0), "positive number of seconds"),
    (dict(owl_lambda=0.0), "lambda above 0"),
])
def test_search_settings_it_cannot_honour_are_refused_before_any_weight_changes(keywords, words):
    model = tiny_llama(layers=2)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsityError, match=words):
        prune_sequential(model, ids_batches(), sparsity=0.6, allocation="search", **keywords)
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k


def test_the_search_needs_a_sparsity_and_the_model_in_memory(tmp_path):
    from relprune.llm import prune_streamed

    with pytest.raises(SparsityError, match="give a sparsity"):
        Recipe.build(n_m="2:4", allocation="search")
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(SparsityError, match="needs the model in memory"):
        prune_streamed(tmp_path / "dense", tmp_path / "out", ids_batches(), sparsity=0.5, allocation="search")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RelpruneError, match="chosen by prune_sequential"):
        block_sparsities(Recipe.build(sparsity=0.5, allocation="search"), [], None)
