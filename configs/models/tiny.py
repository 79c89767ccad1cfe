"""A tiny Helios transformer (the diffusers unit-test shape) for CPU tests and `--model tiny-random`.

    --config configs/models/tiny.py              fp32 (the default for tests)
    --config configs/models/tiny.py:bfloat16     the same shape in bf16
"""
from helios_jax.models.transformer_config import TINY, transformer_config


def get_config(arg=None):
    return transformer_config(**{**TINY, **({"dtype": arg} if arg else {})})
