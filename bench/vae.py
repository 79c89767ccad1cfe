"""Time decoding one chunk of latents with the Wan2.1 VAE; print time, peak memory and ratios.

Helios decodes every 9-latent chunk (33 frames) separately, inside the generation loop, in fp32.
Printed: compile time, seconds per chunk, decoded frames per second, TFLOP/s (analytic FLOPs, the
count torch's flop counter gives for diffusers' module), the fraction of a same-dtype matmul rate
measured in this run, peak device memory (GPU allocator peak; on CPU XLA's compiled buffer sizes),
and with --torch-baseline diffusers' AutoencoderKLWan on the same device, shapes and dtype, in a
subprocess so the two frameworks never share memory.

    python bench/vae.py --config wan2.1 --resolution 384x640 --dtype bfloat16 --torch-baseline
    python bench/vae.py --config tiny --resolution 64x96 --iters 1
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

from helios_jax.models.vae import AutoencoderKLWan, to_channels_first, to_channels_last
from helios_jax.models.vae_config import preset, spatial_stride, temporal_stride
from helios_jax.models.vae_flops import decode_flops
from timing import matmul_rate, time_call


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="wan2.1", help="VAE preset: wan2.1 or tiny")
    parser.add_argument("--resolution", default="384x640", help="output HxW in pixels")
    parser.add_argument("--latent-frames", type=int, default=9, help="latents per chunk (9 -> 33 frames)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--torch-baseline", action="store_true", help="also time diffusers (needs torch + diffusers)")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        height, width = (int(v) for v in args.resolution.lower().split("x"))
    except ValueError:
        parser.error(f"--resolution must look like 384x640, got {args.resolution!r}")
    config = preset(args.config, dtype=args.dtype)
    stride = spatial_stride(config)
    if height % stride or width % stride:
        parser.error(f"--resolution {args.resolution} must be a multiple of {stride} in both sides")
    args.latent_shape = (1, config.z_dim, args.latent_frames, height // stride, width // stride)
    return args, config


def frames_out(config, latent_frames: int) -> int:
    return 1 + temporal_stride(config) * (latent_frames - 1)


def peak_memory(device, compiled) -> tuple[str, int]:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device allocator peak", stats["peak_bytes_in_use"]
    analysis = compiled.memory_analysis()
    size = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    return "compiled buffers (arguments + temporaries + output)", size


def time_torch(args):
    command = [sys.executable, __file__, "--torch-worker", "--config", args.config, "--resolution", args.resolution,
               "--latent-frames", str(args.latent_frames), "--dtype", args.dtype, "--iters", str(args.iters)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"torch baseline failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def torch_worker(args, config):
    import torch
    from diffusers import AutoencoderKLWan as TorchWanVAE

    from helios_jax.models.vae_config import DIFFUSERS_FIELDS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    with torch.device(device):
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in DIFFUSERS_FIELDS}
        model = TorchWanVAE(**fields).to(dtype).eval()
        latents = torch.randn(args.latent_shape, dtype=dtype)

    def run():
        with torch.no_grad():
            out = model.decode(latents).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(json.dumps({"seconds": float(np.median(times)), "peak_bytes": peak, "torch": torch.__version__}))


def main(argv=None):
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    if args.torch_worker:
        return torch_worker(args, config)
    device = jax.devices()[0]
    _, _, t, h, w = args.latent_shape
    flops = decode_flops(config, t, h, w)
    frames = frames_out(config, t)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"config: {args.config}  dtype={args.dtype}  latents {t}x{h}x{w} -> {frames} frames "
          f"{args.resolution}  FLOPs/chunk={flops:.4e}")
    rate = matmul_rate(jnp.dtype(args.dtype), 8192 if jax.default_backend() == "gpu" else 1024)
    print(f"baseline matmul rate: {rate / 1e12:.1f} TFLOP/s")

    vae = AutoencoderKLWan(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    del vae

    # The same program as vae.decode: layout changes, one first-frame step, a scan over the rest.
    @jax.jit
    def decode(state, z):
        return to_channels_first(nnx.merge(graphdef, state).decode_frames(to_channels_last(z))[0])

    z = jax.random.normal(jax.random.key(0), args.latent_shape, jnp.dtype(args.dtype))
    start = time.perf_counter()
    compiled = decode.lower(state, z).compile()
    print(f"compile: {time.perf_counter() - start:.1f} s")
    seconds = time_call(lambda: compiled(state, z), args.iters)
    memory_kind, memory = peak_memory(device, compiled)
    print(f"jax: {seconds * 1e3:.1f} ms/chunk  {frames / seconds:.1f} frames/s  {flops / seconds / 1e12:.3g} TFLOP/s  "
          f"fraction of matmul rate {flops / seconds / rate:.3f}")
    print(f"jax peak memory: {memory / 2**30:.2f} GiB ({memory_kind})")
    if args.torch_baseline:
        result = time_torch(args)
        if result:
            torch_seconds = result["seconds"]
            memory_note = f"  peak memory {result['peak_bytes'] / 2**30:.2f} GiB" if result["peak_bytes"] else ""
            print(f"torch {result['torch']} (diffusers): {torch_seconds * 1e3:.1f} ms/chunk  "
                  f"{frames / torch_seconds:.1f} frames/s  {flops / torch_seconds / 1e12:.3g} TFLOP/s{memory_note}")
            print(f"speed-up jax over torch: {torch_seconds / seconds:.3f}x")


if __name__ == "__main__":
    main()
