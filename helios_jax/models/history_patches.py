"""The history patchers of a Helios model started from Wan2.1, derived from its `patch_embedding`
(training spec §1 item 1, decision §11.1: copied after loading, not from a random init).

patch_short is the patch embedding itself. patch_mid (kernel 2x the patch) and patch_long (4x) get
the patch kernel with every tap repeated 2x2x2 (4x4x4) and divided by 8 (64): applied to a latent,
that is the patch embedding of the latent average-pooled 2x2x2 (4x4x4), so all three terms start
on the token scale the transformer was trained on. Biases are copied.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HISTORY_PATCHERS = ("patch_short", "patch_mid", "patch_long")
POOL_FACTORS = {"patch_short": 1, "patch_mid": 2, "patch_long": 4}


def pooled_kernel(kernel: jax.Array, factor: int) -> jax.Array:
    """A [kT, kH, kW, C, D] patch kernel as the kernel (factor x larger on each axis) of
    "average-pool factor^3, then this patch conv"."""
    for axis in range(3):
        kernel = jnp.repeat(kernel, factor, axis=axis)
    return kernel / factor**3


def derive_history_patches(model):
    """Set `model`'s patch_short/mid/long from its patch_embedding, in place (shardings kept);
    returns the model. The model must have the patchers (has_multi_term_memory_patch=True)."""
    if not model.config.has_multi_term_memory_patch:
        raise ValueError("derive_history_patches: the model has no history patchers (has_multi_term_memory_patch=false)")
    source = model.patch_embedding
    for name in HISTORY_PATCHERS:
        patcher = getattr(model, name)
        kernel = pooled_kernel(source.kernel[...].astype(jnp.float32), POOL_FACTORS[name])
        _assign(patcher.kernel, kernel)
        _assign(patcher.bias, source.bias[...])
    return model


def _assign(variable, value: jax.Array) -> None:
    current = variable[...]
    if value.shape != current.shape:
        raise ValueError(f"derive_history_patches: derived shape {value.shape} != parameter shape {current.shape}")
    # A fresh buffer on the placement the loader chose (a mesh sharding): the copied bias must not
    # alias patch_embedding's, or a train step that donates both would donate one buffer twice.
    sharding = current.sharding if isinstance(current, jax.Array) else None
    variable.set_value(jax.device_put(value.astype(current.dtype), sharding, may_alias=False))
