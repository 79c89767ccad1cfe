"""Time attention implementations at the Helios shapes; print ms, TFLOP/s and the ratio to a baseline.

For every implementation available on this backend and every shape: forward, and forward+backward
(the vjp of all three inputs), median over --iters runs after a compile/warm-up call.

  * FLOPs: forward 4*B*H*Lq*Lk*D (two matmuls); backward counted as 2.5x the forward (five matmuls,
    FlashAttention's convention), so forward+backward is 3.5x the forward.
  * ratio = baseline time / this time (above 1: faster than the baseline). The baseline is measured
    in the same run: cudnn on GPU when it runs for the dtype, xla otherwise.
  * jax_reference_gpu is jax's own Pallas Triton kernel (jax.experimental.pallas.ops.gpu.attention):
    it needs lengths that are multiples of its blocks, so it runs on lengths padded up to a multiple
    of 128 with the padding left unmasked (same work, not the same result), and its fused backward
    needs equal q/k block counts, so it has no backward for cross-attention.

    python bench/attention.py                              # every impl at the Helios shapes, bf16
    python bench/attention.py --impl xla,pallas_gpu --dtype float32
    python bench/attention.py --shapes small --impl xla    # CPU smoke run
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py beside this file
from timing import time_call  # noqa: E402

from helios_jax.kernels import dot_product_attention  # noqa: E402

BACKWARD_FACTOR = 2.5  # backward FLOPs per forward FLOP
REFERENCE_BLOCK = 128  # jax's reference kernel: lengths padded to a multiple of this


@dataclass(frozen=True)
class Shape:
    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int

    @property
    def label(self) -> str:
        kind = "self" if self.q_len == self.kv_len else "cross"
        lengths = str(self.q_len) if kind == "self" else f"{self.q_len}x{self.kv_len}"
        return f"B{self.batch} {kind} {lengths}"

    @property
    def forward_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


def helios_shapes() -> list[Shape]:
    """40 heads of 128; self-attention over 2,940 / 4,560 / 11,040 tokens, cross-attention 8,640 x 512."""
    lengths = [(2940, 2940), (4560, 4560), (11040, 11040), (8640, 512)]
    return [Shape(b, lq, lk, 40, 128) for b in (1, 2) for lq, lk in lengths]


def small_shapes() -> list[Shape]:
    return [Shape(1, 200, 200, 2, 64), Shape(1, 77, 130, 2, 64)]


def implementations(backend: str) -> list[str]:
    impls = ["xla"]
    if backend == "gpu":
        impls += ["cudnn", "pallas_gpu", "jax_reference_gpu"]
    if backend == "tpu":
        impls += ["pallas_tpu"]
    return impls


def attention_fn(impl: str, shape: Shape):
    """(fn(q, k, v), note, has_backward) for one implementation, or a ValueError saying why not."""
    if impl in ("xla", "cudnn", "pallas_gpu", "pallas_tpu"):
        return (lambda q, k, v: dot_product_attention(q, k, v, impl=impl)), "", True
    if impl == "jax_reference_gpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as reference
        scale = 1.0 / math.sqrt(shape.head_dim)
        fn = lambda q, k, v: reference.mha(q, k, v, None, sm_scale=scale)
        padded = _padded(shape)
        note = "" if padded == shape else f"padded to {padded.q_len}x{padded.kv_len}, unmasked"
        return fn, note, padded.q_len == padded.kv_len
    raise ValueError(f"--impl: unknown implementation {impl!r}")


def _padded(shape: Shape) -> Shape:
    up = lambda n: -(-n // REFERENCE_BLOCK) * REFERENCE_BLOCK
    return Shape(shape.batch, up(shape.q_len), up(shape.kv_len), shape.heads, shape.head_dim)


def measure(impl: str, shape: Shape, dtype, iters: int) -> dict:
    """Seconds for forward and forward+backward ({} entries are None when the impl cannot run)."""
    fn, note, has_backward = attention_fn(impl, shape)
    run_shape = _padded(shape) if impl == "jax_reference_gpu" else shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((run_shape.batch, run_shape.q_len, shape.heads, shape.head_dim)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((run_shape.batch, run_shape.kv_len, shape.heads, shape.head_dim)), dtype)
            for _ in range(2))
    d_out = jnp.ones_like(q)
    forward = jax.jit(fn)
    forward_backward = jax.jit(lambda q, k, v, d_out: jax.vjp(fn, q, k, v)[1](d_out))
    result = {"note": note, "forward": None, "forward_backward": None}
    result["forward"] = _timed(lambda: forward(q, k, v), iters, result)
    if has_backward and result["forward"] is not None:
        result["forward_backward"] = _timed(lambda: forward_backward(q, k, v, d_out), iters, result)
    return result


def _timed(call, iters: int, result: dict) -> float | None:
    try:
        return time_call(call, iters)
    except Exception as error:  # noqa: BLE001 - an impl that cannot run this shape (dtype, memory) is reported
        message = str(error).strip().splitlines()[0][:80] if str(error).strip() else type(error).__name__
        result["note"] = (result["note"] + "; " if result["note"] else "") + f"failed: {message}"
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default=None,
                        help="comma-separated: xla,cudnn,pallas_gpu,pallas_tpu,jax_reference_gpu (default: all on "
                             "this backend)")
    parser.add_argument("--shapes", choices=("helios", "small"), default="helios")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    args.impls = args.impl.split(",") if args.impl else implementations(backend)
    known = {"xla", "cudnn", "pallas_gpu", "pallas_tpu", "jax_reference_gpu"}
    for impl in args.impls:
        if impl not in known:
            parser.error(f"--impl: unknown implementation {impl!r}; choose from {', '.join(sorted(known))}")
    return args


def choose_baseline(impls: list[str], backend: str, dtype) -> str:
    if backend == "gpu" and jnp.dtype(dtype) != jnp.float32 and "cudnn" in impls:
        return "cudnn"
    return "xla"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    baseline = choose_baseline(args.impls, backend, dtype)
    impls = [baseline] + [impl for impl in args.impls if impl != baseline]  # the baseline is timed first
    shapes = helios_shapes() if args.shapes == "helios" else small_shapes()
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, dtype {dtype.name}")
    print(f"FLOPs: forward 4*B*H*Lq*Lk*D, backward {BACKWARD_FACTOR}x forward; ratio = {baseline} time / impl time")
    header = (f"{'shape':<22} {'impl':<18} {'fwd ms':>9} {'fwd TF/s':>9} {'fwd ratio':>9} "
              f"{'f+b ms':>9} {'f+b TF/s':>9} {'f+b ratio':>9}  note")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        print(f"# {shape.label}: B={shape.batch} H={shape.heads} D={shape.head_dim} Lq={shape.q_len} Lk={shape.kv_len}")
        base = None
        for impl in impls:
            result = measure(impl, shape, dtype, args.iters)
            if impl == baseline:
                base = result
            flops = {"forward": shape.forward_flops, "forward_backward": shape.forward_flops * (1 + BACKWARD_FACTOR)}
            cells = []
            for phase in ("forward", "forward_backward"):
                seconds, base_seconds = result[phase], base[phase] if base else None
                if seconds is None:
                    cells += ["-", "-", "-"]
                    continue
                ratio = f"{base_seconds / seconds:.2f}" if base_seconds else "-"
                cells += [f"{seconds * 1e3:.3f}", f"{flops[phase] / seconds / 1e12:.2f}", ratio]
            print(f"{shape.label:<22} {impl:<18} " + " ".join(f"{c:>9}" for c in cells) + f"  {result['note']}")


if __name__ == "__main__":
    main()
