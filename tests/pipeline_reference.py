"""diffusers' Helios pipelines as a whole-rollout parity reference. Test-only (imports torch).

Three variants (spec sampler.md §0): Base runs diffusers `HeliosPipeline`, Mid and Distilled run
`HeliosPyramidPipeline`. Each is built from tiny random components: the tiny transformer of
`tests.diffusers_reference` (4 latent channels, text width 16) and a Wan2.1-structured VAE at width 8
with z_dim 4 (`tests.vae_reference`, spatial stride 8, temporal stride 4) carrying non-trivial
latents_mean / latents_std. No tokenizer or text encoder: prompt embeddings go in directly.

`record_draws` sees every random draw the reference makes, in call order, as numpy arrays: the
`randn_tensor` calls (chunk noise, VAE posterior eps, image / video latent noise), the `torch.rand`
noise-sigma draws, and the plain `torch.randn` block noise of `sample_block_noise` (taken before the
Cholesky factor is applied). That list is what our pipeline's `noise=` argument replays (spec
api.md, sampler.md §11.1). The same context manager can also replay a list into the reference,
which is how the tests prove that the record is complete.

While it is active it also swaps, inside `sample_block_noise` only, the float32 `torch.linalg.cholesky`
that fails on CPU for the float64 factor of the same covariance (with its 1e-8 jitter) cast to
float32 (spec §4 "Numerics note").
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from unittest import mock

import numpy as np
import torch
from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler

from tests import diffusers_reference, vae_reference

# --------------------------------------------------------------------------------------------------
# Variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One Helios variant as diffusers runs it.

    `scheduler_config` holds the spec §0 values (set explicitly: the class defaults for
    time_shift_type differ between the schedulers). `flags` are the pipeline constructor flags
    (model_index.json). `call` is a small per-variant setting for tests (steps and guidance as the
    scripts use them, with fewer steps); callers may override any of it.
    """

    name: str
    pipeline_class: type
    scheduler_class: type
    scheduler_config: dict
    flags: dict
    call: dict

    @property
    def pyramid(self) -> bool:
        return self.pipeline_class is HeliosPyramidPipeline


_COMMON_SCHEDULER = dict(shift=1.0, gamma=1 / 3, stage_range=[0, 1 / 3, 2 / 3, 1], use_dynamic_shifting=True)

VARIANTS = {
    "base": Variant(
        name="base",
        pipeline_class=HeliosPipeline,
        scheduler_class=HeliosScheduler,
        scheduler_config=dict(_COMMON_SCHEDULER, stages=1, scheduler_type="unipc", time_shift_type="exponential"),
        flags=dict(),
        call=dict(num_inference_steps=4, guidance_scale=5.0),
    ),
    "mid": Variant(
        name="mid",
        pipeline_class=HeliosPyramidPipeline,
        scheduler_class=HeliosScheduler,
        scheduler_config=dict(_COMMON_SCHEDULER, stages=3, scheduler_type="unipc", time_shift_type="exponential"),
        flags=dict(is_cfg_zero_star=True, is_distilled=False),
        call=dict(guidance_scale=5.0, pyramid_num_inference_steps_list=[2, 2, 2], use_zero_init=True, zero_steps=1,
                  is_amplify_first_chunk=False),
    ),
    "distilled": Variant(
        name="distilled",
        pipeline_class=HeliosPyramidPipeline,
        scheduler_class=HeliosDMDScheduler,
        scheduler_config=dict(_COMMON_SCHEDULER, stages=3, time_shift_type="linear"),
        flags=dict(is_cfg_zero_star=False, is_distilled=True),
        call=dict(guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2], is_amplify_first_chunk=True,
                  use_zero_init=False, zero_steps=1),
    ),
}

# Tiny components. The VAE is the Wan2.1 structure (strides 8 and 4) at width 8; its latent
# statistics are deliberately far from (0, 1) so a missing or inverted normalisation shows.
LATENT_CHANNELS = 4
TEXT_DIM = 16
VAE_CONFIG = dict(vae_reference.TINY_CONFIGS["wan_structure"],
                  latents_mean=[0.3, -0.2, 0.5, 0.1], latents_std=[1.5, 0.7, 2.0, 1.1])
TRANSFORMER_CONFIG = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM)


def build_reference_pipeline(variant: str, seed: int = 0):
    """The diffusers pipeline of `variant` with random tiny components (fp32, CPU)."""
    v = VARIANTS[variant]
    transformer = diffusers_reference.build_reference(seed, **TRANSFORMER_CONFIG)
    vae = vae_reference.build_reference(seed + 1, **VAE_CONFIG)
    assert vae.config.z_dim == transformer.config.in_channels
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (8, 4)
    # diffusers quirk: when the noisy latents are a single patch wide and high (e.g. pyramid stage 0
    # of a 64x64 video) the transformer's unpatchify returns a non-contiguous view and the CFG-Zero*
    # branch's `.view(batch, -1)` raises. Values are unaffected by making the output contiguous.
    transformer.register_forward_hook(
        lambda module, args, output: tuple(o.contiguous() for o in output) if isinstance(output, tuple) else output)
    scheduler = v.scheduler_class(**v.scheduler_config)
    return v.pipeline_class(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                            transformer=transformer, **v.flags)


def ours_scheduler_config(pipe_reference) -> dict:
    """The reference scheduler's config as its scheduler_config.json would hold it (with
    `_class_name`, which diffusers adds only when saving)."""
    config = {k: v for k, v in dict(pipe_reference.scheduler.config).items() if not k.startswith("_")}
    return {"_class_name": type(pipe_reference.scheduler).__name__, **config}


def ours(pipe_reference) -> dict:
    """Our components converted from the reference pipeline's, plus its flags."""
    return dict(
        transformer=diffusers_reference.convert(pipe_reference.transformer),
        vae=vae_reference.convert(pipe_reference.vae),
        scheduler_config=ours_scheduler_config(pipe_reference),
        is_cfg_zero_star=bool(pipe_reference.config.get("is_cfg_zero_star", False)),
        is_distilled=bool(pipe_reference.config.get("is_distilled", False)),
    )


# --------------------------------------------------------------------------------------------------
# Draw recording and replay


def block_noise_factor(gamma: float, block_size: int = 4) -> torch.Tensor:
    """Cholesky factor of the block-noise covariance (1+g)I - g*ones + 1e-8*I, computed in float64
    (in float32 the jitter is lost and the matrix is singular) and cast to float32."""
    eye = torch.eye(block_size, dtype=torch.float64)
    cov = eye * (1 + gamma) - torch.ones(block_size, block_size, dtype=torch.float64) * gamma + eye * 1e-8
    return torch.linalg.cholesky(cov).to(torch.float32)


# Functions whose frames are skipped when naming the site of a draw.
_PASS_THROUGH = {"randn_tensor", "_draw", "randn", "rand"}
_SITE_NAMES = {"sample": "latent_dist.sample"}


def _draw_site() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name in _PASS_THROUGH:
        frame = frame.f_back
    name = frame.f_code.co_name if frame is not None else "?"
    return _SITE_NAMES.get(name, name)


@dataclasses.dataclass
class DrawLog:
    """The draws of one reference run, in call order."""

    draws: list = dataclasses.field(default_factory=list)  # numpy arrays, exactly as drawn
    kinds: list = dataclasses.field(default_factory=list)  # "randn" or "rand"
    sites: list = dataclasses.field(default_factory=list)  # calling function, e.g. "prepare_latents"

    def summary(self) -> list[tuple[str, str, tuple]]:
        return [(k, s, tuple(d.shape)) for k, s, d in zip(self.kinds, self.sites, self.draws)]


def _shape_of(size) -> tuple:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    return tuple(int(s) for s in size)


@contextlib.contextmanager
def record_draws(pipe=None, replay=None):
    """Record (or, with `replay`, substitute) every `torch.randn` / `torch.rand` call made while the
    context is active. `randn_tensor`, the VAE posterior's `sample` and `sample_block_noise` all end
    in these two functions, so nothing the pipelines draw escapes.

    replay: a sequence of arrays returned in order instead of drawing; the generator is then never
    advanced, so a draw the record missed would come out different in the replayed run. A shape
    mismatch, or running past the end of the list, raises.

    pipe: a HeliosPyramidPipeline whose `sample_block_noise` gets the float64 Cholesky factor (any
    other pipeline, or None, is left as it is).
    """
    log = DrawLog()
    originals = {"randn": torch.randn, "rand": torch.rand}
    queue = None if replay is None else list(replay)

    def make(kind):
        original = originals[kind]

        def _draw(*size, generator=None, dtype=None, device=None, **kwargs):
            shape = _shape_of(size)
            if queue is None:
                out = original(shape, generator=generator, dtype=dtype, device=device, **kwargs)
            else:
                index = len(log.draws)
                if index >= len(queue):
                    raise AssertionError(f"draw {index} ({kind} {shape}) is past the end of the replay list")
                value = np.asarray(queue[index])
                if tuple(value.shape) != shape:
                    raise AssertionError(f"draw {index} ({kind}): replay has shape {value.shape}, reference asks {shape}")
                out = torch.from_numpy(np.array(value)).to(dtype=dtype or torch.get_default_dtype(), device=device or "cpu")
            log.draws.append(out.detach().cpu().numpy().copy())
            log.kinds.append(kind)
            log.sites.append(_draw_site())
            return out

        return _draw

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch, "randn", make("randn")))
        stack.enter_context(mock.patch.object(torch, "rand", make("rand")))
        if isinstance(pipe, HeliosPyramidPipeline):
            stack.enter_context(_float64_block_factor(pipe))
        yield log
    if queue is not None and len(log.draws) != len(queue):
        raise AssertionError(f"the reference made {len(log.draws)} draws, the replay list has {len(queue)}")


@contextlib.contextmanager
def _float64_block_factor(pipe):
    """Inside `pipe.sample_block_noise` only, `torch.linalg.cholesky` returns the float64 factor."""
    method = pipe.sample_block_noise
    factor = block_noise_factor(float(pipe.scheduler.config.gamma))  # computed before the patch
    expected = factor.double() @ factor.double().T
    original_cholesky = torch.linalg.cholesky

    def cholesky(cov, *args, **kwargs):
        assert cov.shape == factor.shape, "sample_block_noise factored an unexpected matrix"
        assert torch.allclose(cov.double(), expected, atol=1e-6), "sample_block_noise factored an unexpected matrix"
        return factor.to(dtype=cov.dtype, device=cov.device)

    @functools.wraps(method)
    def sample_block_noise(*args, **kwargs):
        with mock.patch.object(torch.linalg, "cholesky", cholesky):
            return method(*args, **kwargs)

    with mock.patch.object(pipe, "sample_block_noise", sample_block_noise):
        yield
    assert torch.linalg.cholesky is original_cholesky


# --------------------------------------------------------------------------------------------------
# Inputs and runs


def prompt_embeddings(seed: int, length: int, *, seq_len: int = 512, dim: int = TEXT_DIM) -> np.ndarray:
    """Random float32 [1, seq_len, dim] embeddings, zero after `length` tokens (like the padded
    T5 output the pipelines produce)."""
    out = np.random.default_rng(seed).standard_normal((1, seq_len, dim)).astype(np.float32)
    out[:, length:] = 0.0
    return out


def random_pixels(shape, seed: int) -> np.ndarray:
    """Pixels in [0, 1], multiples of 1/255 (as decoded 8-bit frames), float32."""
    return (np.random.default_rng(seed).integers(0, 256, shape) / 255.0).astype(np.float32)


def to_signed(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1] exactly as diffusers' VaeImageProcessor.normalize does it (2x - 1 in f32)."""
    return (np.float32(2.0) * pixels - np.float32(1.0)).astype(np.float32)


def reference_image(pixels: np.ndarray) -> torch.Tensor:
    """An image for the reference: [1, 3, H, W] in [0, 1] as a torch tensor. At the target size its
    preprocessing is a same-size nearest resize (the identity) and 2x-1, so ours gets
    `to_signed(pixels)` and both sides see the same pixels bit for bit."""
    assert pixels.ndim == 4 and pixels.shape[:2] == (1, 3)
    return torch.from_numpy(pixels.copy())


def reference_video(pixels: np.ndarray) -> torch.Tensor:
    """A video for the reference from [1, 3, F, H, W] pixels in [0, 1]: diffusers takes a 5-D tensor
    as (B, F, C, H, W); ours gets `to_signed(pixels)` in (B, C, F, H, W)."""
    assert pixels.ndim == 5 and pixels.shape[:2] == (1, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 2, 1, 3, 4)))


@contextlib.contextmanager
def _skip_decode(pipe):
    """Latent output does not depend on the per-chunk VAE decode; replace it with a cheap stand-in of
    the same shape (33 frames for 9 latents)."""
    vae = pipe.vae

    def decode(z, return_dict=True):
        b, _, t, h, w = z.shape
        frames = (t - 1) * pipe.vae_scale_factor_temporal + 1
        out = torch.zeros(b, 3, frames, h * pipe.vae_scale_factor_spatial, w * pipe.vae_scale_factor_spatial)
        assert not return_dict
        return (out,)

    with mock.patch.object(vae, "decode", decode):
        yield


def run_reference(variant: str, pipe, *, prompt_embeds, negative_prompt_embeds=None, num_frames, height, width,
                  image=None, video=None, seed: int = 0, replay=None, decode: bool = False, log: dict | None = None,
                  **variant_kwargs):
    """Run the reference pipeline with output_type="latent"; returns (draws, latents).

    image: [1, 3, H, W] float32 pixels in [0, 1] (see `reference_image`), or None.
    video: [1, 3, F, H, W] float32 pixels in [0, 1] (see `reference_video`), or None.
    variant_kwargs override `VARIANTS[variant].call`. `latents` is diffusers' real_history_latents:
    for I2V the fake-image latent, for V2V the video latents, come before the generated ones.
    replay: arrays to substitute for the draws (see `record_draws`). decode: run the per-chunk VAE
    decode (it does not change the latents). log: if a dict, receives the DrawLog and the run time.
    """
    v = VARIANTS[variant]
    assert isinstance(pipe, v.pipeline_class)
    kwargs = {**v.call, **variant_kwargs}
    if image is not None:
        kwargs["image"] = reference_image(image)
    if video is not None:
        kwargs["video"] = reference_video(video)
    if kwargs.get("guidance_scale", 1.0) > 1.0 and negative_prompt_embeds is None:
        raise ValueError("CFG needs negative_prompt_embeds (the reference has no text encoder)")
    as_torch = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with record_draws(pipe, replay=replay) as draws, (contextlib.nullcontext() if decode else _skip_decode(pipe)):
        with torch.no_grad():
            latents = pipe(prompt_embeds=as_torch(prompt_embeds), negative_prompt_embeds=as_torch(negative_prompt_embeds),
                           num_frames=num_frames, height=height, width=width, generator=generator,
                           output_type="latent", return_dict=False, **kwargs)[0]
    if log is not None:
        log.update(draws=draws, seconds=time.perf_counter() - start)
    return draws.draws, latents.float().numpy()


# --------------------------------------------------------------------------------------------------
# Expected draw sequence (spec sampler.md §11.1, diffusers order)


def expected_draws(variant: str, *, num_frames: int, height: int, width: int, task: str = "t2v",
                   video_frames: int | None = None, batch: int = 1, channels: int = LATENT_CHANNELS,
                   latent_frames_per_chunk: int = 9) -> list[tuple[str, str, tuple]]:
    """(kind, site, shape) of each draw, in order, as `DrawLog.summary()` lists them."""
    h, w = height // 8, width // 8
    one = (batch, channels, 1, h, w)
    chunk = (batch, channels, latent_frames_per_chunk, h, w)
    out = []
    if task == "i2v":
        out += [("randn", "latent_dist.sample", one), ("randn", "latent_dist.sample", chunk),
                ("rand", "__call__", (1,)), ("randn", "__call__", one),
                ("rand", "__call__", (1,)), ("randn", "__call__", one)]
    elif task == "v2v":
        segments = video_frames // ((latent_frames_per_chunk - 1) * 4 + 1)
        out += [("randn", "latent_dist.sample", one)] + [("randn", "latent_dist.sample", chunk)] * segments
        out += [("rand", "__call__", (1,)), ("randn", "__call__", one)]
        out += [("rand", "__call__", (latent_frames_per_chunk,)), ("randn", "__call__", chunk)] * segments
    window = (latent_frames_per_chunk - 1) * 4 + 1
    chunks = max(1, -(-num_frames // window))
    for _ in range(chunks):
        out.append(("randn", "prepare_latents", chunk))
        if VARIANTS[variant].pyramid:
            for new_h, new_w in ((h // 2, w // 2), (h, w)):  # the stage-1 and stage-2 transitions
                blocks = batch * channels * latent_frames_per_chunk * (new_h // 2) * (new_w // 2)
                out.append(("randn", "sample_block_noise", (blocks, 4)))
    return out
