"""Helios 14B transformer (Base, Mid and Distilled share one architecture; spec §1.1).

    helios-jax ... --config configs/models/helios_14b.py --config.remat_policy=full
"""
from helios_jax.models.transformer_config import transformer_config


def get_config(arg=None):
    del arg  # No variants: the three releases differ in weights and sampler only.
    return transformer_config()
