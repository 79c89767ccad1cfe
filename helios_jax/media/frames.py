"""Frame arithmetic of the chunk rollout (spec sampler.md 2.1) and the decoded-video -> uint8 mapping (8)."""
from __future__ import annotations

import math

import numpy as np

FRAMES_PER_CHUNK = 33  # (9 latent frames - 1) * temporal stride 4 + 1
TEMPORAL_STRIDE = 4


def chunk_count(num_frames: int, frames_per_chunk: int = FRAMES_PER_CHUNK) -> int:
    """Chunks needed for `num_frames`; the request is rounded up to whole chunks, never below one."""
    if num_frames < 0 or frames_per_chunk <= 0:
        raise ValueError(f"num_frames={num_frames} and frames_per_chunk={frames_per_chunk} must be >= 0 and > 0")
    return max(1, math.ceil(num_frames / frames_per_chunk))


def trim_frame_count(total: int, temporal_stride: int = TEMPORAL_STRIDE) -> int:
    """The 4m+1 frame count the pipeline returns out of `total` decoded frames (e.g. 264 -> 261)."""
    if total < 1 or temporal_stride <= 0:
        raise ValueError(f"total={total} and temporal_stride={temporal_stride} must both be >= 1")
    return ((total - 1) // temporal_stride) * temporal_stride + 1


def to_uint8(frames) -> np.ndarray:
    """Decoded frames in [-1, 1], [B=1, 3, T, H, W] or [3, T, H, W] -> uint8 [T, H, W, 3].

    Mirrors diffusers' postprocess + export_to_video in float32: x*0.5 + 0.5 (equal, bit for bit, to
    (x+1)/2), clamped to [0, 1], times 255, then *truncated* by the uint8 cast as the reference does.
    """
    frames = np.asarray(frames)
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"frames: batch of {frames.shape[0]} videos, expected one ([1, 3, T, H, W])")
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames: shape {frames.shape}, expected [1, 3, T, H, W] or [3, T, H, W]")
    unit = np.clip(frames.astype(np.float32) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    return (np.transpose(unit, (1, 2, 3, 0)) * np.float32(255.0)).astype(np.uint8)
