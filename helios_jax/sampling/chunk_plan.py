"""What one chunk's denoising does, worked out on the host before anything is traced.

`plan_chunk` turns the scheduler config and the sampling settings into a `ChunkSpec` (static and
hashable: shapes, step counts, solver, guidance; the key of the compiled chunk program) and
`ChunkTables` (arrays: timesteps, sigmas, solver coefficients, zero-init flags, re-noise
coefficients). Chunks with equal specs reuse one compiled program, so only a change of step count
(the amplified first chunk) or resolution compiles again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from helios_jax.sampling import schedule_tables as tables_lib
from helios_jax.sampling.pyramid import block_noise_factor, renoise_coefficients
from helios_jax.sampling.schedule_tables import SchedulerConfig, StageConstants
from helios_jax.sampling.unipc_step import UniPCTables, unipc_tables

HISTORY_SIZES = (16, 2, 1)  # long, mid, short history latent frames (the pipelines' defaults)
LATENT_FRAMES_PER_CHUNK = 9  # 33 frames per chunk through the 4x temporal VAE


@dataclass(frozen=True)
class StageSpec:
    height: int  # latent height and width the stage denoises at
    width: int
    num_steps: int


@dataclass(frozen=True)
class ChunkSpec:
    solver: str  # "unipc" (Base, Mid) or "dmd" (Distilled)
    guidance: str  # guidance.KINDS
    stages: tuple[StageSpec, ...]  # one stage = Base's full-resolution sampler
    history_sizes: tuple[int, ...]  # long, mid, 1x (descending)
    frames: int  # latent frames per chunk
    integer_timesteps: bool  # the pyramid pipeline feeds int64(t) to the model, Base the float t

    @property
    def pyramid(self) -> bool:
        return len(self.stages) > 1

    @property
    def window(self) -> int:
        return sum(self.history_sizes)


class StageTables(NamedTuple):
    model_timesteps: np.ndarray  # (n,) what the transformer receives
    sigmas: np.ndarray  # (n+1,) ends at 0
    unipc: UniPCTables | None
    zero_init: np.ndarray  # (n,) bool: CFG-Zero* zero-init steps
    renoise: np.ndarray  # (2,) alpha, beta of the re-noise entering the stage (unused in stage 0)


class ChunkTables(NamedTuple):
    stages: tuple[StageTables, ...]
    block_factor: np.ndarray  # (4, 4) L^T of the block-noise covariance (pyramid only)


@dataclass(frozen=True)
class SamplingSettings:
    num_inference_steps: int = 50  # Base (one stage)
    pyramid_steps: tuple[int, ...] = (20, 20, 20)  # Mid, Distilled
    guidance: str = "none"
    is_amplify_first_chunk: bool = False
    use_zero_init: bool = False
    zero_steps: int = 1
    history_sizes: tuple[int, ...] = (16, 2, 1)
    frames: int = 9


def noisy_tokens(frames: int, height: int, width: int, patch_size=(1, 2, 2)) -> int:
    return (frames * height * width) // int(np.prod(patch_size))


def plan_chunk(
    cfg: SchedulerConfig,
    constants: StageConstants,
    settings: SamplingSettings,
    *,
    latent_height: int,
    latent_width: int,
    is_first_chunk: bool,
    patch_size=(1, 2, 2),
) -> tuple[ChunkSpec, ChunkTables]:
    """The schedule of every stage of one chunk, as the diffusers Helios pipelines set it."""
    frames = settings.frames
    if cfg.stages == 1:
        mu = tables_lib.dynamic_shift_mu(noisy_tokens(frames, latent_height, latent_width, patch_size), cfg)
        schedule = tables_lib.make_schedule(cfg, constants, settings.num_inference_steps, mu=mu)
        sizes = [(latent_height, latent_width)]
        schedules = [schedule]
    else:
        num_stages = len(settings.pyramid_steps)
        if num_stages != cfg.stages:
            raise ValueError(f"pyramid_num_inference_steps_list has {num_stages} stages; the scheduler has {cfg.stages}")
        amplify = settings.is_amplify_first_chunk and is_first_chunk and cfg.kind == "dmd"
        factor = 2 ** (num_stages - 1)
        sizes = [(latent_height * 2**i // factor, latent_width * 2**i // factor) for i in range(num_stages)]
        schedules = []
        for i, steps in enumerate(settings.pyramid_steps):
            # mu comes from the latents before this stage's upsample (spec §3.2 quirk).
            h, w = sizes[max(i - 1, 0)]
            mu = tables_lib.dynamic_shift_mu(noisy_tokens(frames, h, w, patch_size), cfg)
            schedules.append(tables_lib.make_schedule(cfg, constants, steps, i, mu=mu, is_amplify_first_chunk=amplify))
    return plan_from_schedules(cfg, constants, settings, schedules, sizes)


def plan_from_schedules(
    cfg: SchedulerConfig,
    constants: StageConstants,
    settings: SamplingSettings,
    schedules: list[tables_lib.Schedule],
    sizes: list[tuple[int, int]],
) -> tuple[ChunkSpec, ChunkTables]:
    """The chunk plan for given per-stage schedules and latent sizes (plan_chunk's, or the Stage-3a
    teacher's schedules with the student's timesteps merged in)."""
    frames = settings.frames
    stage_specs, stage_tables = [], []
    for i, (schedule, (h, w)) in enumerate(zip(schedules, sizes)):
        n = len(schedule.timesteps)
        steps = np.arange(n)
        zero_window = (i == 0) if cfg.stages > 1 else True
        zero_init = (steps <= settings.zero_steps) & zero_window & settings.use_zero_init
        renoise = renoise_coefficients(constants.ori_start_sigmas[i], cfg.gamma) if i > 0 else (1.0, 0.0)
        model_t = np.trunc(schedule.timesteps) if cfg.stages > 1 else schedule.timesteps
        stage_specs.append(StageSpec(h, w, n))
        stage_tables.append(
            StageTables(
                model_timesteps=model_t.astype(np.float32),
                sigmas=schedule.sigmas.astype(np.float32),
                unipc=_f32(unipc_tables(schedule.sigmas)) if cfg.kind == "unipc" else None,
                zero_init=np.asarray(zero_init, bool),
                renoise=np.asarray(renoise, np.float32),
            )
        )
    spec = ChunkSpec(
        solver=cfg.kind,
        guidance=settings.guidance,
        stages=tuple(stage_specs),
        history_sizes=tuple(sorted(settings.history_sizes, reverse=True)),
        frames=frames,
        integer_timesteps=cfg.stages > 1,
    )
    return spec, ChunkTables(tuple(stage_tables), block_noise_factor(cfg.gamma))


def _f32(tables: UniPCTables) -> UniPCTables:
    """Coefficients computed in float64 on the host, rounded once to fp32 for the device (as a
    0-dim float64 torch tensor rounds when it multiplies an fp32 one)."""
    return UniPCTables(*(np.asarray(v, np.float32) if v.dtype.kind == "f" else v for v in tables))
