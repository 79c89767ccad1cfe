"""Host-side schedule tables for the Helios schedulers (spec sampler.md §3.1-3.3).

Everything here is numpy float64, as diffusers' HeliosScheduler / HeliosDMDScheduler compute it,
and runs once per `set_timesteps` (per pyramid stage and chunk). The jitted rollout only indexes the
resulting arrays, so no schedule arithmetic happens on the device.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

@dataclass(frozen=True)
class SchedulerConfig:
    """The checkpoint's `scheduler/scheduler_config.json`, reduced to what the variants use.

    `kind` is "unipc" (HeliosScheduler, Base and Mid) or "dmd" (HeliosDMDScheduler, or the repo's
    HeliosScheduler with scheduler_type="dmd", Distilled).
    """

    kind: str = "unipc"
    num_train_timesteps: int = 1000
    shift: float = 1.0
    stages: int = 3
    stage_range: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
    gamma: float = 1 / 3
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    # The pipelines read these with config.get(key, default); they set mu(token count).
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    # UniPC settings: only the values every variant uses are implemented (spec §0 table).
    solver_order: int = 2
    solver_type: str = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = field(default_factory=tuple)
    use_flow_sigmas: bool = True
    prediction_type: str = "flow_prediction"
    thresholding: bool = False


# What each variant's code path requires; anything else is refused rather than half-ported.
_REQUIRED = {
    "shift": 1.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": (),
    "use_flow_sigmas": True,
    "prediction_type": "flow_prediction",
    "thresholding": False,
}


def from_config_json(config: dict) -> SchedulerConfig:
    """Build a SchedulerConfig from a diffusers scheduler config dict."""
    class_name = config.get("_class_name")
    if class_name == "HeliosDMDScheduler":
        default_shift_type, kind = "linear", "dmd"  # diffusers' HeliosDMDScheduler default
    elif class_name == "HeliosScheduler":
        scheduler_type = config.get("scheduler_type", "unipc")
        if scheduler_type not in ("unipc", "dmd"):
            raise NotImplementedError(f"HeliosScheduler scheduler_type={scheduler_type!r} is used by no Helios variant")
        default_shift_type, kind = "exponential", scheduler_type
    else:
        raise ValueError(f"unsupported scheduler _class_name {class_name!r}: expected HeliosScheduler or HeliosDMDScheduler")

    known = {f for f in SchedulerConfig.__dataclass_fields__} - {"kind"}
    values = {k: v for k, v in config.items() if k in known}
    values.setdefault("time_shift_type", default_shift_type)
    for key in ("stage_range", "disable_corrector"):
        if key in values:
            values[key] = tuple(values[key] or ())
    if config.get("solver_p") is not None:
        raise NotImplementedError("solver_p is used by no Helios variant")
    cfg = SchedulerConfig(kind=kind, **values)
    _check_supported(cfg)
    return cfg


def from_folder(path: str) -> SchedulerConfig:
    """Read `<checkpoint>/scheduler/scheduler_config.json` (or a scheduler folder, or the JSON file)."""
    candidates = [path, os.path.join(path, "scheduler_config.json"), os.path.join(path, "scheduler", "scheduler_config.json")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return from_config_json(json.load(f))
    raise FileNotFoundError(f"no scheduler_config.json under {path}")


def _check_supported(cfg: SchedulerConfig) -> None:
    if cfg.time_shift_type not in ("exponential", "linear"):
        raise NotImplementedError(f"time_shift_type={cfg.time_shift_type!r} is used by no Helios variant")
    checks = dict(_REQUIRED) if cfg.kind == "unipc" else {"shift": 1.0}
    for key, expected in checks.items():
        if getattr(cfg, key) != expected:
            raise NotImplementedError(f"scheduler {key}={getattr(cfg, key)!r} is used by no Helios variant (expected {expected!r})")


# ----------------------------------------------------------------------------------------------
# Dynamic shifting


def dynamic_shift_mu(num_tokens: int, cfg: SchedulerConfig) -> float:
    """mu = m*L + b (diffusers' calculate_shift); L is the noisy-token count T*h*w/4 *before*
    the stage's upsample (spec §3.2 quirk)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return num_tokens * m + b


def time_shift(cfg: SchedulerConfig, mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Shift sigmas by factor e^mu (exponential) or mu (linear); sigma 0 stays 0 (1/0 = inf)."""
    factor = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
    # torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar; the same order keeps the
    # tables bit-identical to the reference.
    with np.errstate(divide="ignore"):
        return (1 / (factor + (1 / sigmas - 1))) * factor


# ----------------------------------------------------------------------------------------------
# Global grid and per-stage windows (built once, like the reference's constructor)


@dataclass(frozen=True)
class StageWindow:
    """One pyramid stage's training-timestep window and its stage-local sigma grid."""

    timesteps: np.ndarray  # 1000 values, tmax down to just above tmin
    sigmas: np.ndarray  # linspace(0.999, 0, 1001)[:-1]


@dataclass(frozen=True)
class StageConstants:
    ori_start_sigmas: tuple[float, ...]
    start_sigmas: tuple[float, ...]  # gamma-corrected: where each stage re-noises its start point
    end_sigmas: tuple[float, ...]
    timestep_ratios: tuple[tuple[float, float], ...]
    windows: tuple[StageWindow, ...]


def global_grid(cfg: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training grid (sigmas 0.999 .. 0.001, timesteps = 1000*sigmas)."""
    n = cfg.num_train_timesteps
    alphas = np.linspace(1, 1 / n, n + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas))[:-1].copy()
    return sigmas, sigmas * n


def stage_constants(cfg: SchedulerConfig) -> StageConstants:
    sigmas, timesteps = global_grid(cfg)
    n = cfg.num_train_timesteps
    ori_starts, starts, ends, distances = [], [], [], []
    for i in range(cfg.stages):
        start_index = max(int(cfg.stage_range[i] * n), 0)
        end_index = min(int(cfg.stage_range[i + 1] * n), n)
        start_sigma = float(sigmas[start_index])
        end_sigma = float(sigmas[end_index]) if end_index < n else 0.0
        ori_starts.append(start_sigma)
        if i != 0:
            # Upsampling raises the noise level; gamma corrects the stage's start sigma for it.
            signal = 1 - start_sigma
            corrected = (1 / (math.sqrt(1 + (1 / cfg.gamma)) * (1 - signal) + signal)) * signal
            start_sigma = 1 - corrected
        distances.append(start_sigma - end_sigma)
        starts.append(start_sigma)
        ends.append(end_sigma)

    total = sum(distances)
    ratios = []
    for i in range(cfg.stages):
        start_ratio = 0.0 if i == 0 else sum(distances[:i]) / total
        end_ratio = 0.9999999999999999 if i == cfg.stages - 1 else sum(distances[: i + 1]) / total
        ratios.append((start_ratio, end_ratio))

    windows = []
    for start_ratio, end_ratio in ratios:
        t_max = min(float(timesteps[int(start_ratio * n)]), 999)
        t_min = float(timesteps[min(int(end_ratio * n), n - 1)])
        windows.append(
            StageWindow(
                timesteps=np.linspace(t_max, t_min, n + 1)[:-1],
                sigmas=np.linspace(0.999, 0, n + 1)[:-1],
            )
        )
    return StageConstants(tuple(ori_starts), tuple(starts), tuple(ends), tuple(ratios), tuple(windows))


# ----------------------------------------------------------------------------------------------
# set_timesteps


@dataclass(frozen=True)
class Schedule:
    """One set_timesteps result: `timesteps` (n, float64, fed to the model) and `sigmas` (n+1, ends at 0)."""

    timesteps: np.ndarray
    sigmas: np.ndarray


def make_schedule(
    cfg: SchedulerConfig,
    constants: StageConstants,
    num_inference_steps: int,
    stage_index: int | None = None,
    *,
    mu: float | None = None,
    sigmas: np.ndarray | None = None,
    is_amplify_first_chunk: bool = False,
) -> Schedule:
    """Port of set_timesteps (spec §3.3). For stages == 1 `sigmas` defaults to what the Base
    pipeline passes, linspace(0.999, 0, n+1)[:-1]."""
    n = num_inference_steps
    if cfg.kind == "dmd":
        # DMD builds one extra point and drops it below, so the last step lands on sigma 0.
        n = 2 * n + 1 if is_amplify_first_chunk else n + 1

    if cfg.stages == 1:
        if sigmas is None:
            sigmas = np.linspace(0.999, 0.0, n + 1)[:-1]
        sigmas = np.asarray(sigmas, dtype=np.float64)
        timesteps = sigmas * cfg.num_train_timesteps
    else:
        if stage_index is None:
            raise ValueError("a pyramid scheduler (stages > 1) needs stage_index")
        window = constants.windows[stage_index]
        timesteps = np.linspace(window.timesteps[0], window.timesteps[-1], n)
        sigmas = np.linspace(window.sigmas[0], window.sigmas[-1], n)
    sigmas = np.concatenate([sigmas, np.zeros(1)])

    if cfg.kind == "dmd":
        timesteps = timesteps[:-1]
        sigmas = np.concatenate([sigmas[:-2], sigmas[-1:]])

    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("use_dynamic_shifting needs mu (see dynamic_shift_mu)")
        sigmas = time_shift(cfg, mu, sigmas)
        if cfg.stages == 1:
            timesteps = sigmas[:-1] * cfg.num_train_timesteps
        else:
            window = constants.windows[stage_index]
            t_min, t_max = window.timesteps.min(), window.timesteps.max()
            timesteps = t_min + sigmas[:-1] * (t_max - t_min)
    return Schedule(timesteps=np.asarray(timesteps, np.float64), sigmas=np.asarray(sigmas, np.float64))
