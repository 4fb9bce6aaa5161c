"""The library's and the CLI's defaults, fixed by the benchmark study (docs/results.md).

They live here, a top-level module every part may import (``core`` included), so ``prune`` and the command
line cannot drift apart.
"""

#: The variance share (ours) was the criterion closest to each column's best over the study's
#: one-shot and fine-tuned columns (docs/results.md, "The vision study"): one-shot it beat
#: magnitude on average, and with the re-fit (``reconstruct=True``) it was best or tied in every
#: column; fine-tuned it was nearest the best of every criterion. For gradual and iterative
#: schedules ``rc-flow`` (ours) was closer, then SNIP and magnitude.
DEFAULT_CRITERION = "contrib-share"
#: One budget over all layers: per-layer budgets lost up to 73 points one-shot (paired, mean over
#: criteria), e.g. 38 on LeNet-300-100 at 90%.
DEFAULT_SCOPE = "global"
#: Statistics over the samples where the neuron is live: they helped both LeNet-5 pairs (up to 14.5
#: points at 90%) and the VGG net at 95-98%; only LeNet-300-100 did better without at 90-95%.
DEFAULT_LIVENESS = True
#: Off: the re-fit restores the removed mean and more. Without a re-fit it helped the MNIST nets up
#: to 90% one-shot (3 to 12 points) and hurt at 95-98%.
DEFAULT_BIAS_COMPENSATION = False
#: ``relprune prune``: re-fit the kept weights by least squares on the calibration inputs when the
#: pruned model is used as it is ("auto": not before a fine-tune, which undoes the re-fit's gain).
DEFAULT_RECONSTRUCT = "auto"
#: Language models (``relprune llm``, ``relprune.llm.prune_sequential``): the best recipe of the
#: one-shot frontier benchmark (docs/results.md, "The one-shot frontier on two families",
#: 16 x 512 Shakespeare calibration tokens, held-out Shakespeare / Botchan perplexity):
#: ADMM with ALPS's penalty schedule, the same count per row, then the exact re-fit on its support.
#: SmolLM2-135M (3 calibration seeds): 52.8 / 56.0 at 50% against SparseGPT's 62.6 / 62.3; 66.5 / 95.9
#: at 2:4 against 84.3 / 123.8; seed 0: 63.8 / 90.2 at 60% and 87.6 / 163.7 at 70% against 86.9 / 122.5
#: and 152.6 / 240.1; the previous default (OBS saliency + exact re-fit) 55.2 / 57.9 at 50%.
#: Gemma 3 270M (seed 0): 157.9 / 150.9 at 50% against SparseGPT's 197.3 / 176.1 and Wanda's
#: 227.4 / 220.1; 214.7 / 304.7 at 70% against 366.3 / 430.8. One default for both families and all
#: patterns; it costs 2.0-2.3x the prune time of SparseGPT as published, idle (SmolLM2 222 s against 114 s at 50%,
#: 217 against 96 at 2:4; Gemma 3 250 against 115 and 242 against 109; 1.3-1.6x SparseGPT followed by our exact
#: re-fit; docs/results.md, "Cholesky ridge steps, the same bits under any load", issue 32).
DEFAULT_LLM_CRITERION = "admm"
#: The exact least-squares re-fit, with its damping pulling toward the dense weights: what every
#: mask-first criterion gets by default (ADMM's weights already are it, so it adds nothing there).
DEFAULT_LLM_RECONSTRUCT = "exact"
#: Compared within each output row, as the Wanda and SparseGPT reference code do.
DEFAULT_LLM_SCOPE = "row"

#: How a pruned language model is saved (``relprune llm prune --save-format``, ``save_pretrained``,
#: ``oneshot``, streamed pruning): a plain transformers folder in the model's dtype, zeros stored. It is
#: the only layout every reader loads exactly: with the previous default (compressed-tensors'
#: ``sparse-bitmask``), transformers 5.25 with compressed-tensors 0.20.1 loaded SmolLM2 at 50% without an
#: error as another model (max logit difference 90.8); now 0 in every reader (docs/results.md, "Safe
#: folders"). ``"compressed"`` (0.63 of the bytes at 50%) is read by relprune alone and refused by the rest.
DEFAULT_LLM_SAVE_FORMAT = "dense"

#: Seeds the commands and the bench accept: whole numbers below this (data splits and calibration
#: draws add small offsets, and torch takes 64 bits).
MAX_SEED = 2**62

#: Structured language-model pruning (``relprune llm shrink``): FLAP's fluctuation score with its
#: bias compensation, the best of the structured benchmark on SmolLM2-135M (docs/results.md,
#: "Structured pruning of real architectures": 57.9 / 84.9 perplexity at 20% / 30% of the decoder's
#: parameters removed, against our share score's 57.9 / 87.3).
DEFAULT_LLM_UNIT_SCORE = "fluctuation"
#: ``llm shrink --scope joint``'s unit score: the share of each output's contribution variance (ours). SmolLM2-135M,
#: 33% of the decoder projections removed, 16 calibration windows, seed 0 (docs/results.md, "Width and depth in
#: one plan"): perplexity 62.1 Shakespeare / 74.3 Botchan, against 72.0 / 87.7 for FLAP's fluctuation in the same
#: plan and 66.1 / 98.9 for the uniform plan's default.
DEFAULT_LLM_JOINT_SCORE = "share"
#: ``llm shrink --round-to`` and the plans' ``round_to``: MLP widths kept a multiple of this. llama.cpp decode
#: on SmolLM2-135M, each MLP cut to a width and its neighbour multiple of 32 (benchmarks/gguf_widths.py,
#: docs/results.md "MLP widths in llama.cpp"): 1536 / 1120 / 1024 / 896 channels decode 3-31% faster (median
#: 12%) than 1535 / 1126 / 1000 / 887 at Q8_0 and Q4_K_M, 2 threads and 1, in all 16 comparisons; a multiple of
#: 128 (1152) bought nothing over one of 32 (1120).
DEFAULT_LLM_ROUND_TO = 32

#: Block-by-block walks fit torch's thread count to the cores other processes leave free, block by block
#: (relprune.core.threads.SharedCores): on a shared machine a product split over a core another process holds
#: waits for it. The whole default prune of SmolLM2 at 50% took 1.65x its idle time beside one busy process with
#: it, 2.32x before (docs/results.md, "Steady cost and allocation by layer errors", issue 32; one round).
DEFAULT_FIT_THREADS = True

#: ``allocation="search"`` (relprune.llm.search, an option; uniform stays the default allocation): candidates
#: scored per run by default (the layer-error start included), each one forward pass on the search windows
#: below. At 70% it took 118 s on SmolLM2-135M (the rest of the prune 312 s) and 322 s on Gemma 3 270M (its
#: uniform prune 280 s), and lost to its own start in three of four cells (docs/results.md, "Two busy
#: processes, allocation by search, models beyond 300M", issue 32); at 80% on Gemma 3, 233.5 s against 171 s for
#: the uniform prune. Uniform stays the default allocation: at 60/70/80% on both families and both domains, OWL,
#: the contribution entropy, the layer errors and the search each lose to it by 3.6% or more somewhere (OWL
#: +31.5% on Gemma's Botchan at 80%, the search +4.4% / +4.2% on Gemma at 60%; docs/results.md, "Both
#: families beside busy processes, the allocation table at 60/70/80%", issue 32).
DEFAULT_SEARCH_EVALUATIONS = 64
#: The search scores a candidate on this many calibration windows ...
SEARCH_WINDOWS = 2
#: ... each cut to this many tokens (KL divergence from the dense model, per token).
SEARCH_TOKENS = 256
#: One level switch of the search moves a block's attention or MLP part by this much sparsity (and another part
#: by as many weights the other way).
SEARCH_STEP = 0.02
