"""`dot_product_attention`: one entry point, several implementations.

Layout and meaning are those of `jax.nn.dot_product_attention`: q, k, v are [B, L, heads, head_dim],
no mask, scale 1/sqrt(head_dim), softmax accumulated in fp32.
"""
from __future__ import annotations

import functools

import jax

from helios_jax.kernels import autotune

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_tpu")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", interpret: bool = False):
    """Attention over [B, L, H, D] tensors; differentiable for every implementation.

    impl: "xla" (portable reference), "cudnn" (NVIDIA GPUs, bf16/fp16 flash attention),
    "pallas_gpu" / "pallas_tpu" (our flash-attention kernels), "auto" (the fastest measured one
    that supports the backend, dtype and head size: `helios_jax.kernels.autotune`). `interpret`
    runs a Pallas kernel on the CPU.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLEMENTATIONS)}; got {impl!r}")
    if impl == "auto":
        impl = _auto_impl(q, k)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU; this backend is {jax.default_backend()}")
        if q.dtype.name not in ("bfloat16", "float16"):
            raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 q/k/v, got {q.dtype}")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if impl == "pallas_tpu":
        from helios_jax.kernels import flash_tpu  # imported on use: Mosaic TPU lowering is only needed here

        return flash_tpu.flash_attention(q, k, v, interpret=interpret)
    from helios_jax.kernels import flash_gpu  # impl == "pallas_gpu"

    return flash_gpu.flash_attention(q, k, v, interpret=interpret)


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
    if impl == "pallas_tpu":
        return backend == "tpu" and head_dim % 128 == 0
    return False


@functools.cache
def _jitted(impl: str):
    return jax.jit(functools.partial(dot_product_attention, impl=impl))
