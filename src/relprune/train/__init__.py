"""Training networks so that they prune well: regularisers that work in any training loop."""
