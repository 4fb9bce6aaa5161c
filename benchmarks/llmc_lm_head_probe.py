"""Does LLM Compressor's ``ignore=["lm_head"]`` keep a tied lm_head (and so the embeddings) dense?

    /tmp/peer/bin/python benchmarks/llmc_lm_head_probe.py lm_head        # as ../shared/PEERS.md calls it
    /tmp/peer/bin/python benchmarks/llmc_lm_head_probe.py 're:.*lm_head'  # the pattern its warning suggests

A tiny random Llama with tied embeddings (SmolLM2's tokenizer, for the vocabulary), Wanda at 50%.
With llmcompressor 0.14.0.1 on 2026-11-27: "lm_head" -> lm_head and embed_tokens 50% zeros (the
module is matched under the name "lm_head." so the ignore never applies); "re:.*lm_head" -> 0%.
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier

IGNORE = sys.argv[1] if len(sys.argv) > 1 else "lm_head"
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=True)
model = transformers.LlamaForCausalLM(cfg)
d = tempfile.mkdtemp()
model.save_pretrained(d)
# The folder relprune converts SmolLM2's GGUF into (`relprune llm eval --model smollm2-135m` makes it).
tok = transformers.AutoTokenizer.from_pretrained(sorted(Path.home().glob(".cache/relprune/models/SmolLM2-*"))[0])
tok.save_pretrained(d)
ids = torch.randint(0, 49152, (4, 32))
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
out = tempfile.mkdtemp()
m = oneshot(model=d, dataset=ds, num_calibration_samples=4, max_seq_length=32,
            recipe=WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=[IGNORE]),
            output_dir=out)
print("lm_head zeros", float((m.lm_head.weight == 0).float().mean()),
      "embed zeros", float((m.model.embed_tokens.weight == 0).float().mean()),
      "tied", m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr())
