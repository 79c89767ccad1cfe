"""Attention kernels and the dispatch functions every model calls."""
from helios_jax.kernels.dispatch import IMPLEMENTATIONS, dot_product_attention
from helios_jax.kernels.sequence_parallel import self_attention, sequence_parallel_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention", "self_attention", "sequence_parallel_attention"]
