"""The method: statistics on data, criteria, budgets, masks and the prune step.

Imports torch, numpy and ``relprune.errors`` / ``relprune.defaults`` only; every other
part of relprune is built on top of this package, never the other way round.
"""
