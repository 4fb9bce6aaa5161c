"""Run llama.cpp's own converter (``convert_hf_to_gguf.py``'s model classes) on a transformers folder.

Run as a script by :mod:`relprune.llm.gguf`, in a process of its own: the converter imports the
``gguf-py`` that ships beside it, which must not replace the ``gguf`` package of the calling process.
With ``--sizes`` (a shrunk model whose layers differ), the Llama folder is written through llama.cpp's
``deci`` architecture, the Llama block whose loader and graph read a head count, a key/value head count
and a feed-forward length per layer; the tensors go through the converter's own name map and rotary
permutation, per layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--sizes", type=Path)
    parser.add_argument("--outtype", required=True)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.llama_cpp / "gguf-py"))
    sys.path.insert(0, str(args.llama_cpp))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from conversion.base import TextModel
    from conversion.deci import DeciModel
    from conversion.llama import LlamaModel

    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    hparams = ModelBase.load_hparams(args.folder, False)
    if args.sizes is None:
        model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    else:
        sizes = json.loads(args.sizes.read_text())
        layers = sizes["layers"]
        heads = [int(s["num_attention_heads"]) for s in layers]
        kv_heads = [int(s["num_key_value_heads"]) for s in layers]
        widths = [int(s["intermediate_size"]) for s in layers]
        head_dim = int(sizes["head_dim"])

        class PerLayerLlama(DeciModel):
            """A Llama folder whose layers differ in size, as llama.cpp's ``deci`` model."""

            model_arch = gguf.MODEL_ARCH.DECI

            def __init__(self, *a, **kw):
                TextModel.__init__(self, *a, **kw)  # DeciModel's own reads Nemotron's block_configs
                self.origin_hf_arch = hparams.get("architectures", [None])[0]  # read by LlamaModel.set_vocab

            def set_vocab(self):
                LlamaModel.set_vocab(self)

            def set_gguf_parameters(self):
                per_layer = {"num_attention_heads": heads, "num_key_value_heads": kv_heads,
                             "intermediate_size": widths, "head_dim": head_dim}
                saved = dict(self.hparams)
                self.hparams.update(per_layer)
                try:
                    TextModel.set_gguf_parameters(self)
                finally:
                    self.hparams = saved
                self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
                self.gguf_writer.add_rope_dimension_count(head_dim)

            def modify_tensors(self, data_torch, name, bid):
                if bid is not None and name.endswith(("q_proj.weight", "q_proj.bias")):
                    data_torch = DeciModel.permute(data_torch, heads[bid], heads[bid])
                if bid is not None and name.endswith(("k_proj.weight", "k_proj.bias")):
                    data_torch = DeciModel.permute(data_torch, heads[bid], kv_heads[bid])
                yield from super(DeciModel, self).modify_tensors(data_torch, name, bid)

        model_class = PerLayerLlama
    with torch.inference_mode():
        model = model_class(args.folder, ftypes[args.outtype], args.out)
        model.write()


if __name__ == "__main__":
    main()
