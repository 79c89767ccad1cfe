"""Time one Helios transformer forward; print seconds, TFLOP/s (spec §4 FLOP model) and ratios.

Baselines measured in the same run:
  * a square bf16/fp32 matmul of the run's dtype (the device's practical matmul rate), so
    `fraction of matmul rate` is an MFU-like figure;
  * with --torch-baseline, diffusers' HeliosTransformer3DModel on the same device, same shapes and
    dtype (random weights, native SDPA), run in a subprocess so the two frameworks never share memory.

    python bench/transformer.py --config helios_14b --latent-size 9,48,80 --dtype bfloat16 --attention cudnn
    python bench/transformer.py --config tiny --latent-size 9,16,16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for the torch baseline

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.config_flags import apply_overrides, load_config, split_overrides
from helios_jax.models.example_inputs import example_inputs, token_counts
from helios_jax.models.flops import transformer_flops
from helios_jax.models.forward import make_forward, parameter_count
from helios_jax.models.transformer import HeliosTransformer3DModel
from timing import matmul_rate, time_call


def parse_args(argv):
    argv, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="model config: a name (tiny, helios_14b) or PATH[:ARG]")
    parser.add_argument("--latent-size", default="9,48,80", help="current chunk T,H,W in latents (history at H,W)")
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--attention", default="xla,auto",
                        help="comma-separated impls to compare: xla,cudnn,pallas_gpu,pallas_tpu,auto")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--torch-baseline", action="store_true", help="also time diffusers (needs torch + diffusers)")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.latent_size = tuple(int(v) for v in args.latent_size.split(","))
    config = apply_overrides(load_config(args.config), overrides)
    if args.dtype:
        config.dtype = args.dtype
    return args, config


def time_torch(args, config):
    """Run this script as a torch worker and read back its median seconds per forward."""
    command = [sys.executable, __file__, "--torch-worker", "--config", args.config, "--latent-size",
               ",".join(map(str, args.latent_size)), "--iters", str(args.iters), "--dtype", config.dtype]
    command += ["--no-history"] if args.no_history else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"torch baseline failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def torch_worker(args, config):
    import torch
    from diffusers import HeliosTransformer3DModel as TorchHelios

    from helios_jax.models.transformer_config import DIFFUSERS_FIELDS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, config.dtype)
    fields = {k: config[k] for k in DIFFUSERS_FIELDS}
    with torch.device(device):
        model = TorchHelios(**fields).to(dtype).eval()
    inputs = {k: torch.from_numpy(np.asarray(v.astype(jnp.float32))).to(device)
              for k, v in example_inputs(config, args.latent_size, history=not args.no_history).items()}
    inputs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    inputs = {k: v[None] if k.startswith("indices") and v.ndim == 1 else v for k, v in inputs.items()}

    def run():
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": float(np.median(times))}))


def main(argv=None):
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    if args.torch_worker:
        return torch_worker(args, config)
    history = not args.no_history
    history_tokens, current_tokens = token_counts(config, args.latent_size, history=history)
    flops = transformer_flops(config, history_tokens, current_tokens)
    inputs = example_inputs(config, args.latent_size, history=history)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"config: {args.config}  dtype={config.dtype}  tokens={history_tokens}+{current_tokens}"
          f"={history_tokens + current_tokens}  FLOPs/forward={flops:.4e}")
    peak = matmul_rate(jnp.dtype(config.dtype), 8192 if jax.default_backend() == "gpu" else 1024)
    print(f"baseline matmul rate: {peak / 1e12:.1f} TFLOP/s")
    results = {}
    for impl in args.attention.split(","):
        config.attention_impl = impl
        model = nnx.jit(lambda: HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)))()
        forward, state = make_forward(model)
        seconds = time_call(lambda state=state: forward(state, **inputs), args.iters)
        results[impl] = seconds
        print(f"jax[{impl}]: {seconds * 1e3:.2f} ms/forward  {flops / seconds / 1e12:.2f} TFLOP/s  "
              f"fraction of matmul rate {flops / seconds / peak:.3f}  (parameters {parameter_count(state):,})")
        del model, state
    first = next(iter(results))
    for impl, seconds in results.items():
        print(f"ratio jax[{impl}] / jax[{first}] time: {seconds / results[first]:.3f}")
    if args.torch_baseline:
        torch_seconds = time_torch(args, config)
        if torch_seconds:
            print(f"torch (diffusers): {torch_seconds * 1e3:.2f} ms/forward  {flops / torch_seconds / 1e12:.2f} TFLOP/s")
            for impl, seconds in results.items():
                print(f"speed-up jax[{impl}] over torch: {torch_seconds / seconds:.3f}x")


if __name__ == "__main__":
    main()
