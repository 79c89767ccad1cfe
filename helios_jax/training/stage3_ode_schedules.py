"""Stage 3a schedules (spec training.md §6.1, §3.4): the teacher's per-stage schedule with the
student's timesteps merged in, and the shifted stage table the ODE loss reads sigmas from.

The teacher (Mid, UniPC, `teacher_steps` per stage) and the student (Distilled, 2 steps per stage,
4 for the amplified chunk 0) share the pyramid's stage windows. The student's *unshifted*
timesteps are merged into the teacher's unshifted schedule, each with the sigma of the stage table
at its nearest grid timestep; only then is the merged schedule shifted (linear, mu from the stage's
latent after its upsample), as get_ode-pairs.py does. The teacher's trajectory so passes through the
student's timesteps up to the grid's rounding of sigma (within 0.25 of the reference's hard-coded
lists at 384x640, e.g. 902.138 for 902.218); the stored t_j are the teacher's own, and the ODE loss
reads their sigma from the same grid, so each stored pair is consistent.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from helios_jax.sampling import schedule_tables as tables
from helios_jax.sampling.variants import SCHEDULER_CONFIGS
from helios_jax.training.stage3_distill_schedules import training_mu

STUDENT_STEPS = 2  # per pyramid stage; twice as many in the amplified first chunk
MERGE_TOLERANCE = 1e-4  # a student timestep this close to a teacher one is already in the schedule


class TeacherStageSchedule(NamedTuple):
    schedule: tables.Schedule  # merged and shifted: timesteps (n,), sigmas (n+1,) ending at 0
    student_steps: np.ndarray  # (K,) int: the step indices of the student's timesteps in `schedule`


@functools.lru_cache(maxsize=None)
def _configs() -> tuple[tables.SchedulerConfig, tables.SchedulerConfig, tables.StageConstants]:
    """(teacher config, the linear-shift config, the stage constants teacher and student share),
    unshifted: the shift is applied after merging, here, with the training-side mu."""
    teacher = tables.from_config_json({**SCHEDULER_CONFIGS["mid"], "use_dynamic_shifting": False})
    student = tables.from_config_json({**SCHEDULER_CONFIGS["distilled"], "use_dynamic_shifting": False})
    linear = dataclasses.replace(teacher, time_shift_type="linear")
    constants = tables.stage_constants(teacher)
    student_windows = tables.stage_constants(student).windows
    if any(not np.array_equal(a.timesteps, b.timesteps) for a, b in zip(constants.windows, student_windows)):
        raise AssertionError("teacher and student pyramid stage windows differ")
    return teacher, linear, constants


def student_unshifted_timesteps(stage: int, *, amplified: bool) -> np.ndarray:
    """The Distilled scheduler's timesteps of pyramid stage `stage` before dynamic shifting."""
    _, _, constants = _configs()
    student = tables.from_config_json({**SCHEDULER_CONFIGS["distilled"], "use_dynamic_shifting": False})
    return tables.make_schedule(student, constants, STUDENT_STEPS, stage, is_amplify_first_chunk=amplified).timesteps


def shift_stage(stage: int, sigmas: np.ndarray, height: int, width: int) -> tables.Schedule:
    """Linear shift of stage-local `sigmas` (n+1, ending at 0) with the training mu of a
    height x width latent; timesteps = t_min + sigma' (t_max - t_min) of the stage window."""
    _, linear, constants = _configs()
    shifted = tables.time_shift(linear, training_mu(height, width), np.asarray(sigmas, np.float64))
    window = constants.windows[stage].timesteps
    t_min, t_max = window.min(), window.max()
    return tables.Schedule(timesteps=t_min + shifted[:-1] * (t_max - t_min), sigmas=shifted)


def teacher_stage_schedule(stage: int, height: int, width: int, *, teacher_steps: int,
                           amplified: bool) -> TeacherStageSchedule:
    """The teacher's schedule of pyramid stage `stage` (latent height x width after the stage's
    upsample) with the student's timesteps merged in, shifted, and where the student's steps are."""
    teacher, _, constants = _configs()
    base = tables.make_schedule(teacher, constants, teacher_steps, stage)
    window = constants.windows[stage]
    targets = student_unshifted_timesteps(stage, amplified=amplified)
    new = np.asarray([t for t in targets if np.all(np.abs(base.timesteps - t) >= MERGE_TOLERANCE)], np.float64)
    nearest = np.argmin(np.abs(new[:, None] - window.timesteps[None]), axis=1) if len(new) else np.zeros(0, int)
    timesteps = np.concatenate([base.timesteps, new])
    sigmas = np.concatenate([base.sigmas[:-1], window.sigmas[nearest]])
    order = np.argsort(-timesteps, kind="stable")
    merged_sigmas = np.concatenate([sigmas[order], base.sigmas[-1:]])
    unshifted = timesteps[order]
    steps = np.asarray([int(np.argmin(np.abs(unshifted - t))) for t in targets])
    return TeacherStageSchedule(shift_stage(stage, merged_sigmas, height, width), steps)


def student_ode_timesteps(stage: int, height: int, width: int, *, teacher_steps: int = 20,
                          amplified: bool) -> np.ndarray:
    """The (shifted) timesteps the student is trained at in stage `stage`: where the teacher's
    merged schedule passes through the student's steps."""
    merged = teacher_stage_schedule(stage, height, width, teacher_steps=teacher_steps, amplified=amplified)
    return merged.schedule.timesteps[merged.student_steps]
