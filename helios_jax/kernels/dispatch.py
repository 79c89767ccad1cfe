"""`dot_product_attention`: one entry point, several implementations.

Layout and meaning are those of `jax.nn.dot_product_attention`: q, k, v are [B, L, heads, head_dim],
no mask, scale 1/sqrt(head_dim), softmax accumulated in fp32.
"""
from __future__ import annotations

import functools
import os

import jax

from helios_jax.kernels import autotune

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_tpu", "splash_tpu")
# HELIOS_ATTENTION_IMPL=<impl> turns every impl="auto" into <impl> (a way past the measurement).
FORCE_VARIABLE = "HELIOS_ATTENTION_IMPL"
# The backends an implementation runs on natively (None: all of them).
_BACKENDS = {"xla": None, "cudnn": "gpu", "pallas_gpu": "gpu", "pallas_tpu": "tpu", "splash_tpu": "tpu"}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", interpret: bool = False):
    """Attention over [B, L, H, D] tensors; differentiable for every implementation.

    impl: "xla" (portable reference), "cudnn" (NVIDIA GPUs, bf16/fp16 flash attention),
    "pallas_gpu" / "pallas_tpu" (our flash-attention kernels), "splash_tpu" (jax's splash
    attention kernels for TPU), "auto" (what HELIOS_ATTENTION_IMPL forces, otherwise the fastest
    measured one that supports the backend, dtype and head size: `helios_jax.kernels.autotune`).
    `interpret` runs a Pallas kernel on the CPU.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLEMENTATIONS)}; got {impl!r}")
    if impl == "auto":
        impl = forced_impl() or _auto_impl(q, k)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU; this backend is {jax.default_backend()}")
        if q.dtype.name not in ("bfloat16", "float16"):
            raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 q/k/v, got {q.dtype}")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    # The kernels are imported on use: their Pallas lowerings are only needed here.
    if impl == "pallas_tpu":
        from helios_jax.kernels import flash_tpu

        return flash_tpu.flash_attention(q, k, v, interpret=interpret)
    if impl == "splash_tpu":
        from helios_jax.kernels import splash_tpu

        return splash_tpu.splash_attention(q, k, v, interpret=interpret)
    from helios_jax.kernels import flash_gpu  # impl == "pallas_gpu"

    return flash_gpu.flash_attention(q, k, v, interpret=interpret)


def forced_impl(environ=os.environ, backend: str | None = None) -> str | None:
    """The implementation HELIOS_ATTENTION_IMPL makes `impl="auto"` resolve to, or None when it
    is unset, empty or "auto". ValueError for a value that is not an implementation or one that
    does not run on `backend` (default: this one), so a typo fails at once instead of silently."""
    value = environ.get(FORCE_VARIABLE, "").strip()
    if value in ("", "auto"):
        return None
    allowed = IMPLEMENTATIONS[1:]
    if value not in allowed:
        raise ValueError(f"{FORCE_VARIABLE} must be one of {', '.join(allowed)} (or auto/unset); got {value!r}")
    backend = backend or jax.default_backend()
    needed = _BACKENDS[value]
    if needed is not None and needed != backend:
        raise ValueError(f"{FORCE_VARIABLE}={value} is not supported on this backend ({backend}): "
                         f"it runs on {needed} only")
    return value


def _auto_impl(q: jax.Array, k: jax.Array) -> str:
    return autotune.choose(q.shape, k.shape, q.dtype, supported=lambda impl: supports(impl, q),
                           run=lambda impl, qkv: _jitted(impl)(*qkv))


def supports(impl: str, q: jax.Array, backend: str | None = None) -> bool:
    """Whether `impl` runs natively for q's dtype and head size on `backend` (default: this one)."""
    backend = backend or jax.default_backend()
    head_dim, half = q.shape[-1], q.dtype.name in ("bfloat16", "float16")
    if impl == "xla":
        return True
    if impl == "cudnn":  # cuDNN flash attention: half precision, head size a multiple of 8 up to 128
        return backend == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
    if impl == "pallas_gpu":
        return backend == "gpu" and head_dim in (64, 128)
    if impl in ("pallas_tpu", "splash_tpu"):  # lane-aligned head sizes (Helios: 128)
        return backend == "tpu" and head_dim % 128 == 0
    return False


@functools.cache
def _jitted(impl: str):
    return jax.jit(functools.partial(dot_product_attention, impl=impl))
