"""`impl="auto"`: the attention implementation measured fastest for a shape on this backend.

The first time a (backend, q shape, k shape, dtype) is traced, every candidate that supports it
is compiled and timed on random inputs of that shape (forward only: sampling is the hot path),
and the fastest is remembered for the rest of the process. A candidate that fails to compile or
run is dropped, so a kernel the local compiler rejects never breaks `auto`. Set
`HELIOS_ATTENTION_AUTOTUNE=0` to skip the measurement and take the first supported candidate of
`PREFERENCE` (the order the benchmarks in docs/benchmarks.md suggest).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import numpy as np

# Candidates per backend, in order of preference when nothing is measured.
PREFERENCE = {"gpu": ("cudnn", "pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)}
_REPEATS = 5
_chosen: dict[tuple, str] = {}


def autotune_enabled(environ=os.environ) -> bool:
    return environ.get("HELIOS_ATTENTION_AUTOTUNE", "1") not in ("0", "false", "no")


def choose(q_shape, k_shape, dtype, *, supported: Callable[[str], bool], run: Callable[[str, tuple], jax.Array],
           backend: str | None = None, measure: bool | None = None) -> str:
    """The implementation for this shape: measured once (`run(impl, (q, k, v))` executes one
    candidate eagerly), or the first supported one in `PREFERENCE` when `measure` is off."""
    backend = backend or jax.default_backend()
    candidates = [impl for impl in PREFERENCE.get(backend, ("xla",)) if supported(impl)] or ["xla"]
    if len(candidates) == 1 or not (autotune_enabled() if measure is None else measure):
        return candidates[0]
    key = (backend, tuple(q_shape), tuple(k_shape), np.dtype(dtype).name)
    if key not in _chosen:
        _chosen[key] = _fastest(candidates, q_shape, k_shape, dtype, run)
    return _chosen[key]


def _fastest(candidates, q_shape, k_shape, dtype, run) -> str:
    # Evaluated eagerly even when called while a jit is being traced: these are real runs.
    with jax.ensure_compile_time_eval():
        rng = np.random.default_rng(0)
        q, k, v = (jax.device_put(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
                   for shape in (q_shape, k_shape, k_shape))
        timings = {}
        for impl in candidates:
            try:
                run(impl, (q, k, v)).block_until_ready()  # compile and warm up
                start = time.perf_counter()
                for _ in range(_REPEATS):
                    out = run(impl, (q, k, v))
                out.block_until_ready()
                timings[impl] = (time.perf_counter() - start) / _REPEATS
            except Exception:  # noqa: BLE001 - a candidate this compiler or device rejects is skipped
                continue
    if not timings:
        return "xla"
    return min(timings, key=timings.get)


def chosen() -> dict[tuple, str]:
    """What `auto` picked so far, per (backend, q shape, k shape, dtype) (for benchmarks and logs)."""
    return dict(_chosen)
