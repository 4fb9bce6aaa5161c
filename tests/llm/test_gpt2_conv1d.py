"""transformers' Conv1D (GPT-2 family, weight stored I x O) against its nn.Linear twin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from transformers.pytorch_utils import Conv1D  # noqa: E402

import relprune  # noqa: E402
from relprune.core.masks import mask_of  # noqa: E402
from relprune.llm import prune_sequential  # noqa: E402
from relprune.train.regularizers import ContributionEntropy  # noqa: E402


def pair(dtype=torch.float64):
    """The same function as Conv1D layers and as Linear layers (weights transposed)."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(12, 8), nn.ReLU(), Conv1D(4, 12)).to(dtype)
    lin = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).to(dtype)
    with torch.no_grad():
        for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
            li.weight.copy_(c.weight.t())
            li.bias.copy_(c.bias)
    return conv, lin


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, generator=g).to(dtype) + 0.5, torch.randint(0, 4, (6, 3), generator=g))
            for _ in range(3)]


def loss_fn(out, target):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def test_conv1d_statistics_equal_the_linear_twin():
    conv, lin = pair()
    a = relprune.collect_stats(conv, data(), statistics=None, loss_fn=loss_fn)
    b = relprune.collect_stats(lin, data(), statistics=None, loss_fn=loss_fn)
    for name in ("0", "2"):
        for stat in sorted(a.statistics):
            torch.testing.assert_close(a[name].get(stat), b[name].get(stat), msg=f"{name} {stat}")
        assert a[name].weight.shape == b[name].weight.shape == lin[int(name)].weight.shape


@pytest.mark.parametrize("criterion, budget, reconstruct", [
    ("magnitude", {"sparsity": 0.5, "scope": "layer"}, False),
    ("wanda", {"sparsity": 0.5, "scope": "row"}, False),
    ("contrib-share", {"n_m": "2:4"}, False),
    ("rc", {"sparsity": 0.6}, False),
    ("snip", {"sparsity": 0.5}, False),
    ("sparsegpt", {"sparsity": 0.5}, False),
    ("obs", {"sparsity": 0.5, "scope": "row"}, "exact"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv1d_prunes_like_the_linear_twin(criterion, budget, reconstruct, dtype):
    conv, lin = pair(dtype)
    stats_names = None if criterion == "rc" else sorted(relprune.CRITERIA[criterion].statistics | (
        {"input_gram"} if reconstruct else set()))
    for model in (conv, lin):
        stats = None if stats_names == [] else relprune.collect_stats(model, data(dtype), statistics=stats_names,
                                                                      loss_fn=loss_fn)
        model.masks = relprune.prune(model, stats, criterion=criterion, reconstruct=reconstruct, **budget)
    for i in (0, 2):
        assert conv.masks[str(i)].shape == conv[i].weight.shape  # masks come in the parameter's layout
        assert torch.equal(conv.masks[str(i)].t(), lin.masks[str(i)])
        assert torch.equal(mask_of(conv[i]).t(), mask_of(lin[i]))
    x = data(dtype)[0][0]
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(conv(x), lin(x), **tol)
    relprune.make_permanent(conv)
    assert isinstance(conv[0], Conv1D) and conv[0].weight.shape == (8, 12)


def test_conv1d_regulariser_equals_the_linear_twin():
    conv, lin = pair()
    x = data()[0][0]
    values = []
    for model in (conv, lin):
        reg = ContributionEntropy(model, x)
        model(x)
        values.append(reg())
        reg.detach()
    torch.testing.assert_close(values[0], values[1])


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_tied_head_is_left_out_of_whole_model_pruning():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="lm_head"):
        masks = relprune.prune(model, None, sparsity=0.5, criterion="magnitude", scope="layer")
    assert "lm_head" not in masks and "transformer.h.0.attn.c_attn" in masks
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gpt2_pruned_block_by_block_and_saved(tmp_path):
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 40, (2, 16), generator=g),
                "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(2)]
    masks = prune_sequential(model, batches, sparsity=0.5, criterion="obs", reconstruct="exact")
    names = sorted(masks)
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    assert all(".wte" not in n and "lm_head" not in n for n in names)
    attn = model.transformer.h[0].attn.c_attn
    assert attn.weight.shape == (32, 96) and (attn.weight == 0).float().mean() == pytest.approx(0.5)
    # Per output row (a column of the stored I x O weight): half of every row is gone.
    assert torch.all((attn.weight == 0).sum(0) == 16)
    model.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
