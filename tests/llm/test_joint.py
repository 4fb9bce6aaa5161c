"""Width and depth in one plan: residual shares against a plain forward pass, the plan's budget and order,
and the shrunk model against the same blocks removed and units masked by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from test_families import batches as family_batches  # noqa: E402
from test_families import build  # noqa: E402
from test_llm_hostile import _run  # noqa: E402
from tiny import ids_batches, tiny_tokenizer  # noqa: E402

import relprune  # noqa: E402
from relprune.llm import decoder_blocks  # noqa: E402
from relprune.llm import joint as joint_module  # noqa: E402
from relprune.llm.depth import remove_blocks  # noqa: E402
from relprune.llm.joint import (  # noqa: E402
    JointPlan,
    ResidualShares,
    joint_statistics,
    plan_joint,
    residual_shares,
    shrink_joint,
)
from relprune.llm.structured import layer_sizes, load_shrunk, save_shrunk, unit_cost, unit_masks, unit_scores  # noqa: E402


def tiny(layers=3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=22, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _share(base, write):
    return (write.norm(dim=-1) / (base.norm(dim=-1) + write.norm(dim=-1))).mean()


# Where each family adds its sublayers' outputs to the residual stream.
WRITERS = {"llama": ("self_attn.o_proj", "mlp.down_proj"),
           "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm")}


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_residual_shares_equal_a_plain_forward_pass_with_hooks(family):
    model = build(family).double()
    data = family_batches()
    shares = residual_shares(model, data)
    named = decoder_blocks(model)
    ref = {k: [] for k in ("block", "attention", "mlp")}
    for _, block in named:
        seen: dict[str, list] = {"in": [], "attn": [], "mlp": []}
        hooks = [block.register_forward_pre_hook(
            lambda _m, args, kwargs, seen=seen: seen["in"].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)]
        for key, path in zip(("attn", "mlp"), WRITERS[family], strict=True):
            hooks.append(block.get_submodule(path).register_forward_hook(
                lambda _m, _a, out, key=key, seen=seen: seen[key].append(out)))
        with torch.no_grad():
            for b in data:
                model(**b, use_cache=False)
        for h in hooks:
            h.remove()
        live = torch.cat([b["attention_mask"].flatten().bool() for b in data])
        h, a, m = (torch.cat([t.flatten(0, -2) for t in seen[k]])[live] for k in ("in", "attn", "mlp"))
        ref["attention"].append(_share(h, a))
        ref["mlp"].append(_share(h + a, m))
        ref["block"].append(_share(h, a + m))
    for key, values in ref.items():
        torch.testing.assert_close(getattr(shares, key), torch.stack(values).double(), rtol=1e-9, atol=1e-12)


def _uniform_scores(model):
    out = {}
    for i, (_, block) in enumerate(decoder_blocks(model)):
        out[i, "heads"] = torch.ones(block.self_attn.k_proj.out_features // block.self_attn.head_dim,
                                     dtype=torch.float64)
        out[i, "mlp"] = torch.ones(block.mlp.down_proj.in_features, dtype=torch.float64)
    return out


def _removed(model, plan: JointPlan, scores) -> tuple[int, int]:
    named = decoder_blocks(model)
    cost = {k: unit_cost(named[k[0]][1], k[1]) for k in scores}
    total = sum(cost[k] * scores[k].numel() for k in scores)
    kept_blocks = [i for i in range(len(named)) if i not in plan.drop]
    kept = 0
    for new, old in enumerate(kept_blocks):
        for kind in ("heads", "mlp"):
            n = plan.keep[new, kind].numel() if (new, kind) in plan.keep else scores[old, kind].numel()
            kept += cost[old, kind] * n
    return total - kept, total


def test_a_block_that_writes_nothing_goes_whole_before_any_unit():
    model = tiny()
    scores = _uniform_scores(model)
    shares = ResidualShares(block=torch.tensor([0.9, 1e-3, 0.9], dtype=torch.float64),
                            attention=torch.full((3,), 0.3, dtype=torch.float64),
                            mlp=torch.full((3,), 0.3, dtype=torch.float64))
    plan = plan_joint(model, scores, shares, 0.3)  # one block is a third of the parameters
    assert plan.drop == [1] and plan.keep == {}
    plan = plan_joint(model, scores, shares, 0.5)
    assert plan.drop == [1] and plan.keep and all(i in (0, 1) for i, _ in plan.keep)
    removed, total = _removed(model, plan, scores)
    assert removed >= 0.5 * total


def test_units_that_write_little_go_before_their_block():
    model = tiny()
    scores = _uniform_scores(model)
    scores[2, "mlp"] = torch.linspace(1e-6, 1, 48, dtype=torch.float64) ** 4  # a few channels carry the MLP
    shares = ResidualShares(*(torch.full((3,), 0.3, dtype=torch.float64) for _ in range(3)))
    plan = plan_joint(model, scores, shares, 0.1, round_to=1)
    assert plan.drop == [] and set(plan.keep) == {(2, "mlp")}
    assert torch.equal(plan.keep[2, "mlp"], torch.arange(48 - plan.keep[2, "mlp"].numel(), 48))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.6, 0.9])
def test_the_plan_meets_its_budget_by_at_most_one_candidate_and_keeps_a_unit_of_each_kind(seed, ratio):
    model = tiny(4)
    g = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(v.numel(), generator=g, dtype=torch.float64) for k, v in _uniform_scores(model).items()}
    shares = ResidualShares(*(torch.rand(4, generator=g, dtype=torch.float64) for _ in range(3)))
    plan = plan_joint(model, scores, shares, ratio, round_to=1)
    removed, total = _removed(model, plan, scores)
    block = sum(unit_cost(decoder_blocks(model)[0][1], k) * scores[0, k].numel() for k in ("heads", "mlp"))
    assert ratio * total <= removed < ratio * total + block
    assert len(plan.drop) < 4
    for (i, _), kept in plan.keep.items():
        assert 0 <= i < 4 - len(plan.drop) and kept.numel() >= 1
        assert torch.equal(kept, kept.sort().values)


@pytest.mark.parametrize("compensation", ["none", "refit"])
def test_shrink_joint_equals_removing_the_blocks_and_masking_the_units(tmp_path, compensation):
    model = tiny(4)
    batches = ids_batches(pad_last=2)
    scores = unit_scores(model, batches, "rc")
    shares = residual_shares(model, batches)
    shares = ResidualShares(shares.block.clone(), shares.attention, shares.mlp)
    shares.block[2] = 0.0  # make sure a block goes
    plan = plan_joint(model, scores, shares, 0.45)
    assert 2 in plan.drop and plan.keep
    reference = copy.deepcopy(model)
    remove_blocks(reference, plan.drop)
    relprune.apply_masks(reference, unit_masks(reference, plan.keep))
    sizes = shrink_joint(model, batches, plan, compensation=compensation)
    assert sizes["removed"] == plan.drop
    assert len(sizes["layers"]) == 4 - len(plan.drop) == model.config.num_hidden_layers
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        if compensation == "none":
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-5)
        else:  # the re-fit changes the readers' kept columns only
            assert not torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    save_shrunk(model, tiny_tokenizer(), tmp_path / "out")
    loaded = load_shrunk(tmp_path / "out")
    assert layer_sizes(loaded) == layer_sizes(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_plans_and_ratios_are_refused_before_anything_changes():
    model = tiny()
    scores = _uniform_scores(model)
    shares = ResidualShares(*(torch.full((3,), 0.3, dtype=torch.float64) for _ in range(3)))
    for ratio in (0, 1, -0.1, float("nan"), "0.3"):
        with pytest.raises(relprune.RelpruneError, match="ratio"):
            plan_joint(model, scores, shares, ratio)
    with pytest.raises(relprune.RelpruneError, match="cover every block"):
        plan_joint(model, {k: v for k, v in scores.items() if k[0] != 1}, shares, 0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [JointPlan([0, 1, 2], {}), JointPlan([5], {}), JointPlan([1], {(2, "mlp"): torch.tensor([0])}),
           JointPlan([1], {(0, "mlp"): torch.tensor([], dtype=torch.long)})]
    for plan in bad:
        with pytest.raises(relprune.RelpruneError):
            shrink_joint(model, ids_batches(), plan)
        assert len(decoder_blocks(model)) == 3
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_llm_shrink_scope_joint_writes_a_folder_load_model_reads(folder, tmp_path, capsys):
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.4", "--scope", "joint", "--calibration",
                      tmp_path / "calib.txt", "--calibration-samples", "4", "--seqlen", "16", "--out",
                      tmp_path / "j"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "j" / "relprune.json").read_text())
    assert record["scope"] == "joint" and "removed" in record["sizes"]
    assert record["parameters"] < record["dense_parameters"]
    model, _ = relprune.llm.load_model(tmp_path / "j")
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.4", "--scope", "joint", "--depth",
                      "--calibration", tmp_path / "calib.txt", "--out", tmp_path / "d"], capsys)
    assert code == 1 and "--depth" in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("round_to", [1, 8, 16])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_rounded_widths_keep_a_multiple_and_still_meet_the_budget(round_to, ratio):
    from relprune.llm.structured import plan_units

    model = tiny(4)
    g = torch.Generator().manual_seed(round_to)
    scores = {k: torch.rand(v.numel(), generator=g, dtype=torch.float64) for k, v in _uniform_scores(model).items()}
    shares = ResidualShares(*(torch.rand(4, generator=g, dtype=torch.float64) for _ in range(3)))
    named = decoder_blocks(model)
    cost = {k: unit_cost(named[k[0]][1], k[1]) for k in scores}
    total = sum(cost[k] * scores[k].numel() for k in scores)
    plans = {scope: plan_units(model, scores, ratio, scope=scope, round_to=round_to) for scope in ("uniform", "global")}
    joint = plan_joint(model, scores, shares, ratio, round_to=round_to)
    plans["joint"] = joint.keep
    for scope, keep in plans.items():
        drop = joint.drop if scope == "joint" else []
        for (i, kind), kept in keep.items():
            if kind == "mlp":
                assert kept.numel() % round_to == 0 or kept.numel() == 48, (scope, i, kept.numel())
        removed = _removed(model, JointPlan(drop, keep), scores)[0]
        assert removed >= ratio * total, scope
    with pytest.raises(relprune.RelpruneError, match="round_to"):
        plan_units(model, scores, ratio, round_to=0)
    with pytest.raises(relprune.RelpruneError, match="round_to"):
        plan_joint(model, scores, shares, ratio, round_to=True)


@pytest.mark.parametrize("extra, code, words", [
    (["--round-to", "0"], 2, "--round-to"), (["--round-to", "2.5"], 2, "--round-to"),
    (["--depth", "--round-to", "8"], 1, "--round-to apply to heads"), (["--depth", "--scope", "global"], 1, "--depth")])
def test_llm_shrink_flag_combinations_it_cannot_honour_are_one_line(folder, tmp_path, capsys, extra, code, words):
    got, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.3", "--calibration", tmp_path / "calib.txt",
                     "--out", tmp_path / "x", *extra], capsys)
    assert got == code and words in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("score", ["share", "fluctuation", "l2", "random"])
def test_joint_statistics_in_one_pass_equal_the_two_separate_passes(score):
    model = tiny()
    batches = ids_batches()
    scores, shares = joint_statistics(model, batches, score, seed=3)
    expected = unit_scores(model, batches, score, seed=3)
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(scores[key], value)
    separate = residual_shares(model, batches)
    for kind in ("block", "attention", "mlp"):
        torch.testing.assert_close(getattr(shares, kind), getattr(separate, kind))
    calls = []
    original = joint_module.walk_blocks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(joint_module, "walk_blocks", lambda *a, **k: calls.append(1) or original(*a, **k))
        joint_statistics(model, batches, score)
    assert calls == [1]
