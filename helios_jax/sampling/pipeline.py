"""`HeliosPipeline`: text, image or video to video, one 33-frame chunk after another
(spec sampler.md §2). One class serves the three variants, as the official repo's pipeline does:
Base (one-stage UniPC with CFG), Mid (pyramid UniPC with CFG-Zero*) and Distilled (pyramid DMD),
chosen by the scheduler config and the `is_cfg_zero_star` / `is_distilled` flags of
`model_index.json`. Numerics follow diffusers 0.42.1's HeliosPipeline / HeliosPyramidPipeline
(docs/pipeline.md lists where the official repo differs).

Per chunk the host draws the chunk's noise, picks its text embedding and calls the jitted chunk
program (sampling/rollout.py); the history window and the anchor are the only state carried.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import offload, parallel
from helios_jax.media.frames import chunk_count, to_uint8, trim_frame_count
from helios_jax.sampling import conditioning
from helios_jax.sampling import memory_plan as memory_plan_lib
from helios_jax.sampling import variants as variants_lib
from helios_jax.sampling.chunk_plan import HISTORY_SIZES, LATENT_FRAMES_PER_CHUNK, SamplingSettings, plan_chunk
from helios_jax.sampling.guidance import guidance_kind
from helios_jax.sampling.noise import NoiseSource
from helios_jax.sampling.pyramid import block_noise_count
from helios_jax.sampling.rollout import ChunkInputs, make_chunk_program
from helios_jax.sampling.mesh_choice import memory_limit
from helios_jax.sampling.schedulers import HeliosScheduler
from helios_jax.text.prompt_embeddings import TextEncoder

NOISE_SIGMA_RANGE = (0.111, 0.135)  # image and video latent noise (both pipelines' defaults)


@dataclass
class Chunk:
    """One finished chunk: its clean latents and, unless only latents were asked for, its frames."""

    index: int
    num_chunks: int
    latents: jax.Array  # [B, C, 9, h, w] fp32
    frames: np.ndarray | None  # [B, 33, H, W, 3] uint8, the last chunk already trimmed to 4m+1 frames
    seconds: float  # wall time of this chunk (noise, denoise and decode)
    num_steps: int  # transformer evaluations of this chunk (each batched cond+uncond with CFG)
    denoise_seconds: float  # the chunk program (transformer steps), waited for
    decode_seconds: float  # VAE decode and the copy of frames to the host


@dataclass(frozen=True)
class FramePlan:
    num_chunks: int
    frames_per_chunk: int
    frames_returned: int  # 33K trimmed to 4m+1 (spec §2.1)


class HeliosPipeline:
    def __init__(self, transformer, vae, scheduler, text_encoder=None, *, is_cfg_zero_star: bool = False,
                 is_distilled: bool = False, mesh=None, memory_plan: str = "resident"):
        """`mesh`: where the chunk program runs; by default the mesh the transformer's parameters are
        sharded on (helios_jax.load(..., mesh=...), parallel.shard_state / init_sharded), else none.
        `memory_plan`: where the text encoder waits between prompts (sampling/memory_plan.py)."""
        self.transformer = transformer
        self.mesh = mesh if mesh is not None else parallel.mesh_of(transformer)
        self.vae = vae
        self.scheduler = scheduler if isinstance(scheduler, HeliosScheduler) else HeliosScheduler(scheduler)
        self.text_encoder = text_encoder
        self.is_cfg_zero_star = is_cfg_zero_star
        self.is_distilled = is_distilled
        self.variant = variants_lib.variant_of(self.scheduler.config.stages, is_cfg_zero_star, is_distilled)
        graphdef, self._state = nnx.split(transformer)
        self._chunk_program = make_chunk_program(graphdef)
        self.memory_plan = self._resolve_memory_plan(memory_plan)
        if self.memory_plan != "resident" and text_encoder is not None:
            offload.to_host(text_encoder.encoder)

    def _resolve_memory_plan(self, plan: str) -> str:
        if memory_plan_lib.check_plan(plan, "memory_plan") != "auto":
            return plan
        device = next(iter(self.mesh.devices.flat)) if self.mesh is not None else jax.devices()[0]
        text = offload.device_bytes(self.text_encoder.encoder) if self.text_encoder is not None else 0
        return memory_plan_lib.choose_plan(memory_limit(device), transformer_bytes=offload.device_bytes(self.transformer),
                                           vae_bytes=offload.device_bytes(self.vae), text_bytes=text)

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, mesh=None, transformer=None, quantize=None,
                        memory_plan: str = "auto", height: int = 384, width: int = 640,
                        progress=lambda message: None) -> "HeliosPipeline":
        """A model folder (diffusers format or converted by `helios-jax convert`) with transformer/,
        vae/, scheduler/ and optionally text_encoder/ + tokenizer/ (without them, pass embeddings).

        `transformer`: a transformer folder used instead of the model folder's (e.g. written by
        `helios-jax merge-lora` from a training run). `mesh`: None (one device, api.md's default),
        "auto" (every device, the layout whose compiled chunk program at height x width fits and is
        fastest: what `helios-jax generate` uses), "AXIS=SIZE,..." or a Mesh. `quantize`: None or "int8" (weight-only, transformer and
        text encoder). `memory_plan`: see sampling/memory_plan.py. Everything is checked, and the
        mesh and plan are chosen, before any weight is read."""
        from helios_jax.loading import module_builder
        from helios_jax.text.tokenizer import PromptTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such model folder")
        transformer_folder = _transformer_folder(transformer) if transformer is not None else folder / "transformer"
        for part in ("vae", "scheduler") if transformer is not None else ("transformer", "vae", "scheduler"):
            if not (folder / part).is_dir():
                raise FileNotFoundError(f"{folder}: no {part}/ folder (a Helios model folder needs transformer/, vae/, scheduler/)")
        check_quantize(quantize)
        memory_plan_lib.check_plan(memory_plan, "memory_plan")
        flags = _pipeline_flags(folder / "model_index.json")
        scheduler = HeliosScheduler.from_folder(str(folder / "scheduler"))
        check_size(height, width, scheduler.config.stages)
        has_text = (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir()
        tokenizer = PromptTokenizer.from_folder(folder / "tokenizer") if has_text else None  # a bad one fails here
        builds = dict(build_transformer=module_builder(transformer_folder, dtype=dtype)[1],
                      build_vae=module_builder(folder / "vae")[1],
                      build_text_encoder=module_builder(folder / "text_encoder", dtype=dtype)[1] if has_text else None)
        placement = _plan(builds, scheduler, flags, mesh, memory_plan, quantize, height, width, progress)
        text_encoder = None
        if has_text:  # first, so that a plan that keeps it on the host never holds it beside the transformer
            encoder = _load_component(folder / "text_encoder", dtype, placement.mesh, quantize)
            if placement.memory_plan != "resident":
                offload.to_host(encoder)
            text_encoder = TextEncoder(encoder, tokenizer)
        return cls(
            _load_component(transformer_folder, dtype, placement.mesh, quantize, placement.transformer_formats),
            _load_component(folder / "vae", None, placement.mesh, None),
            scheduler,
            text_encoder,
            **flags,
            mesh=placement.mesh,
            memory_plan=placement.memory_plan,
        )

    @classmethod
    def tiny_random(cls, variant: str = "distilled", *, seed: int = 0, transformer=None, mesh=None, quantize=None,
                    memory_plan: str = "resident", height: int = 64, width: int = 64,
                    progress=lambda message: None) -> "HeliosPipeline":
        """Small random components built in memory: the whole path runs without weights.
        `transformer`: a transformer folder of the tiny-random shape (e.g. `helios-jax merge-lora`
        of a `:tiny` training run) used instead of the random one. `mesh`, `quantize`,
        `memory_plan`: as for `from_pretrained` (the mesh is chosen for height x width)."""
        from helios_jax.loading import load, module_builder
        from helios_jax.tiny_random import tiny_random_builders, tiny_random_components

        variants_lib.check_variant(variant)
        check_quantize(quantize)
        flags = variants_lib.PIPELINE_FLAGS[variant]
        builds = tiny_random_builders()
        if transformer is not None:
            builds["build_transformer"] = module_builder(_transformer_folder(transformer))[1]
        scheduler = HeliosScheduler.from_config_json(variants_lib.SCHEDULER_CONFIGS[variant])
        check_size(height, width, scheduler.config.stages)
        placement = _plan(builds, scheduler, flags, mesh, memory_plan, quantize, height, width, progress)
        components = tiny_random_components(variant, seed=seed)
        if transformer is not None:
            components["transformer"] = load(_transformer_folder(transformer))
            expected = components["text_encoder"].encoder.config.d_model
            if components["transformer"].config.text_dim != expected:
                raise ValueError(f"{transformer}: its text_dim {components['transformer'].config.text_dim} is not the "
                                 f"tiny-random text encoder's {expected} (train with the tiny-random model config)")
        encoder, tokenizer = components["text_encoder"].encoder, components["text_encoder"].tokenizer
        if quantize is not None:
            components["transformer"] = _quantized(components["transformer"], quantize)
            encoder = _quantized(encoder, quantize)
        if placement.mesh is not None:
            for module in (components["transformer"], components["vae"], encoder):
                parallel.shard_state(module, placement.mesh)
        if placement.transformer_formats is not None:
            from helios_jax.sampling.parameter_layouts import place_in_formats

            place_in_formats(components["transformer"], placement.transformer_formats)
        components["text_encoder"] = TextEncoder(encoder, tokenizer)  # it runs where its parameters now are
        return cls(**components, **flags, mesh=placement.mesh, memory_plan=placement.memory_plan)

    # ------------------------------------------------------------------------------------------
    # Sampling

    def defaults(self) -> dict:
        return dict(variants_lib.DEFAULTS[self.variant])

    def frame_plan(self, num_frames: int) -> FramePlan:
        """Chunks needed for `num_frames` (rounded up to whole chunks) and the frames returned."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive; got {num_frames}")
        per_chunk = (LATENT_FRAMES_PER_CHUNK - 1) * self._temporal_stride + 1
        chunks = chunk_count(num_frames, per_chunk)
        return FramePlan(chunks, per_chunk, trim_frame_count(chunks * per_chunk, self._temporal_stride))

    def __call__(self, prompt=None, negative_prompt=None, *, output_type: str = "np", **kwargs):
        """Generate a whole video. `output_type="np"`: uint8 frames [T, H, W, 3] ([B, T, H, W, 3] for
        B > 1); `"latent"`: the latent history [B, C, T, h, w] (conditioning latents, then every
        chunk's latents), as diffusers returns it."""
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent'; got {output_type!r}")
        conditioning_latents = []
        chunks = list(self.iter_chunks(prompt, negative_prompt, decode=output_type == "np",
                                       conditioning_latents=conditioning_latents, **kwargs))
        if output_type == "latent":
            return np.asarray(jnp.concatenate([*conditioning_latents, *(c.latents for c in chunks)], axis=2))
        frames = np.concatenate([c.frames for c in chunks], axis=1)
        return frames[0] if frames.shape[0] == 1 else frames

    def iter_chunks(
        self,
        prompt=None,
        negative_prompt=None,
        *,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        height: int = 384,
        width: int = 640,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        pyramid_num_inference_steps_list=None,
        is_amplify_first_chunk: bool | None = None,
        use_zero_init: bool | None = None,
        zero_steps: int | None = None,
        image=None,
        video=None,
        seed: int = 0,
        noise: Iterable | None = None,
        is_skip_first_chunk: bool = False,
        use_interpolate_prompt: bool = False,
        interpolate_time_list=None,
        interpolation_steps: int = 3,
        decode: bool = True,
        conditioning_latents: list | None = None,
        prompt_for_chunk: Callable[[int], object] | None = None,
    ) -> Iterator[Chunk]:
        """Generate chunk by chunk: each is yielded as soon as it is denoised (and decoded), so a
        caller can write it out and memory stays flat however long the video. The I2V / V2V
        latents that seed the history are appended to `conditioning_latents` when given.

        `prompt_for_chunk(k)`, when given, is called just before chunk k runs and returns that chunk's
        prompt embedding [1, L, D] (the shape of the prompt's own): a live prompt a caller may change
        while the video is being generated (the web demo's interactive mode)."""
        settings, guidance_scale, num_frames = self._settings(
            num_frames, num_inference_steps, guidance_scale, pyramid_num_inference_steps_list,
            is_amplify_first_chunk, use_zero_init, zero_steps,
        )
        self._check_inputs(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, image, video)
        plan = self.frame_plan(num_frames)
        source = NoiseSource(seed, replay=noise)
        embeds, negative = self._prompt_embeddings(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, settings.guidance, use_interpolate_prompt,
        )
        num_chunks = plan.num_chunks
        chunk_prompt = lambda k: embeds  # noqa: E731 - the same embedding for every chunk
        if use_interpolate_prompt:
            num_chunks, chunk_prompt = _interpolation(embeds, num_chunks, interpolate_time_list, interpolation_steps)
        if prompt_for_chunk is not None:
            chunk_prompt = _live_prompt(prompt_for_chunk, embeds.shape, self.transformer.dtype)

        h, w = height // self._spatial_stride, width // self._spatial_stride
        batch = embeds.shape[0] if not use_interpolate_prompt else 1
        channels = self.transformer.config.in_channels
        if image is not None or video is not None:
            memory_plan_lib.alone_on_device(self.memory_plan, self.vae, (self.transformer,))
        anchor, history, seeded = self._condition(image, video, height, width, batch, channels, h, w, source)
        memory_plan_lib.alone_on_device(self.memory_plan, self.transformer, (self.vae,))
        # one_at_a_time: every chunk is denoised before the VAE comes to the device to decode them.
        deferred = [] if decode and self.memory_plan == "one_at_a_time" else None
        if conditioning_latents is not None:
            conditioning_latents.extend(seeded)

        guidance = jnp.asarray(guidance_scale, jnp.float32)
        # The schedules depend only on whether a chunk is the first: worked out once per video.
        plans = {first: plan_chunk(self.scheduler.config, self.scheduler.constants, settings,
                                   latent_height=h, latent_width=w, is_first_chunk=first,
                                   patch_size=tuple(self.transformer.config.patch_size))
                 for first in (True, False)}
        for k in range(num_chunks):
            started = time.perf_counter()
            spec, tables = plans[k == 0]
            chunk_noise = source.normal((batch, channels, settings.frames, h, w))
            block_noise = tuple(
                source.normal((block_noise_count((batch, channels, settings.frames, s.height, s.width)), 4))
                for s in spec.stages[1:]
            )
            inputs = ChunkInputs(
                history=history,
                anchor=anchor if anchor is not None else jnp.zeros((batch, channels, 1, h, w), jnp.float32),
                prompt_embeds=chunk_prompt(k),
                negative_prompt_embeds=negative,
                noise=chunk_noise,
                block_noise=block_noise,
                guidance_scale=guidance,
            )
            denoise_start = time.perf_counter()
            with parallel.use_mesh(self.mesh):
                latents = self._chunk_program(spec, self._state, inputs, tables).block_until_ready()
            decode_start = time.perf_counter()
            # The anchor: frame 0 of the first chunk (T2V), or of the second with is_skip_first_chunk.
            if (k == 0 and anchor is None) or (is_skip_first_chunk and k == 1):
                anchor = latents[:, :, :1]
            history = jnp.concatenate([history, latents], axis=2)[:, :, -spec.window :]
            frames = self._frames(latents, k, num_chunks, plan) if decode and deferred is None else None
            done = time.perf_counter()
            chunk = Chunk(k, num_chunks, latents, frames, done - started, sum(s.num_steps for s in spec.stages),
                          decode_start - denoise_start, done - decode_start)
            if deferred is None:
                yield chunk
            else:
                deferred.append(chunk)
        source.finish()
        if deferred:
            memory_plan_lib.alone_on_device(self.memory_plan, self.vae, (self.transformer,))
            for chunk in deferred:
                started = time.perf_counter()
                frames = self._frames(chunk.latents, chunk.index, num_chunks, plan)
                seconds = time.perf_counter() - started
                yield dataclasses.replace(chunk, frames=frames, seconds=chunk.seconds + seconds, decode_seconds=seconds)

    def _frames(self, latents, k: int, num_chunks: int, plan: FramePlan) -> np.ndarray:
        """Chunk k's frames; the last chunk's trimmed so the whole video has 4m+1 frames."""
        frames = self.decode_chunk(latents)
        if k == num_chunks - 1:
            keep = trim_frame_count(num_chunks * plan.frames_per_chunk, self._temporal_stride)
            frames = frames[:, : keep - k * plan.frames_per_chunk]
        return frames

    def decode_chunk(self, latents: jax.Array) -> np.ndarray:
        """Chunk latents (normalised) -> uint8 frames [B, 33, H, W, 3]; each chunk is an independent
        VAE segment (spec §8)."""
        with parallel.use_mesh(self.mesh):
            video = np.asarray(self.vae.decode(self.vae.denormalize_latents(latents)))
        return np.stack([to_uint8(v) for v in video])

    @property
    def chunk_compilations(self) -> int:
        """How many chunk programs have been compiled (one per distinct ChunkSpec)."""
        return self._chunk_program._cache_size()

    # ------------------------------------------------------------------------------------------

    @property
    def _temporal_stride(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def _spatial_stride(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def _settings(self, num_frames, num_inference_steps, guidance_scale, pyramid_steps, amplify, use_zero_init,
                  zero_steps):
        return resolve_settings(self.variant, self.scheduler.config.stages, self.is_cfg_zero_star, self.is_distilled,
                                num_frames, num_inference_steps, guidance_scale, pyramid_steps, amplify,
                                use_zero_init, zero_steps)

    def _check_inputs(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, image,
                      video):
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt or prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
        if image is not None and video is not None:
            raise ValueError("image and video cannot be given together")
        check_size(height, width, self.scheduler.config.stages, self._spatial_stride)

    def _prompt_embeddings(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance,
                           interpolate):
        guided = guidance != "none"
        if prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds)")
            if interpolate and isinstance(prompt, str):
                raise ValueError("use_interpolate_prompt needs prompt to be a list of prompts")
            with self._text_encoder_on_device():
                prompt_embeds = self.text_encoder.encode([prompt] if isinstance(prompt, str) else list(prompt))
        prompt_embeds = jnp.asarray(prompt_embeds).astype(self.transformer.dtype)
        if not guided:
            return prompt_embeds, None
        batch = 1 if interpolate else prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("guidance_scale > 1 needs negative_prompt_embeds when the pipeline has no text encoder")
            with self._text_encoder_on_device():
                if negative_prompt is None or isinstance(negative_prompt, str):
                    negative_prompt_embeds = self.text_encoder.encode_negative(negative_prompt, batch)
                else:
                    negative_prompt_embeds = self.text_encoder.encode(list(negative_prompt))
        negative_prompt_embeds = jnp.asarray(negative_prompt_embeds).astype(self.transformer.dtype)[:batch]
        if negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:] or negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}; "
                             f"expected ({batch}, {', '.join(map(str, prompt_embeds.shape[1:]))})")
        return prompt_embeds, negative_prompt_embeds

    def _text_encoder_on_device(self):
        """The memory plan around one use of the text encoder (a no-op when everything is resident)."""
        return memory_plan_lib.encoding(self.memory_plan, self.text_encoder.encoder, (self.transformer, self.vae))

    def _condition(self, image, video, height, width, batch, channels, h, w, source: NoiseSource):
        """(anchor or None, history window [B, C, 19, h, w], conditioning latents) for T2V, I2V or
        V2V (spec §6), drawing in the reference's order."""
        window = sum(HISTORY_SIZES)
        history = jnp.zeros((batch, channels, window, h, w), jnp.float32)
        low, high = NOISE_SIGMA_RANGE
        if image is not None:
            pixels = _as_pixels(image, height, width, video=False)
            image_latents, fake = conditioning.image_condition(self.vae, pixels, source.normal)
            image_latents = _noised(image_latents, source, low, high, (1,))
            fake = _noised(fake, source, low, high, (1,))
            history = jnp.concatenate([history[:, :, 1:], fake], axis=2)
            return image_latents, history, [fake]
        if video is not None:
            pixels = _as_pixels(video, height, width, video=True)
            first, video_latents = conditioning.video_condition(self.vae, pixels, source.normal)
            first = _noised(first, source, low, high, (1,))
            chunks = []
            for start in range(0, video_latents.shape[2], LATENT_FRAMES_PER_CHUNK):
                chunk = video_latents[:, :, start : start + LATENT_FRAMES_PER_CHUNK]
                chunks.append(_noised(chunk, source, low, high, (chunk.shape[2],), per_frame=True))
            video_latents = jnp.concatenate(chunks, axis=2)
            history = jnp.concatenate([history, video_latents], axis=2)[:, :, -window:]
            return first, history, [video_latents]
        return None, history, []


def resolve_settings(variant: str, stages: int, is_cfg_zero_star: bool, is_distilled: bool, num_frames=None, num_inference_steps=None, guidance_scale=None,
                     pyramid_steps=None, amplify=None, use_zero_init=None, zero_steps=None):
    """(SamplingSettings, guidance scale, num_frames): the caller's values, the variant's script
    defaults for those left None."""
    defaults = variants_lib.DEFAULTS[variant]
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    num_frames = int(pick(num_frames, "num_frames"))
    guidance_scale = float(pick(guidance_scale, "guidance_scale"))
    if guidance_scale > 1.0 and is_distilled:
        warnings.warn(f"guidance_scale {guidance_scale} on a step-distilled model: it runs CFG anyway", stacklevel=4)
    if stages == 1:
        steps = int(pick(num_inference_steps, "num_inference_steps") or 50)
        pyramid = ()
    else:
        pyramid = tuple(int(s) for s in (pick(pyramid_steps, "pyramid_num_inference_steps_list") or (10,) * stages))
        steps = sum(pyramid)
    if steps < 1 or any(s < 1 for s in pyramid):
        raise ValueError("the number of inference steps must be positive")
    settings = SamplingSettings(
        num_inference_steps=steps,
        pyramid_steps=pyramid,
        guidance=guidance_kind(guidance_scale, is_cfg_zero_star),
        is_amplify_first_chunk=bool(pick(amplify, "is_amplify_first_chunk")) and is_distilled,
        use_zero_init=bool(pick(use_zero_init, "use_zero_init")),
        zero_steps=int(pick(zero_steps, "zero_steps")),
        history_sizes=HISTORY_SIZES,
        frames=LATENT_FRAMES_PER_CHUNK,
    )
    return settings, guidance_scale, num_frames


QUANTIZE_MODES = ("int8",)


def check_quantize(mode, flag: str = "quantize") -> None:
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"{flag} must be one of {', '.join(QUANTIZE_MODES)} (or none); got {mode!r}")


def _quantized(module, mode: str):
    from helios_jax import quantization

    return quantization.quantize(module, mode)


def quantized_builder(build, mode: str | None):
    return build if build is None or mode is None else (lambda: _quantized(build(), mode))


def _plan(builds: dict, scheduler, flags: dict, mesh, memory_plan: str, quantize, height: int, width: int, progress):
    """The mesh and memory plan for these (abstract) components, before any weight is read."""
    from helios_jax.sampling.placement import plan_placement

    builds = dict(builds)
    builds["build_transformer"] = quantized_builder(builds["build_transformer"], quantize)
    builds["build_text_encoder"] = quantized_builder(builds["build_text_encoder"], quantize)
    variant = variants_lib.variant_of(scheduler.config.stages, **flags)
    settings = resolve_settings(variant, scheduler.config.stages, flags["is_cfg_zero_star"], flags["is_distilled"])[0]
    stride = 8  # the Wan VAE's spatial factor
    return plan_placement(mesh=mesh, memory_plan=memory_plan, scheduler=scheduler, settings=settings,
                          latent_height=height // stride, latent_width=width // stride, quantize=quantize,
                          progress=progress, **builds)


def _load_component(folder: Path, dtype, mesh, quantize, formats=None):
    """One component onto the mesh (or the default device). Quantized ones are read and quantized
    in host memory first, so the full-precision weights never need room on the device. `formats`
    (the chunk program's parameter layouts, sampling/parameter_layouts.py): read on the host, then
    each weight put straight into its layout."""
    from helios_jax.loading import load

    if quantize is None and formats is None:
        return load(folder, dtype=dtype, mesh=mesh)
    with jax.default_device(jax.devices("cpu")[0]):
        module = load(folder, dtype=dtype)
        if quantize is not None:
            module = _quantized(module, quantize)
    if formats is not None:
        from helios_jax.sampling.parameter_layouts import place_in_formats

        return place_in_formats(module, formats)
    return parallel.place_state(module, mesh)


def check_size(height: int, width: int, stages: int, spatial_stride: int = 8) -> None:
    """Pixels must be multiples of 16, and for a pyramid of S stages the coarsest stage must still
    patchify whole: multiples of spatial_stride * 2^S (64 for Mid and Distilled)."""
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 16; got {height}x{width}")
    multiple = spatial_stride * 2**stages if stages > 1 else 16
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for the {stages}-stage pyramid; "
                         f"got {height}x{width}")


def _noised(latents, source: NoiseSource, low: float, high: float, sigma_shape, per_frame: bool = False):
    """sigma * eps + (1 - sigma) * latents with sigma ~ U[low, high] (one per frame for video chunks)."""
    sigma = source.uniform(sigma_shape) * (high - low) + low
    if per_frame:
        sigma = sigma.reshape(1, 1, -1, 1, 1)
    return sigma * source.normal(latents.shape) + (1 - sigma) * latents


def _as_pixels(value, height: int, width: int, *, video: bool) -> jax.Array:
    """An image [B, 3, H, W] / video [B, 3, F, H, W] already in [-1, 1] passes through; a path, PIL
    image or uint8 frames are read and resized as diffusers' VideoProcessor does."""
    ndim = 5 if video else 4
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == ndim and np.issubdtype(value.dtype, np.floating):
        if value.shape[-2:] != (height, width):
            raise ValueError(f"{'video' if video else 'image'} tensor is {value.shape[-2]}x{value.shape[-1]}; "
                             f"expected {height}x{width}")
        return jnp.asarray(value, jnp.float32)
    from helios_jax.media import readers

    load = readers.load_video if video else readers.load_image
    return jnp.asarray(load(value, height, width))


def _interpolation(embeds, num_chunks: int, interpolate_time_list, interpolation_steps: int):
    """Interactive mode (spec §7): one prompt per interval of chunks, blended at each switch."""
    from helios_jax.sampling import interactive

    if interpolate_time_list is None:
        interpolate_time_list = [7] * embeds.shape[0]
    if len(interpolate_time_list) != embeds.shape[0]:
        raise ValueError(f"interpolate_time_list has {len(interpolate_time_list)} entries for {embeds.shape[0]} prompts")
    num_chunks = interactive.interpolated_chunk_count(num_chunks, interpolate_time_list)

    def chunk_prompt(k):
        j_prev, j, weight = interactive.chunk_prompt_weights(k, interpolate_time_list, interpolation_steps)
        return interactive.blend_embeddings(embeds, j_prev, j, weight)[None]

    return num_chunks, chunk_prompt


def _live_prompt(prompt_for_chunk, shape, dtype):
    """Wraps a caller's per-chunk embedding source; the shape must stay that of the first prompt so
    the compiled chunk program is reused."""
    expected = (1, *shape[1:])

    def chunk_prompt(k):
        embeds = jnp.asarray(prompt_for_chunk(k)).astype(dtype)
        if embeds.shape != expected:
            raise ValueError(f"prompt_for_chunk({k}): embedding shape {tuple(embeds.shape)}, expected {expected}")
        return embeds

    return chunk_prompt


def _pipeline_flags(model_index: Path) -> dict:
    if not model_index.is_file():
        return dict(is_cfg_zero_star=False, is_distilled=False)
    try:
        index = json.loads(model_index.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{model_index}: invalid JSON ({error})") from None
    return dict(is_cfg_zero_star=bool(index.get("is_cfg_zero_star", False)),
                is_distilled=bool(index.get("is_distilled", False)))


def _transformer_folder(path) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a transformer folder (no config.json)")
    return folder
