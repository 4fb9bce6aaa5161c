"""Heads (with grouped-query attention) and MLP channels of a tiny Llama, removed exactly."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import ids_batches, tiny_tokenizer  # noqa: E402

import relprune  # noqa: E402
from relprune.llm.structured import (  # noqa: E402
    layer_sizes,
    load_shrunk,
    plan_units,
    save_shrunk,
    shrink_units,
    unit_masks,
    unit_scores,
)


def tiny(layers=3, hidden=32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=22, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def proj_params(model):
    return sum(p.numel() for n, p in model.model.layers.named_parameters() if "proj" in n)


@pytest.mark.parametrize("criterion", ["rc", "fluctuation", "share", "l2", "random"])
@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_shrunk_llama_equals_the_masked_one(criterion, scope):
    model = tiny()
    batches = ids_batches(pad_last=2)
    scores = unit_scores(model, batches, criterion)
    assert scores[0, "heads"].shape == (4,) and scores[0, "mlp"].shape == (48,)
    keep = plan_units(model, scores, 0.3, scope=scope)
    masked = copy.deepcopy(model)
    relprune.apply_masks(masked, unit_masks(masked, keep))
    before = proj_params(model)
    sizes = shrink_units(model, keep)
    after = proj_params(model)
    assert 0.3 <= 1 - after / before < 0.4
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    for layer in sizes["layers"]:
        assert layer["num_attention_heads"] == 2 * layer["num_key_value_heads"]  # GQA ratio kept
    if scope == "uniform":
        assert all(s == sizes["layers"][0] for s in sizes["layers"])


def test_parameter_count_of_a_unit_matches_the_formula():
    model = tiny(1)
    before = sum(p.numel() for p in model.model.layers.parameters())
    keep = {(0, "heads"): torch.tensor([0, 2, 3]), (0, "mlp"): torch.arange(40)}
    shrink_units(model, keep)
    after = sum(p.numel() for p in model.model.layers.parameters())
    head_dim, hidden = 4, 32
    per_group = (2 + 2 * 2) * head_dim * hidden  # k, v rows + q rows and o columns of its 2 query heads
    assert before - after == 1 * per_group + 8 * 3 * hidden


@pytest.mark.parametrize("scope, hidden", [("uniform", 48), ("global", 48), ("uniform", 32)])
def test_shrunk_llama_saves_and_reloads(tmp_path, scope, hidden):
    model = tiny(hidden=hidden)
    keep = plan_units(model, unit_scores(model, ids_batches(), "rc"), 0.3, scope=scope)
    shrink_units(model, keep)
    plain = save_shrunk(model, tiny_tokenizer(), tmp_path)
    heads = layer_sizes(model)["layers"][0]["num_attention_heads"]
    assert plain == (scope == "uniform" and hidden % heads == 0)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path) if plain else load_shrunk(tmp_path)
    assert layer_sizes(loaded) == layer_sizes(model)
    ids = ids_batches()[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_flap_compensation_keeps_each_readers_mean_output_and_saves_with_bias_switches(tmp_path):
    from relprune.llm.structured import unit_compensation

    model = tiny()
    batches = ids_batches()
    keep = plan_units(model, unit_scores(model, batches, "fluctuation"), 0.3, scope="uniform")
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: captured.setdefault(n, []).append(args[0]))
             for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    dense = copy.deepcopy(model)
    delta = unit_compensation(model, batches, keep)
    assert set(delta) == set(captured)
    shrink_units(model, keep, bias_delta=delta)
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    for name, xs in captured.items():
        tokens = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, batches, strict=True)]).double()
        i = int(name.split(".")[2])  # head_dim 4, two query heads per key/value head: 8 columns a unit
        kind = "heads" if name.endswith("o_proj") else "mlp"
        cols = keep[i, kind] if kind == "mlp" else (keep[i, kind].reshape(-1, 1) * 8 + torch.arange(8)).flatten()
        small, big = modules[name], dense_modules[name]
        want = (tokens @ big.weight.double().t()).mean(0)
        got = (tokens[:, cols] @ small.weight.double().t()).mean(0) + small.bias.double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = save_shrunk(model, tiny_tokenizer(), tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path) if plain else load_shrunk(tmp_path)
    assert loaded.config.attention_bias and loaded.config.mlp_bias
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_share_and_fluctuation_unit_scores_by_hand_on_the_first_layer():
    model = tiny()
    batches = ids_batches()
    seen = []
    down = model.model.layers[0].mlp.down_proj
    hook = down.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    var = x.var(0, unbiased=False)  # over every token (no padding in these batches)
    contrib = down.weight.detach().double() ** 2 * var  # Var[c_rc] = W_rc^2 Var[x_c]
    fluct = unit_scores(model, batches, "fluctuation")[0, "mlp"]
    share = unit_scores(model, batches, "share")[0, "mlp"]
    torch.testing.assert_close(fluct, contrib.sum(0), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(share, (contrib / contrib.sum(1, keepdim=True)).sum(0), rtol=1e-4, atol=1e-9)
