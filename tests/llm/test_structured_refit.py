"""Width re-fit and depth pruning of tiny Llama models, against references computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from test_llm_structured import tiny  # noqa: E402
from tiny import ids_batches  # noqa: E402

import relprune  # noqa: E402
from relprune.llm.depth import block_scores, plan_blocks, remove_blocks  # noqa: E402
from relprune.llm.structured import (  # noqa: E402
    load_shrunk,
    plan_units,
    save_shrunk,
    shrink_refit,
    shrink_units,
    unit_compensation,
    unit_scores,
)


def hooked_inputs(model, module, batches):
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().flatten(0, -2)))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    return torch.cat(seen).double()


def test_the_first_layers_re_fit_is_ordinary_least_squares_on_the_dense_inputs():
    """Block 0's o_proj sees the dense inputs, so its re-fit must reach the least-squares optimum (with an
    intercept) over the kept columns; the inputs are ill-conditioned here (attention averages), so the
    fitted outputs, not the weights, are compared."""
    model = tiny()
    batches = ids_batches()
    keep = plan_units(model, unit_scores(model, batches, "fluctuation"), 0.4)
    o_proj = model.model.layers[0].self_attn.o_proj
    x = hooked_inputs(model, o_proj, batches)
    target = x @ o_proj.weight.detach().double().T
    head_dim, rep = 4, 2  # 32 / 8 heads; 8 query heads over 4 key/value heads
    kept_cols = (keep[0, "heads"].reshape(-1, 1) * rep * head_dim + torch.arange(rep * head_dim)).flatten()
    design = torch.cat([x[:, kept_cols], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    optimum = float(((design @ torch.linalg.lstsq(design, target).solution - target) ** 2).mean())
    as_is = float(((x[:, kept_cols] @ o_proj.weight.detach().double()[:, kept_cols].T - target) ** 2).mean())
    shrink_refit(model, batches, keep, percdamp=0.0)
    fitted = x[:, kept_cols] @ o_proj.weight.detach().double().T + o_proj.bias.detach().double()
    assert float(((fitted - target) ** 2).mean()) == pytest.approx(optimum, rel=1e-3)
    assert optimum < as_is / 2


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_the_re_fit_brings_the_logits_closer_to_the_dense_ones_than_flaps_compensation(ratio):
    dense = tiny(layers=4)
    batches = ids_batches()
    with torch.no_grad():
        want = [dense(**b).logits for b in batches]
    keep = plan_units(dense, unit_scores(dense, batches, "fluctuation"), ratio)
    flap, ours = copy.deepcopy(dense), copy.deepcopy(dense)
    sizes_flap = shrink_units(flap, keep, bias_delta=unit_compensation(flap, batches, keep))
    sizes_ours = shrink_refit(ours, batches, keep)
    assert sizes_flap == sizes_ours

    def error(model):
        with torch.no_grad():
            return sum(float(((model(**b).logits - w) ** 2).mean()) for b, w in zip(batches, want, strict=True))

    assert error(ours) < error(flap)


def test_the_re_fit_model_saves_and_reloads_with_its_biases(tmp_path):
    model = tiny()
    batches = ids_batches()
    keep = plan_units(model, unit_scores(model, batches, "share"), 0.3)
    shrink_refit(model, batches, keep)
    save_shrunk(model, None, tmp_path / "m")
    again = load_shrunk(tmp_path / "m")
    assert again.config.attention_bias and again.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(again(**batches[0]).logits, model(**batches[0]).logits)


def test_refit_refuses_units_the_model_lacks():
    model = tiny()
    with pytest.raises(relprune.RelpruneError, match="units the model does not have"):
        shrink_refit(model, ids_batches(), {(7, "heads"): torch.arange(2)})


def test_block_influence_by_hand_and_removal_equals_skipping_the_blocks(tmp_path):
    model = tiny(layers=4)
    batches = ids_batches()
    # Block 1's influence by hand: 1 - cos(input, output) over its tokens.
    block = model.model.layers[1]
    ins, outs = [], []
    def record(module, args, kwargs, out):
        ins.append(kwargs.get("hidden_states", args[0] if args else None))
        outs.append(out[0] if isinstance(out, tuple) else out)

    h1 = block.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(**b)
    h1.remove()
    x, y = torch.cat(ins).double().flatten(0, -2), torch.cat(outs).double().flatten(0, -2)
    by_hand = float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).mean())
    scores = block_scores(model, batches, "influence")
    assert float(scores[1]) == pytest.approx(by_hand, rel=1e-6)
    assert (block_scores(model, batches, "relative") > 0).all()

    drop = plan_blocks(scores, 2)
    assert drop == sorted(torch.argsort(scores)[:2].tolist())
    reference = copy.deepcopy(model)
    reference.model.layers = torch.nn.ModuleList([b for i, b in enumerate(reference.model.layers) if i not in drop])
    reference.config.num_hidden_layers = 2
    info = remove_blocks(model, drop)
    assert info == {"removed": drop, "num_hidden_layers": 2}
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                                   reference(input_ids=ids, use_cache=False).logits)
    generated = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)  # the cache works
    assert generated.shape == (1, 7)
    relprune.llm.save_pretrained(model, None, tmp_path / "d")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert plain.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)


def test_removing_every_block_or_an_unknown_one_is_refused_before_anything_changes():
    model = tiny(layers=3)
    before = [id(b) for b in model.model.layers]
    with pytest.raises(relprune.RelpruneError, match="at least one"):
        remove_blocks(model, [0, 1, 2])
    with pytest.raises(relprune.RelpruneError, match=r"\[0, 3\)"):
        remove_blocks(model, [5])
    with pytest.raises(relprune.RelpruneError, match="at least one must stay"):
        plan_blocks(torch.zeros(3), 3)
    assert [id(b) for b in model.model.layers] == before and model.config.num_hidden_layers == 3


def test_distillation_brings_a_shrunk_model_towards_the_dense_one_and_leaves_the_teacher_alone():
    from relprune.llm.distill import distill

    dense = tiny(layers=2)
    batches = ids_batches(3)
    student = copy.deepcopy(dense)
    keep = plan_units(student, unit_scores(student, batches, "fluctuation"), 0.5)
    shrink_units(student, keep)
    teacher_state = {k: v.clone() for k, v in dense.state_dict().items()}
    embeddings = student.model.embed_tokens.weight.detach().clone()

    def kl():
        with torch.no_grad():
            return sum(float(torch.nn.functional.kl_div(student(**b).logits.log_softmax(-1),
                                                          dense(**b).logits.log_softmax(-1), log_target=True,
                                                          reduction="batchmean")) for b in batches)

    before = kl()
    report = distill(student, dense, batches, steps=30, lr=1e-3)
    assert kl() < 0.7 * before and report.last_loss < report.first_loss
    assert report.steps == 30 and report.tokens == 30 * 3 * 12
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in teacher_state.items())
    assert torch.equal(student.model.embed_tokens.weight, embeddings)
    with pytest.raises(relprune.RelpruneError, match="at least 1"):
        distill(student, dense, batches, steps=0)


@pytest.mark.parametrize("keep, message", [
    ({(0, "mlp"): torch.tensor([], dtype=torch.long)}, "removes every MLP channel of layer 0"),
    ({(1, "heads"): torch.tensor([], dtype=torch.long)}, "removes every key/value head group"),
    ({(0, "mlp"): torch.tensor([0, 99])}, r"distinct indices in \[0, 48\)"),
    ({(0, "heads"): torch.tensor([1, 1])}, "distinct"),
    ({(9, "mlp"): torch.tensor([0])}, "does not have"),
])
def test_plans_that_empty_a_layer_or_name_missing_units_are_refused_before_any_change(keep, message):
    for shrinker in (shrink_units, lambda m, k: shrink_refit(m, ids_batches(), k)):
        model = tiny()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(relprune.RelpruneError, match=message):
            shrinker(model, keep)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
