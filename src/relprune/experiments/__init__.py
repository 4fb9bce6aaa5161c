"""The experiment side: datasets, reference models, training loops, sweeps and reports (the command is
``relprune.cli``).

Built on the public API; nothing in ``relprune.core``, ``train`` or ``deploy`` imports it, and
``import relprune`` does not load it (or matplotlib and scikit-learn, which it uses lazily).
"""
