"""End-to-end generation speed: frames per second of HeliosPipeline and the per-chunk split into
text encoding, transformer (the chunk program) and VAE decode, with random weights.

Baseline measured in the same run (--torch-baseline): diffusers' HeliosPyramidPipeline (Mid,
Distilled) or HeliosPipeline (Base) on the same device with the same component configs, dtype,
resolution, frame count and steps, run in a subprocess so the frameworks never share memory.
Both sides take the same prompt embeddings, so the end-to-end comparison excludes the text
encoder (its time is printed separately for ours).

    python bench/generate.py --config helios_14b --vae wan2.1 --text umt5_xxl --variant distilled \
        --height 384 --width 640 --num-frames 240 --dtype bfloat16 --torch-baseline      # GPU
    python bench/generate.py                                                            # tiny, CPU
"""
from __future__ import annotations

import argparse
import gc
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

from helios_jax.models import text_encoder_config, transformer_config, vae_config
from helios_jax.models.flops import transformer_flops
from helios_jax.models.text_encoder import UMT5EncoderModel
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.vae import AutoencoderKLWan
from helios_jax.sampling.pipeline import HeliosPipeline
from helios_jax.sampling.chunk_plan import noisy_tokens
from helios_jax.sampling.schedulers import HeliosScheduler
from helios_jax.sampling.variants import DEFAULTS, PIPELINE_FLAGS, SCHEDULER_CONFIGS

TEXT_TOKENS = 512


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="transformer preset: tiny or helios_14b")
    parser.add_argument("--vae", default="tiny", help="VAE preset: tiny or wan2.1")
    parser.add_argument("--text", default="tiny", help="text encoder preset: tiny or umt5_xxl")
    parser.add_argument("--variant", default="distilled", choices=tuple(DEFAULTS))
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=132)
    parser.add_argument("--steps", default=None, help="Base: steps; Mid/Distilled: per stage, e.g. 2,2,2 (default: the variant's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--torch-baseline", action="store_true", help="also time diffusers (needs torch + diffusers)")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sampling_kwargs(args) -> dict:
    defaults = DEFAULTS[args.variant]
    kwargs = dict(height=args.height, width=args.width, num_frames=args.num_frames,
                  guidance_scale=defaults["guidance_scale"])
    if args.variant == "base":
        kwargs["num_inference_steps"] = int(args.steps) if args.steps else defaults["num_inference_steps"]
    else:
        steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else defaults["pyramid_num_inference_steps_list"]
        kwargs.update(pyramid_num_inference_steps_list=list(steps),
                      is_amplify_first_chunk=defaults["is_amplify_first_chunk"],
                      use_zero_init=defaults["use_zero_init"], zero_steps=defaults["zero_steps"])
    return kwargs


def on_device(build):
    """Accelerators: initialise inside jit so a 14B model never passes through host memory. CPU:
    build eagerly (host numpy init; compiling the init graphs of big conv stacks takes minutes)."""
    return build() if jax.default_backend() == "cpu" else nnx.jit(build)()


def build_pipeline(args, text_dim: int):
    """Random components of the chosen presets."""
    transformer = on_device(lambda: HeliosTransformer3DModel(
        transformer_config.preset(args.config, dtype=args.dtype, text_dim=text_dim), rngs=nnx.Rngs(0)))
    vae = on_device(lambda: AutoencoderKLWan(vae_config.preset(args.vae), rngs=nnx.Rngs(1)))
    scheduler = HeliosScheduler.from_config_json(SCHEDULER_CONFIGS[args.variant])
    return HeliosPipeline(transformer, vae, scheduler, **PIPELINE_FLAGS[args.variant])


def time_text(args, text):
    """Seconds to encode one prompt (cond + negative with CFG), after a warm-up compile."""
    encoder = on_device(lambda: UMT5EncoderModel(text, rngs=nnx.Rngs(2)))
    graphdef, state = nnx.split(encoder)
    encode = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    batch = 2 if DEFAULTS[args.variant]["guidance_scale"] > 1 else 1
    ids = jnp.ones((batch, TEXT_TOKENS), jnp.int32)
    jax.block_until_ready(encode(state, ids, ids))
    start = time.perf_counter()
    jax.block_until_ready(encode(state, ids, ids))
    return time.perf_counter() - start


def run_ours(pipe, args, embeds):
    chunks = []
    start = time.perf_counter()
    for chunk in pipe.iter_chunks(prompt_embeds=embeds, negative_prompt_embeds=embeds * 0, **sampling_kwargs(args)):
        chunks.append(chunk)
    return time.perf_counter() - start, chunks


def time_torch(args):
    command = [sys.executable, __file__, "--torch-worker", *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"torch baseline failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def torch_worker(args, text_dim: int):
    """diffusers' pipeline with random components of the same configs; prints seconds and frames."""
    import torch
    from diffusers import (AutoencoderKLWan as TorchVAE, HeliosDMDScheduler, HeliosPipeline as TorchBase,
                           HeliosPyramidPipeline, HeliosScheduler as TorchScheduler,
                           HeliosTransformer3DModel as TorchHelios)

    from helios_jax.models.transformer_config import DIFFUSERS_FIELDS
    from helios_jax.models.vae_config import DIFFUSERS_FIELDS as VAE_FIELDS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    config = transformer_config.preset(args.config, dtype=args.dtype, text_dim=text_dim)
    vae_cfg = vae_config.preset(args.vae)
    with torch.device(device):
        transformer = TorchHelios(**{k: config[k] for k in DIFFUSERS_FIELDS}).to(dtype).eval()
        vae = TorchVAE(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vae_cfg.items()
                          if k in VAE_FIELDS}).eval()
    scheduler_json = dict(SCHEDULER_CONFIGS[args.variant])
    scheduler_class = HeliosDMDScheduler if scheduler_json.pop("_class_name") == "HeliosDMDScheduler" else TorchScheduler
    scheduler = scheduler_class(**scheduler_json)
    pipeline_class = TorchBase if args.variant == "base" else HeliosPyramidPipeline
    flags = {} if args.variant == "base" else PIPELINE_FLAGS[args.variant]
    pipe = pipeline_class(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer,
                          **flags)
    pipe.set_progress_bar_config(disable=True)
    if device == "cpu":
        # diffusers' fp32 Cholesky of the block-noise covariance fails on CPU (spec §4): the same
        # factor computed in float64 from the unrounded covariance.
        from helios_jax.sampling.pyramid import block_noise_factor

        factor = torch.from_numpy(block_noise_factor(scheduler.config.gamma).T.copy())
        torch.linalg.cholesky = lambda cov: factor.to(cov.device)
    embeds = torch.randn(1, TEXT_TOKENS, text_dim, device=device, dtype=dtype)
    kwargs = sampling_kwargs(args)
    kwargs.pop("use_zero_init", None) if args.variant == "base" else None

    def run():
        with torch.no_grad():
            out = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds * 0, output_type="np",
                       generator=torch.Generator(device).manual_seed(0), **kwargs).frames
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up (cuDNN autotuning, allocator)
    start = time.perf_counter()
    frames = run()
    print(json.dumps({"seconds": time.perf_counter() - start, "frames": int(np.asarray(frames).shape[1])}))


def chunk_flops(pipe, args, chunk_index: int) -> float:
    """Transformer FLOPs of one chunk (spec §10 model): per stage, steps x forward FLOPs (x2 with CFG)."""
    from helios_jax.sampling.chunk_plan import plan_chunk

    kwargs = sampling_kwargs(args)
    settings, _, _ = pipe._settings(None, kwargs.get("num_inference_steps"), kwargs["guidance_scale"],
                                    kwargs.get("pyramid_num_inference_steps_list"), kwargs.get("is_amplify_first_chunk"),
                                    kwargs.get("use_zero_init"), kwargs.get("zero_steps"))
    h, w = args.height // 8, args.width // 8
    spec, _ = plan_chunk(pipe.scheduler.config, pipe.scheduler.constants, settings, latent_height=h, latent_width=w,
                         is_first_chunk=chunk_index == 0)
    config = pipe.transformer.config
    history = noisy_tokens(2, h, w) + noisy_tokens(2, h // 2, w // 2) // 4 + noisy_tokens(16, h // 4, w // 4) // 16
    passes = 2 if settings.guidance != "none" else 1
    return sum(passes * stage.num_steps * transformer_flops(config, history, noisy_tokens(9, stage.height, stage.width))
               for stage in spec.stages)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    text = text_encoder_config.preset(args.text, dtype=args.dtype)
    if args.torch_worker:
        return torch_worker(args, text.d_model)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{args.variant}: transformer {args.config}, VAE {args.vae}, text {args.text}, {args.dtype}, "
          f"{args.width}x{args.height}, num_frames {args.num_frames}")
    text_seconds = time_text(args, text)
    pipe = build_pipeline(args, text.d_model)
    embeds = jax.random.normal(jax.random.key(0), (1, TEXT_TOKENS, text.d_model), jnp.float32)
    first_seconds, _ = run_ours(pipe, args, embeds)  # compiles
    seconds, chunks = run_ours(pipe, args, embeds)
    frames = sum(c.frames.shape[1] for c in chunks)
    denoise = sum(c.denoise_seconds for c in chunks)
    decode = sum(c.decode_seconds for c in chunks)
    flops = sum(chunk_flops(pipe, args, c.index) for c in chunks)
    print(f"first run (with compiles): {first_seconds:.2f} s; chunk programs compiled: {pipe.chunk_compilations}")
    print(f"jax: {frames} frames in {seconds:.2f} s = {frames / seconds:.2f} frames/s end to end "
          f"({frames / (seconds + text_seconds):.2f} frames/s with the text encoder)")
    print(f"per chunk (mean of {len(chunks)}): text {text_seconds / len(chunks) * 1e3:.1f} ms (once per video: "
          f"{text_seconds * 1e3:.1f} ms), transformer {denoise / len(chunks) * 1e3:.1f} ms, "
          f"VAE decode {decode / len(chunks) * 1e3:.1f} ms, other {(seconds - denoise - decode) / len(chunks) * 1e3:.1f} ms")
    print(f"transformer: {flops / denoise / 1e12:.3f} TFLOP/s over {flops:.3e} FLOPs")
    if args.torch_baseline:
        del pipe, chunks
        gc.collect()
        torch_result = time_torch(args)
        if torch_result:
            torch_fps = torch_result["frames"] / torch_result["seconds"]
            print(f"torch (diffusers): {torch_result['frames']} frames in {torch_result['seconds']:.2f} s = "
                  f"{torch_fps:.2f} frames/s end to end")
            print(f"speed-up jax over torch: {frames / seconds / torch_fps:.3f}x")


if __name__ == "__main__":
    main()
