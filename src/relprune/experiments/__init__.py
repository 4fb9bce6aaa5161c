"""The experiment side: datasets, reference models, training loops, sweeps, reports and the command.

Built on the public API; nothing in ``relprune.core``, ``train`` or ``deploy`` imports it, and
``import relprune`` does not load it (or matplotlib and scikit-learn, which it uses lazily).
"""
