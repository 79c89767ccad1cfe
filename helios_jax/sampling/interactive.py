"""Interactive mode (spec sampler.md 7): a prompt CSV, and which prompt embedding each chunk uses.

Each id in the CSV is one video with prompts P_0..P_{N-1}; prompt j owns `times[j]` chunks. When a new
prompt starts, its first `interpolation_steps` chunks blend from the previous one with weights
linspace(0, 1, S): for S = 3 the first chunk is still exactly the old prompt (w = 0), the second is a 50/50
blend and the third is the new prompt.

Two reference quirks are reproduced by default, because the released checkpoints were sampled with them:
* chunks past the last prompt's interval fall back to P_0 (`hold_last_prompt=True` keeps P_{N-1} instead);
* when `num_frames` gives fewer chunks than the prompts need, the chunk count becomes the *sum* of the
  cumulative ends, not their maximum (`sum_quirk=False` uses the maximum).
"""
from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

REQUIRED_COLUMNS = ("id", "prompt_index", "prompt")


def read_prompt_csv(path: str | Path) -> list[tuple[str, list[str]]]:
    """[(id, [P_0, ..., P_{N-1}]), ...]: ids in ascending order (numeric when all ids are integers),
    prompts ordered by prompt_index; `refined_prompt` is used where that column is present and non-empty."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise OSError(f"{path}: cannot read the prompt CSV ({error})") from None
    if not rows:
        raise ValueError(f"{path}: no prompt rows")
    by_id: dict[str, list[tuple[int, str]]] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        video_id = (row.get("id") or "").strip()
        index_text = (row.get("prompt_index") or "").strip()
        try:
            index = int(index_text)
        except ValueError:
            raise ValueError(f"{path}: line {line}: prompt_index {index_text!r} is not an integer") from None
        text = (row.get("refined_prompt") or "").strip() or (row.get("prompt") or "").strip()
        if not video_id or not text:
            raise ValueError(f"{path}: line {line}: empty id or prompt")
        by_id.setdefault(video_id, []).append((index, text))
    numeric = all(_is_int(i) for i in by_id)
    ordered_ids = sorted(by_id, key=int if numeric else str)
    # Stable sort: rows that share a prompt_index keep their file order.
    return [(i, [text for _, text in sorted(by_id[i], key=lambda entry: entry[0])]) for i in ordered_ids]


def cumulative_ends(interpolate_time_list: Sequence[int]) -> list[int]:
    """C_j = t_0 + ... + t_j: the chunk index at which prompt j's interval ends (exclusive)."""
    times = [int(t) for t in interpolate_time_list]
    if not times or min(times) <= 0:
        raise ValueError(f"interpolate_time_list={list(interpolate_time_list)}: needs at least one positive count")
    return list(itertools.accumulate(times))


def interpolated_chunk_count(num_chunks: int, interpolate_time_list: Sequence[int], *, sum_quirk: bool = True) -> int:
    """The number of chunks the interactive pipeline runs. If `num_chunks` is below max(C) the reference
    uses sum(C) ([7, 7, 7] -> 7 + 14 + 21 = 42, not 21); otherwise `num_chunks` stands."""
    ends = cumulative_ends(interpolate_time_list)
    if num_chunks < ends[-1]:
        return sum(ends) if sum_quirk else ends[-1]
    return num_chunks


def interpolation_weights(interpolation_steps: int) -> list[float]:
    """linspace(0, 1, S) in float32, as torch.linspace builds it on the CPU (exact for S = 3: 0, 0.5, 1)."""
    steps = int(interpolation_steps)
    if steps <= 0:
        return []
    if steps == 1:
        return [0.0]
    # As torch's CPU kernel: a float32 step, each value computed from it in double, then rounded to float32.
    step = float(np.float32(1.0 / (steps - 1)))
    # torch fills the first half forward from 0 and the second half backward from 1.
    return [float(np.float32(i * step if i < steps // 2 else 1.0 - (steps - 1 - i) * step))
            for i in range(steps)]


def chunk_prompt_weights(chunk_index: int, interpolate_time_list: Sequence[int], interpolation_steps: int,
                         *, hold_last_prompt: bool = False) -> tuple[int, int, float]:
    """(j_prev, j, w) such that chunk `chunk_index` uses lerp(P_j_prev, P_j, w); a plain prompt is (j, j, 1.0)."""
    ends = cumulative_ends(interpolate_time_list)
    if min(interpolate_time_list) <= interpolation_steps:
        raise ValueError(f"interpolate_time_list={list(interpolate_time_list)}: every count must exceed "
                         f"interpolation_steps={interpolation_steps}")
    if chunk_index < 0:
        raise ValueError(f"chunk_index={chunk_index}: must be >= 0")
    j = next((j for j, end in enumerate(ends) if chunk_index < end), None)
    if j is None:  # past the last interval: the reference falls back to P_0
        j = len(ends) - 1 if hold_last_prompt else 0
        return j, j, 1.0
    if j == 0:
        return 0, 0, 1.0
    position = chunk_index - ends[j - 1]
    weights = interpolation_weights(interpolation_steps)
    if position < len(weights) and weights[position] < 1.0:  # w = 1 is P_j itself: report it as plain
        return j - 1, j, weights[position]
    return j, j, 1.0


def blend_embeddings(embeds, j_prev: int, j: int, w: float) -> np.ndarray:
    """lerp(embeds[j_prev], embeds[j], w) for embeds [N, L, D], returned in the embeddings' dtype.

    Mirrors torch.lerp on bf16 tensors: float32 operands, torch's two-sided formula (from the nearer end,
    so w = 0 and w = 1 return the inputs exactly) evaluated as one fused multiply-add, rounded to float32,
    then to the embeddings' dtype. The fma is emulated in float64 on the host (the product of two float32
    values is exact there); this runs once per blended chunk, so the host round trip costs nothing.
    """
    embeds = np.asarray(embeds)
    if embeds.ndim != 3:
        raise ValueError(f"embeds: shape {embeds.shape}, expected [N, L, D]")
    count = embeds.shape[0]
    if not (0 <= j_prev < count and 0 <= j < count):
        raise ValueError(f"prompt indices ({j_prev}, {j}) out of range for {count} embeddings")
    start, end = embeds[j_prev].astype(np.float32), embeds[j].astype(np.float32)
    difference = (end - start).astype(np.float64)
    w = float(np.float32(w))
    if abs(w) < 0.5:
        fused = start.astype(np.float64) + w * difference
    else:
        fused = end.astype(np.float64) - difference * float(np.float32(1.0) - np.float32(w))
    return fused.astype(np.float32).astype(embeds.dtype)


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
