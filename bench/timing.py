"""Timing helpers shared by the benchmarks: median wall time and the device's matmul rate."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def time_call(fn, iters: int) -> float:
    """Median seconds of `fn()` over `iters` runs, after one untimed call (compile, warm-up)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_rate(dtype, size: int) -> float:
    """FLOP/s of a square matmul: the practical peak that MFU-like fractions are taken against."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a: a @ a)
    seconds = time_call(lambda: matmul(a), 5)
    return 2 * size**3 / seconds
