"""The library's and the CLI's defaults, fixed by the benchmark study (docs/results.md).

They live here, in the core, so ``prune`` and the command line cannot drift apart.
"""

#: Var[c_ij] / sum_k Var[c_ik]: the best of the contribution criteria over the study's models.
DEFAULT_CRITERION = "contrib-share"
#: One threshold over all layers: layer and row budgets lose by tens of points at 90%+.
DEFAULT_SCOPE = "global"
#: Statistics over the samples where the neuron is live (see docs/results.md for where it hurts).
DEFAULT_LIVENESS = True
#: Bias compensation off (see docs/results.md).
DEFAULT_BIAS_COMPENSATION = False
