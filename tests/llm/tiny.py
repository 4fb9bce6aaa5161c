"""The tiny random Llama, its word-level tokenizer and token batches the language-model tests share (built
from a config, never downloaded)."""


from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")


WORDS = ["the", "king", "queen", "lord", "speak", "thou", "art", "my", "good", "sir", "love", "and", "to", "of",
         "what", "is", "a", "in", "that", "with"]


def tiny_llama(tie: bool = True, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def ids_batches(n=2, seqlen=12, pad_last=0):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, len(WORDS) + 2, (3, seqlen), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[-1, -pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
