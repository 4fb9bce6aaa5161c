"""From a masked model to a smaller one: structural shrink, structured pruning, export formats."""
