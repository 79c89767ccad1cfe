"""Thin stateful wrappers mirroring diffusers' HeliosScheduler / HeliosDMDScheduler
(`set_timesteps`, `step`), for tests and eager use. The jitted rollout should call
`make_schedule` + `unipc_step` / `dmd_step` directly and carry the state in its loop.
"""
from __future__ import annotations

import jax
import numpy as np

from . import schedule_tables as tables_lib
from . import unipc_step as unipc
from .dmd_step import dmd_step
from .schedule_tables import SchedulerConfig


class HeliosScheduler:
    """Helios flow-matching scheduler: UniPC (Base, Mid) or DMD (Distilled), per config.kind."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.constants = tables_lib.stage_constants(config)
        self.schedule: tables_lib.Schedule | None = None

    @classmethod
    def from_config_json(cls, config: dict) -> "HeliosScheduler":
        return cls(tables_lib.from_config_json(config))

    @classmethod
    def from_folder(cls, path: str) -> "HeliosScheduler":
        return cls(tables_lib.from_folder(path))

    @property
    def timesteps(self) -> np.ndarray:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> np.ndarray:
        return self.schedule.sigmas

    def set_timesteps(self, num_inference_steps, stage_index=None, *, mu=None, sigmas=None, is_amplify_first_chunk=False):
        """New schedule; resets the step index and the solver history (once per stage and chunk)."""
        self.schedule = tables_lib.make_schedule(
            self.config, self.constants, num_inference_steps, stage_index,
            mu=mu, sigmas=sigmas, is_amplify_first_chunk=is_amplify_first_chunk,
        )
        self._unipc_tables = unipc.unipc_tables(self.schedule.sigmas) if self.config.kind == "unipc" else None
        self._step_index = 0
        self._state = None

    def step(self, model_output: jax.Array, sample: jax.Array, stage_start: jax.Array | None = None) -> jax.Array:
        """Advance one step; DMD needs the stage's start latents (its re-noising target)."""
        if self.schedule is None:
            raise ValueError("call set_timesteps before step")
        i = self._step_index
        if self.config.kind == "dmd":
            if stage_start is None:
                raise ValueError("the DMD step needs stage_start (the stage's initial latents)")
            out = dmd_step(model_output, sample, stage_start, i, self.schedule.sigmas)
        else:
            if self._state is None:
                self._state = unipc.init_state(sample)
            out, self._state = unipc.unipc_step(self._unipc_tables, model_output, sample, i, self._state)
        self._step_index = i + 1
        return out
