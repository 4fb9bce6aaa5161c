"""Language models: loading (HF folder, hub id, GGUF), text windows, block-by-block pruning (``oneshot``:
model and text to a saved pruned folder in one call), perplexity.

Needs the ``llm`` extra (transformers, gguf, accelerate), imported only when a function here runs.
"""

from .known import GEMMA3, KNOWN_TEXTS, SMOLLM2, known_text
from .load import load_causal_lm, load_model, resolve_model
from .oneshot import OneshotResult, oneshot
from .perplexity import Perplexity, perplexity
from .save import save_pretrained
from .sequential import decoder_blocks, prune_sequential
from .streamed import prune_streamed
from .text import calibration_windows, evaluation_windows, tokenize_file

__all__ = [
    "GEMMA3",
    "KNOWN_TEXTS",
    "SMOLLM2",
    "OneshotResult",
    "Perplexity",
    "calibration_windows",
    "decoder_blocks",
    "evaluation_windows",
    "known_text",
    "load_causal_lm",
    "load_model",
    "oneshot",
    "perplexity",
    "prune_sequential",
    "prune_streamed",
    "resolve_model",
    "save_pretrained",
    "tokenize_file",
]
