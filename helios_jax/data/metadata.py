"""The clip list of `prepare-data`: the toy_filter.json format of the reference repository (spec training.md 8.1).

A JSON list with one record per clip: path (relative to the videos folder), cut [start, end) in frames,
crop [x0, x1, y0, y1] in pixels, fps, num_frames, resolution {height, width}, cap [caption, ...]
(the first caption is used).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

REQUIRED_FIELDS = ("path", "cut", "crop", "fps", "num_frames", "resolution", "cap")


@dataclasses.dataclass(frozen=True)
class Clip:
    path: str
    cut: tuple[int, int]
    crop: tuple[int, int, int, int]  # x0, x1, y0, y1
    caption: str

    @property
    def length(self) -> int:
        return self.cut[1] - self.cut[0]

    @property
    def id(self) -> str:
        return f"{Path(self.path).stem}_{self.cut[0]}-{self.cut[1]}"


def read_clips(metadata: str | Path) -> list[Clip]:
    """Parse and check the metadata JSON; any problem is one error naming the file and the record."""
    metadata = Path(metadata)
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata}: no such metadata file")
    try:
        records = json.loads(metadata.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{metadata}: not valid JSON ({error})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{metadata}: expected a non-empty JSON list of clip records")
    return [_clip(metadata, index, record) for index, record in enumerate(records)]


def _clip(metadata: Path, index: int, record) -> Clip:
    where = f"{metadata}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    cut = _ints(where, "cut", record["cut"], 2)
    crop = _ints(where, "crop", record["crop"], 4)
    if not 0 <= cut[0] < cut[1]:
        raise ValueError(f"{where}: cut {list(cut)} must be [start, end) with 0 <= start < end")
    if not (0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3]):
        raise ValueError(f"{where}: crop {list(crop)} must be [x0, x1, y0, y1] with x0 < x1 and y0 < y1")
    captions = record["cap"]
    if not isinstance(captions, list) or not captions or not isinstance(captions[0], str):
        raise ValueError(f"{where}: cap must be a non-empty list of caption strings")
    if not isinstance(record["path"], str) or not record["path"]:
        raise ValueError(f"{where}: path must be a non-empty string")
    return Clip(path=record["path"], cut=cut, crop=crop, caption=captions[0])


def _ints(where: str, name: str, value, count: int) -> tuple:
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{where}: {name} must be a list of {count} integers, got {value!r}")
    return tuple(value)
