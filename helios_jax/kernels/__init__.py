"""Attention kernels and the one dispatch function every model calls."""
from helios_jax.kernels.dispatch import IMPLEMENTATIONS, dot_product_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]
