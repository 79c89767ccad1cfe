"""Pixels of one training clip (spec training.md 8.1): a window of the length bucket inside the cut,
the metadata crop, a center crop to the target aspect, a resize to the target size, scaled to [-1, 1].

Frames are cropped and resized as uint8 with PIL (bilinear), then x / 255 * 2 - 1 in float32. The
reference does the same steps on float tensors with torch; the numbers differ slightly, the geometry
does not.
"""
from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import PIL.Image

from helios_jax.data.metadata import Clip

FRAMES_PER_CHUNK = 33  # one chunk = 9 latent frames = 33 pixel frames
# Length buckets of the reference loader; a clip uses the largest one that fits in its cut.
LENGTH_BUCKETS = (*range(21, 182, 20), 193, *range(221, 502, 20))


def length_bucket(length: int) -> int | None:
    fitting = [bucket for bucket in LENGTH_BUCKETS if bucket <= length]
    return fitting[-1] if fitting else None


def chunks_in(clip: Clip) -> int:
    """33-frame chunks the clip's length bucket holds (0: the clip is too short to train on)."""
    bucket = length_bucket(clip.length)
    return bucket // FRAMES_PER_CHUNK if bucket else 0


def window_start(clip: Clip, bucket: int, rng: np.random.Generator) -> int:
    """First frame of a uniformly drawn window of `bucket` frames inside the cut."""
    return clip.cut[0] + int(rng.integers(0, clip.length - bucket + 1))


def probe(path: Path) -> None:
    """Fail early, before any model is loaded, on a video that is missing or cannot be opened."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        next(reader)  # the header
        next(reader)  # the first frame decodes
    except (OSError, RuntimeError, StopIteration, KeyError) as error:
        raise OSError(f"{path}: cannot read as a video ({_first_line(error)})") from None
    finally:
        reader.close()


def read_frames(path: Path, start: int, count: int) -> np.ndarray:
    """uint8 [count, H, W, 3] frames [start, start + count) of a video, decoding no further than needed."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        width, height = next(reader)["size"]
    except (OSError, RuntimeError, StopIteration, KeyError) as error:
        raise OSError(f"{path}: cannot read as a video ({_first_line(error)})") from None
    frames, seen = [], 0
    try:
        for raw in reader:
            if seen >= start:
                frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
                if len(frames) == count:
                    break
            seen += 1
    except (OSError, RuntimeError) as error:
        raise OSError(f"{path}: video decoding failed after {seen} frames ({_first_line(error)})") from None
    finally:
        reader.close()
    if len(frames) < count:
        raise ValueError(f"{path}: has {start + len(frames)} frames, the clip needs frames [{start}, {start + count})")
    return np.stack(frames)


def crop_and_resize(frames: np.ndarray, crop: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [3, T, height, width] in [-1, 1]: crop box, aspect center crop, resize."""
    x0, x1, y0, y1 = crop
    if x1 > frames.shape[2] or y1 > frames.shape[1]:
        raise ValueError(f"crop {list(crop)} is outside the {frames.shape[2]}x{frames.shape[1]} frames")
    frames = frames[:, y0:y1, x0:x1]
    frames = _center_crop_to_aspect(frames, height / width)
    resized = [np.asarray(PIL.Image.fromarray(f).resize((width, height), PIL.Image.Resampling.BILINEAR))
               for f in frames]
    unit = np.stack(resized).astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * unit - np.float32(1.0)).transpose(3, 0, 1, 2)


def _center_crop_to_aspect(frames: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centered box of height / width = aspect."""
    h, w = frames.shape[1:3]
    if h / w > aspect:
        new_h = max(1, round(w * aspect))
        top = (h - new_h) // 2
        return frames[:, top : top + new_h]
    new_w = max(1, round(h / aspect))
    left = (w - new_w) // 2
    return frames[:, :, left : left + new_w]


def clip_pixels(clip: Clip, videos: Path, *, height: int, width: int, rng: np.random.Generator):
    """(float32 [N, 3, 33, height, width] chunks in [-1, 1], window start) for one clip."""
    chunks = chunks_in(clip)
    if chunks < 1:
        raise ValueError(f"{clip.path}: cut {list(clip.cut)} has {clip.length} frames, "
                         f"too short for one {FRAMES_PER_CHUNK}-frame chunk")
    start = window_start(clip, length_bucket(clip.length), rng)
    frames = read_frames(videos / clip.path, start, chunks * FRAMES_PER_CHUNK)
    try:
        pixels = crop_and_resize(frames, clip.crop, height, width)
    except ValueError as error:
        raise ValueError(f"{videos / clip.path}: {error}") from None
    return pixels.reshape(3, chunks, FRAMES_PER_CHUNK, height, width).swapaxes(0, 1), start


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
