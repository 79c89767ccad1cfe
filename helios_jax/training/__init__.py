"""Training: data loading, losses and the train loop (spec training.md)."""
