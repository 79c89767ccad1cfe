"""`dot_product_attention`: one entry point, several implementations.

Layout and meaning are those of `jax.nn.dot_product_attention`: q, k, v are [B, L, heads, head_dim],
no mask, scale 1/sqrt(head_dim), softmax accumulated in fp32.
"""
from __future__ import annotations

import jax

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_tpu")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", interpret: bool = False):
    """Attention over [B, L, H, D] tensors; differentiable for every implementation.

    impl: "xla" (portable reference), "cudnn" (NVIDIA GPUs, bf16/fp16 flash attention), "auto"
    (the fastest one that supports the platform and dtype). `interpret` is for the Pallas kernels.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLEMENTATIONS)}; got {impl!r}")
    if impl == "auto":
        impl = _auto_impl(q)
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


def _auto_impl(q: jax.Array) -> str:
    # cuDNN flash attention is the fast path on NVIDIA GPUs; it takes half-precision inputs only.
    head_dim = q.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and q.dtype.name in ("bfloat16", "float16")
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"
