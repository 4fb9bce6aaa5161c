"""Block-by-block pruning (llm.sequential): statistics per block, every recipe, dense or pruned inputs, OWL and
entropy block sparsities, several ranks."""


from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import ids_batches, tiny_llama  # noqa: E402

import relprune  # noqa: E402
from relprune.llm import (  # noqa: E402
    decoder_blocks,
    perplexity,
    prune_sequential,
)


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


def _outlier_block_llama() -> nn.Module:
    """A three-block tiny Llama whose block 1 has 5% of its weights made 50x larger."""
    model = tiny_llama(layers=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers[1].modules():
            if isinstance(layer, nn.Linear):
                layer.weight[torch.rand(layer.weight.shape, generator=g) < 0.05] *= 50
    return model


@pytest.mark.parametrize("criterion", ["wanda", "magnitude"])  # magnitude: the blocks need not run to prune
@pytest.mark.parametrize("allocation, block_one", [("owl", min), ("entropy", max)])
def test_per_block_allocations_spread_around_the_target(allocation, block_one, criterion):
    """5% of block 1's weights become 50x larger: outliers for OWL (pruned less), outputs resting on few
    weights for the contribution entropy (pruned more)."""
    model = _outlier_block_llama()
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


@pytest.mark.parametrize("criterion", ["wanda", "admm"])
def test_the_errors_allocation_gives_each_layer_its_own_sparsity_and_meets_the_budget(criterion):
    """5% of block 1's weights become 50x larger: its layers' outputs rest on those few, so removing the rest
    costs them little of their output (the errors are relative to it), and they lose more than the others."""
    model = _outlier_block_llama()
    masks = prune_sequential(model, ids_batches(), sparsity=0.5, criterion=criterion,
                             reconstruct=False if criterion == "wanda" else None, allocation="errors", owl_lambda=0.2)
    removed = sum(m.numel() - int(m.sum()) for m in masks.values())
    assert removed / sum(m.numel() for m in masks.values()) == pytest.approx(0.5, abs=0.01)
    sparsity = {n: 1 - float(m.float().mean()) for n, m in masks.items()}
    assert max(sparsity.values()) - min(sparsity.values()) > 0.1  # layers really differ
    block = [sum(v for n, v in sparsity.items() if n.startswith(f"model.layers.{i}.")) for i in range(3)]
    assert block[1] == max(block)
    for v in sparsity.values():
        assert 0.3 - 0.02 <= v <= 0.7 + 0.02


def test_the_errors_allocation_streamed_equals_in_memory(tmp_path):
    from relprune.llm import prune_streamed

    model = tiny_llama(layers=3)
    model.save_pretrained(tmp_path / "dense")
    recipe = {"criterion": "wanda", "reconstruct": False, "allocation": "errors", "owl_lambda": 0.1, "sparsity": 0.6}
    expected = prune_sequential(tiny_llama(layers=3), ids_batches(), **recipe)
    got = prune_streamed(tmp_path / "dense", tmp_path / "out", ids_batches(), **recipe)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
