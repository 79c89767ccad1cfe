"""Training: optimizer, trainer loop, checkpoints (spec training.md)."""
