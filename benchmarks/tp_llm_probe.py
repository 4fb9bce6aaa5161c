"""Does Torch-Pruning's MetaPruner prune a (tiny, random) transformers Llama here? A probe, not a benchmark.

    timeout 300 python benchmarks/tp_llm_probe.py; echo $?

Builds a 2-layer LlamaForCausalLM from a config and asks MetaPruner (torch-pruning 1.6.1) for 30%
of its heads (GQA-aware through ``num_heads``) and channels, as Torch-Pruning's LLM example does.
On 2026-11-27 with transformers 5.24 and torch 2.13 (CPU) it had not finished after 300 s (exit 124).
"""

import torch
import torch_pruning as tp
import transformers

torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 50, (1, 16))
num_heads = {}
for name, m in model.named_modules():
    if name.endswith("self_attn"):
        num_heads[m.q_proj] = model.config.num_attention_heads
        num_heads[m.k_proj] = model.config.num_key_value_heads
        num_heads[m.v_proj] = model.config.num_key_value_heads
before = sum(p.numel() for p in model.parameters())
pruner = tp.pruner.MetaPruner(model, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
    pruning_ratio=0.3, ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
    head_pruning_ratio=0.3, global_pruning=False, round_to=None,
    output_transform=lambda out: out.logits if hasattr(out, "logits") else out[0])
pruner.step()
print(before, sum(p.numel() for p in model.parameters()))
first = model.model.layers[0]
print(first.self_attn.q_proj.weight.shape, first.mlp.gate_proj.weight.shape, first.input_layernorm.weight.shape)
print(model(ids).logits.shape)
