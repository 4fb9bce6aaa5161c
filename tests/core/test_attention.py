"""nn.MultiheadAttention and nn.TransformerEncoderLayer are pruned like any layer: the statistics of their packed
in-projection and of out_proj match a hand-written attention, masks hold on torch's fused paths too, through
training and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprune
from relprune.core.masks import load_state_dict, mask_of


class Attention(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        out = self.mha(x, x, x)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


def heads_by_hand(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The input of out_proj (batch-first x), written out: projections, per-head softmax attention, concat."""
    b, t, e = x.shape
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    h = mha.num_heads

    def split(z):
        return z.reshape(b, t, h, e // h).transpose(1, 2)

    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (e // h) ** 0.5, dim=-1)
    return (att @ split(v)).transpose(1, 2).reshape(b * t, e)


@pytest.mark.parametrize("batch_first", [True, False])
def test_out_proj_statistics_are_those_of_the_heads_it_reads(batch_first):
    torch.manual_seed(0)
    model = Attention(batch_first).eval()
    xs = [torch.randn(4, 5, 8) for _ in range(2)]
    stats = relprune.collect_stats(model, xs, statistics=["input_gram", "contribution_mean"], liveness=False)
    with torch.no_grad():
        heads = torch.cat([heads_by_hand(model.mha, x) for x in xs]).double()
    s = stats["mha.out_proj"]
    torch.testing.assert_close(s.input_gram, heads.T @ heads / len(heads), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.input_mean.reshape(-1, 8)[0], heads.mean(0), rtol=1e-5, atol=1e-7)
    tokens = torch.cat([x.reshape(-1, 8) for x in xs]).double()  # the in-projection reads the tokens themselves
    s = stats["mha.in_proj"]
    torch.testing.assert_close(s.input_gram, tokens.T @ tokens / len(tokens), rtol=1e-5, atol=1e-7)
    w = model.mha.in_proj_weight.detach().double()
    torch.testing.assert_close(s.contribution_mean, (w * tokens.mean(0)).to(s.contribution_mean.dtype),
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the model's own forward is untouched after collection
        torch.testing.assert_close(model(xs[0]), Attention.forward(model, xs[0]))


def test_an_attention_model_prunes_trains_and_round_trips_with_its_zeros():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(16, 5, 8)
    masks = relprune.prune(model, relprune.collect_stats(model, [x]), sparsity=0.5)
    assert set(masks) == {"mha.in_proj", "mha.out_proj", "head"}
    assert masks["mha.in_proj"].shape == (24, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    out_proj = model.mha.out_proj
    assert torch.all(out_proj.weight[~masks["mha.out_proj"]] == 0)
    assert torch.all(model.mha.in_proj_weight[~masks["mha.in_proj"]] == 0)  # trained, still zero
    model.eval()
    with torch.no_grad():
        fused = model(x)  # eval and no grad: torch's fused attention, which reads out_proj.weight directly
        plain = relprune.make_permanent(relprune.copy_model(model))
        torch.testing.assert_close(fused, plain(x))
    fresh = Attention()
    load_state_dict(fresh, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), fused)
    assert torch.equal(mask_of(fresh.mha.out_proj).bool(), masks["mha.out_proj"])
    assert torch.equal(mask_of(fresh.mha.in_proj).bool(), masks["mha.in_proj"])


def test_a_transformer_encoder_layer_is_pruned_on_its_fused_path_too():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(8, 6, 16)
    stats = relprune.collect_stats(layer, [x])
    masks = relprune.prune(layer, stats, sparsity=0.6)
    assert set(masks) == {"self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"}
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    for name in masks:
        w = layer.get_submodule(name).weight
        assert torch.all(w[~masks[name]] == 0), name
    layer.eval()
    with torch.no_grad():
        fused = layer(x)  # torch's fused encoder-layer kernel reads every weight directly
        torch.testing.assert_close(fused, relprune.make_permanent(relprune.copy_model(layer))(x),
                                   rtol=1e-4, atol=1e-5)


def test_the_built_in_vit_prunes_every_projection_and_runs_its_fused_path_masked():
    from relprune.experiments.models import build_model

    torch.manual_seed(0)
    model = build_model("vit", (1, 28, 28), 10)
    x = torch.randn(8, 1, 28, 28)
    masks = relprune.prune(model, relprune.collect_stats(model, [x]), sparsity=0.5)
    assert {"patch", "head", "encoder.layers.0.self_attn.in_proj", "encoder.layers.0.self_attn.out_proj",
            "encoder.layers.1.linear2"} <= set(masks)
    assert relprune.sparsity_report(model)  # the in-projection is counted like any layer
    in_proj = model.encoder.layers[1].self_attn.in_proj_weight
    assert float((in_proj == 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), relprune.make_permanent(relprune.copy_model(model))(x),
                                   rtol=1e-4, atol=1e-5)


def test_a_masked_in_projection_survives_compact_checkpoints_and_sparse_exports(tmp_path):
    from relprune.deploy.export import export_sparse, load_exported
    from relprune.experiments.experiment import compact_state, expand_state

    torch.manual_seed(1)
    model = Attention()
    x = torch.randn(8, 5, 8)
    masks = relprune.prune(model, relprune.collect_stats(model, [x]), sparsity=0.7)
    state = compact_state(model)
    assert state["mha.in_proj_weight_mask"].dtype == torch.bool
    fresh = Attention()
    load_state_dict(fresh, expand_state(state))
    assert torch.equal(mask_of(fresh.mha.in_proj).bool(), masks["mha.in_proj"])
    path = export_sparse(model, tmp_path)
    import json

    assert "mha.in_proj_weight" in json.loads((tmp_path / "sparse.json").read_text())["sparse_weights"]
    loaded, _ = load_exported(path, Attention())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_make_permanent_leaves_plain_torch_and_the_old_checkpoint_layout_loads():
    from torch.nn.utils import prune as torch_prune

    from relprune.core.layers import PackedProjection

    torch.manual_seed(2)
    model = Attention()
    relprune.prune(model, relprune.collect_stats(model, [torch.randn(4, 5, 8)]), sparsity=0.5)
    plain = relprune.make_permanent(relprune.copy_model(model))
    assert not any(isinstance(m, PackedProjection) for m in plain.modules())
    assert set(plain.state_dict()) == set(Attention().state_dict())
    # torch.nn.utils.prune's layout of the packed projection (in_proj_weight_orig / in_proj_weight_mask)
    legacy = Attention()
    torch_prune.random_unstructured(legacy.mha, "in_proj_weight", amount=0.5)
    fresh = Attention()
    load_state_dict(fresh, legacy.state_dict())
    assert torch.equal(mask_of(fresh.mha.in_proj), legacy.mha.in_proj_weight_mask)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        memory = x.flip(1)
        return self.head(self.mha(x, memory, memory)[0].mean(1))


def test_a_cross_attention_in_projection_is_left_out_by_default_and_refused_by_name():
    torch.manual_seed(3)
    model = CrossAttention()
    x = torch.randn(4, 5, 8)
    before = model.mha.in_proj_weight.detach().clone()
    with pytest.warns(UserWarning, match="cross-attention"):
        stats = relprune.collect_stats(model, [x])
    assert "mha.in_proj" not in stats and "mha.out_proj" in stats
    relprune.prune(model, stats, sparsity=0.5)
    assert torch.equal(model.mha.in_proj_weight.detach(), before)
    with pytest.raises(relprune.RelpruneError, match="cross-attention"):
        relprune.collect_stats(CrossAttention(), [x], layers=["mha.in_proj"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_observing_the_attention_does_not_change_its_output(dtype):
    from relprune.core.layers import attach_packed_projections, observable_attention

    torch.manual_seed(4)
    mha = nn.MultiheadAttention(12, 3, batch_first=False, bias=False, add_bias_kv=True).to(dtype).eval()
    attach_packed_projections(mha)
    x = torch.randn(7, 2, 12, dtype=dtype)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=pad)[0]
        with observable_attention(mha):
            got = mha(x, x, x, key_padding_mask=pad)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_statistics_of_one_instance_prune_a_fresh_build_of_the_model():
    torch.manual_seed(5)
    model = Attention()
    x = torch.randn(4, 5, 8)
    stats = relprune.collect_stats(model, [x])
    fresh = Attention()
    fresh.load_state_dict(model.state_dict())  # torch's own load: no relprune call has touched it
    masks = relprune.prune(fresh, stats, sparsity=0.5)
    assert "mha.in_proj" in masks
    fresh2 = Attention()
    fresh2.load_state_dict(model.state_dict())
    relprune.apply_masks(fresh2, masks)
    torch.testing.assert_close(fresh2.mha.in_proj_weight, fresh.mha.in_proj_weight)
