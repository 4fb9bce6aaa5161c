"""Every decoder family transformers ships that builds tiny here: each block is calibrated on the
arguments the model itself passes it (masks, rotary tables, per-layer kinds), and a pruned model
saves and reloads with the same logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

import relprune  # noqa: E402
from relprune.core.recipe import Recipe  # noqa: E402
from relprune.llm import blocks as llm_blocks  # noqa: E402
from relprune.llm import decoder_blocks, prune_sequential, prune_streamed  # noqa: E402
from relprune.llm import sequential as llm_sequential  # noqa: E402

VOCAB = 40
SEQ = 12
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _layer_kinds(n: int) -> list[str]:
    return ["sliding_attention", "full_attention"] * (n // 2)


# name -> (model class, config class, config kwargs); sliding windows smaller than SEQ so that the
# layer kinds really differ.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", COMMON),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**COMMON, "sliding_window": 4}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {**COMMON, "use_sliding_window": True, "sliding_window": 4,
                                                  "max_window_layers": 2, "layer_types": _layer_kinds(4)}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**COMMON, "head_dim": 8}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**COMMON, "head_dim": 8, "sliding_window": 4,
                                                      "layer_types": _layer_kinds(4)}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**COMMON, "head_dim": 8, "sliding_window": 4,
                                                          "layer_types": _layer_kinds(4),
                                                          "rope_local_base_freq": 100.0}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**COMMON, "pad_token_id": 0}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4,
                                                    n_positions=64)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=4,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 word_embed_proj_dim=32, pad_token_id=1)),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                                          num_attention_heads=4, new_decoder_architecture=True,
                                                          num_kv_heads=2, alibi=False)),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", {**COMMON, "sliding_window": 4,
                                                         "layer_types": _layer_kinds(4)}),
}


def build(family: str) -> nn.Module:
    model_cls, config_cls, kwargs = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config).eval()


def batches(n: int = 2, pad: int = 3) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (2, SEQ), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, :pad] = 0  # left padding: the masks differ per row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hooked_calls(model: nn.Module, data: list[dict[str, Tensor]]) -> list[list[tuple[tuple, dict]]]:
    """What each block receives in one plain forward pass of the model (per block, per batch)."""
    named = decoder_blocks(model)
    seen: list[list[tuple[tuple, dict]]] = [[] for _ in named]
    handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen[i].append((a, dict(k))), with_kwargs=True)
               for i, (_, b) in enumerate(named)]
    try:
        with torch.no_grad():
            for batch in data:
                model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def fed_inputs(monkeypatch) -> list[list[tuple[tuple, dict]]]:
    """The (args, kwargs) of every batch each block is calibrated on, recorded as pruning runs."""
    fed: list[list[tuple[tuple, dict]]] = []
    original = llm_sequential.collect_stats

    def spy(block, inputs, **kw):
        fed.append([(b.args, b.kwargs) for b in inputs])
        return original(block, inputs, **kw)

    monkeypatch.setattr(llm_sequential, "collect_stats", spy)
    return fed


def assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b or (a is None and b is None), where


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_is_fed_what_a_dense_forward_pass_gives_it(family):
    model = build(family)
    data = batches()
    reference = hooked_calls(model, data)
    modules = [b for _, b in decoder_blocks(model)]
    captured = llm_blocks.capture_block_inputs(model, modules, data)
    dense = llm_blocks.dense_hidden_states(modules, captured)
    for i, calls in enumerate(reference):
        fed = llm_blocks.feed(captured.calls[i], dense[i])
        for b, (args, kwargs) in enumerate(calls):
            assert_same(args, fed[b].args, f"{family} block {i} batch {b} args")
            assert_same(kwargs, fed[b].kwargs, f"{family} block {i} batch {b} kwargs")


def test_layer_kinds_really_differ_in_the_alternating_families():
    """The matrix above would pass vacuously if every block got the same arguments."""
    for family in ("gemma2", "gemma3", "cohere2", "qwen2"):
        calls = hooked_calls(build(family), batches(1))
        kw0, kw1 = calls[0][0][1], calls[1][0][1]
        differ = [k for k, v in kw0.items() if isinstance(v, Tensor) and not torch.equal(v, kw1[k])] + [
            k for k, v in kw0.items() if isinstance(v, tuple) and not all(
                torch.equal(x, y) for x, y in zip(v, kw1[k], strict=True))]
        assert differ, family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sequential_pruning_feeds_each_block_the_pruned_models_own_inputs(family, monkeypatch):
    """Block by block, block i calibrates on what the finished pruned model's forward pass gives it."""
    model = build(family)
    data = batches()
    fed = fed_inputs(monkeypatch)
    prune_sequential(model, data, sparsity=0.5, criterion="wanda", reconstruct=False)
    after = hooked_calls(model, data)
    assert len(fed) == len(after)
    for i, calls in enumerate(after):
        for b, (args, kwargs) in enumerate(calls):
            got_args, got_kwargs = fed[i][b]
            assert torch.allclose(args[0] if args else kwargs["hidden_states"],
                                  got_args[0] if got_args else got_kwargs["hidden_states"], atol=1e-6), (family, i)
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            assert_same(rest, {k: v for k, v in got_kwargs.items() if k != "hidden_states"}, f"{family} {i}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_family_saves_and_reloads_with_the_same_logits(family, tmp_path):
    model = build(family)
    data = batches()
    masks = prune_sequential(model, data, sparsity=0.5)
    assert masks and all(abs(1 - m.float().mean().item() - 0.5) < 0.05 for m in masks.values())
    relprune.llm.save_pretrained(model, None, tmp_path / "pruned", save_format="compressed")
    relprune.llm.save_pretrained(model, None, tmp_path / "dense")
    compressed = relprune.llm.load_causal_lm(tmp_path / "pruned")
    plain = type(model).from_pretrained(tmp_path / "dense").eval()  # the dense layout loads in plain transformers
    with torch.no_grad():
        want = model(**data[0]).logits
        assert torch.equal(want, compressed(**data[0]).logits)
        assert torch.equal(want, plain(**data[0]).logits)
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).glob("*.safetensors")) for k in ("pruned", "dense")}
    assert size["pruned"] < size["dense"]


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
@pytest.mark.parametrize("allocation, sequential, criterion, reconstruct", [
    ("uniform", True, "obs", "exact"), ("owl", True, "obs", "exact"), ("owl", False, "obs", "exact"),
    ("owl", True, "magnitude", None)])  # magnitude reads no statistic: the blocks need not run
def test_streamed_pruning_gives_per_layer_families_their_own_arguments(family, allocation, sequential, criterion,
                                                                       reconstruct, tmp_path):
    model = build(family)
    data = batches()
    model.save_pretrained(tmp_path / "dense")
    recipe = Recipe.build(criterion=criterion, sparsity=0.5, reconstruct=reconstruct, allocation=allocation,
                          owl_lambda=0.1)
    streamed = prune_streamed(tmp_path / "dense", tmp_path / "streamed", data, recipe, sequential=sequential)
    in_memory = prune_sequential(model, data, recipe, sequential=sequential)
    for name, mask in in_memory.items():
        assert torch.equal(streamed[name], mask), name
    if allocation == "owl":  # the blocks really got different sparsities
        per_block = {n.split(".")[2]: [] for n in in_memory}
        for n, m in in_memory.items():
            per_block[n.split(".")[2]].append(1 - m.float().mean().item())
        assert len({round(sum(v) / len(v), 3) for v in per_block.values()}) > 1
    again = relprune.llm.load_causal_lm(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.allclose(model(**data[0]).logits, again(**data[0]).logits, atol=1e-5)


def test_a_block_in_two_slots_is_refused_by_name():
    model = build("llama")
    layers = model.model.layers
    layers[2] = layers[1]
    with pytest.raises(relprune.RelpruneError, match="two decoder slots"):
        prune_sequential(model, batches(1), sparsity=0.5)


def test_a_model_that_skips_a_block_is_refused_by_name():
    model = build("llama")
    model.config.num_hidden_layers = 3  # the decoder calls layers[:3] only
    with pytest.raises(relprune.RelpruneError, match="called 3 of the 4 decoder blocks"):
        prune_sequential(model, batches(1), sparsity=0.5)


def test_a_block_whose_output_is_not_a_hidden_state_is_refused_by_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = torch.nn.functional.one_hot(input_ids, 8).float()
            for layer in self.layers:
                h = layer(h)["h"]
            return h

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, h):
            return {"h": self.fc(h)}

    with pytest.raises(relprune.RelpruneError, match="returned dict"):
        prune_sequential(Odd(), [{"input_ids": torch.randint(0, 8, (2, 5))}], sparsity=0.5)


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
@pytest.mark.parametrize("allocation", ["uniform", "owl"])
def test_dense_input_pruning_feeds_each_block_the_dense_models_inputs(family, allocation, monkeypatch):
    model = build(family)
    data = batches()
    reference = hooked_calls(model, data)
    fed = fed_inputs(monkeypatch)
    prune_sequential(model, data, sparsity=0.5, criterion="wanda", reconstruct=False, sequential=False,
                     allocation=allocation)
    pruning = fed[-len(reference):]  # OWL's outlier pass comes first
    for i, calls in enumerate(reference):
        for b, (args, kwargs) in enumerate(calls):
            assert_same(args, pruning[i][b][0], f"{family} block {i} args")
            assert_same(kwargs, pruning[i][b][1], f"{family} block {i} kwargs")
