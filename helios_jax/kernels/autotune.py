"""`impl="auto"`: the attention implementation measured fastest for a shape on this backend.

The first time a (backend, q shape, k shape, dtype) is traced, every candidate that supports it
is compiled and timed on random inputs of that shape (forward only: sampling is the hot path),
and the fastest is remembered for the rest of the process. A candidate that fails to compile or
run (a kernel the local compiler rejects, an out-of-memory) is dropped and its buffers let go,
so it never breaks `auto`. Each measurement prints to stderr, once per shape, what was dropped
and why and what was chosen with the timings. Set `HELIOS_ATTENTION_AUTOTUNE=0` to skip the
measurement and take the first supported candidate of `PREFERENCE` (jax's hardware-tested splash
kernel first on a TPU, then our untimed one).
"""
from __future__ import annotations

import gc
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

from helios_jax.distributed import log

# Candidates per backend, in order of preference when nothing is measured.
PREFERENCE = {"gpu": ("cudnn", "pallas_gpu", "xla"), "tpu": ("splash_tpu", "pallas_tpu", "xla"), "cpu": ("xla",)}
_REPEATS = 5
_chosen: dict[tuple, str] = {}


def autotune_enabled(environ=os.environ) -> bool:
    return environ.get("HELIOS_ATTENTION_AUTOTUNE", "1") not in ("0", "false", "no")


def choose(q_shape, k_shape, dtype, *, supported: Callable[[str], bool], run: Callable[[str, tuple], jax.Array],
           backend: str | None = None, measure: bool | None = None) -> str:
    """The implementation for this shape: measured once (`run(impl, (q, k, v))` executes one
    candidate eagerly), or the first supported one in `PREFERENCE` when `measure` is off.

    When every candidate fails it warns and returns "xla" (generation goes on), unless "xla"
    was among the failures: then there is nothing left to run and it raises RuntimeError."""
    backend = backend or jax.default_backend()
    candidates = [impl for impl in PREFERENCE.get(backend, ("xla",)) if supported(impl)] or ["xla"]
    if len(candidates) == 1 or not (autotune_enabled() if measure is None else measure):
        return candidates[0]
    key = (backend, tuple(q_shape), tuple(k_shape), np.dtype(dtype).name)
    if key not in _chosen:
        _chosen[key] = _measure(key, candidates, run)
    return _chosen[key]


def _measure(key, candidates, run) -> str:
    """Time the candidates, report the outcome on stderr, and return the fastest that ran."""
    _, q_shape, k_shape, dtype = key
    timings, failures = _time_candidates(candidates, q_shape, k_shape, dtype, run)
    shape = _describe(key)
    for impl, reason in failures.items():
        _report(f"attention autotune {shape}: dropped {impl}: {reason}")
    if timings:
        best = min(timings, key=timings.get)
        measured = ", ".join(f"{impl} {seconds * 1e3:.3f} ms" for impl, seconds in timings.items())
        _report(f"attention autotune {shape}: chose {best} ({measured})")
        return best
    summary = "; ".join(f"{impl}: {reason}" for impl, reason in failures.items())
    if "xla" in failures:
        raise RuntimeError(f"attention autotune {shape}: every candidate failed, xla included ({summary})")
    _report(f"WARNING: attention autotune {shape}: every candidate failed ({summary}); falling back to xla")
    return "xla"


def _time_candidates(candidates, q_shape, k_shape, dtype, run) -> tuple[dict[str, float], dict[str, str]]:
    """{impl: seconds per forward} of those that ran, {impl: why} of those that did not."""
    timings, failures = {}, {}
    # Evaluated eagerly even when called while a jit is being traced: these are real runs.
    with jax.ensure_compile_time_eval():
        rng = np.random.default_rng(0)
        qkv = tuple(jax.device_put(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
                    for shape in (q_shape, k_shape, k_shape))
        for impl in candidates:
            try:
                timings[impl] = _time_one(impl, qkv, run)
            except Exception as error:  # noqa: BLE001 - a candidate this compiler or device rejects is dropped
                failures[impl] = _first_line(error)
            if impl in failures:
                # Outside the except block, where the traceback is let go: the failed candidate's
                # buffers (outputs, frames) are freed before the next one runs.
                gc.collect()
    return timings, failures


def _time_one(impl, qkv, run) -> float:
    run(impl, qkv).block_until_ready()  # compile and warm up; the output is dropped at once
    start = time.perf_counter()
    for _ in range(_REPEATS):
        out = run(impl, qkv)
    out.block_until_ready()
    return (time.perf_counter() - start) / _REPEATS


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _describe(key) -> str:
    backend, q_shape, k_shape, dtype = key
    return f"[{backend} q{q_shape} k{k_shape} {dtype}]"


def _report(message: str) -> None:
    log(message, file=sys.stderr)  # process 0 only; sys.stderr looked up now (tests capture it)


def chosen() -> dict[tuple, str]:
    """What `auto` picked so far, per (backend, q shape, k shape, dtype) (for benchmarks and logs)."""
    return dict(_chosen)
