"""Conditioning pixels for I2V and V2V: images and videos as float32 in [-1, 1], channels first.

The numbers are those of the reference path (spec sampler.md 6): PIL frames, resized to (W, H) only when
their size differs, then diffusers' VaeImageProcessor arithmetic in float32, x / 255 * 2 - 1.

* Image: `infer_helios.py` resizes with PIL's default filter (bicubic) before the pipeline, whose own
  lanczos resize is then a no-op, so `load_image` defaults to bicubic.
* Video: diffusers' `load_video` gives PIL frames and `preprocess_video` resizes each with lanczos.
"""
from __future__ import annotations

import os
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import PIL.Image
import PIL.ImageOps

RESAMPLE = {"bicubic": PIL.Image.Resampling.BICUBIC, "lanczos": PIL.Image.Resampling.LANCZOS,
            "bilinear": PIL.Image.Resampling.BILINEAR, "nearest": PIL.Image.Resampling.NEAREST}
SPATIAL_MULTIPLE = 8  # diffusers silently rounds other sizes down to this; we refuse them instead


def load_image(image, height: int, width: int, *, resample: str = "bicubic") -> np.ndarray:
    """A path, PIL image or uint8 [H, W, 3] array -> float32 [1, 3, height, width] in [-1, 1]."""
    _check_size(height, width)
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image))
    return _normalise(_fit(_as_rgb_pil(image, "image"), height, width, resample))[None].transpose(0, 3, 1, 2)


def load_video(video, height: int, width: int, *, resample: str = "lanczos") -> np.ndarray:
    """A path (any format ffmpeg reads), a list of PIL frames or uint8 [F, H, W, 3] -> float32
    [1, 3, F, height, width] in [-1, 1]. Frames are resized one at a time as they are decoded."""
    _check_size(height, width)
    frames = _read_video_frames(Path(video)) if isinstance(video, (str, os.PathLike)) else video
    processed = [_normalise(_fit(_as_rgb_pil(frame, "video frame"), height, width, resample)) for frame in frames]
    if not processed:
        raise ValueError("video: no frames given")
    return np.stack(processed)[None].transpose(0, 4, 1, 2, 3)


def _check_size(height, width) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value <= 0 or value % SPATIAL_MULTIPLE:
            raise ValueError(f"{name}={value!r}: must be a positive multiple of {SPATIAL_MULTIPLE}")


def _open_image(path: Path) -> PIL.Image.Image:
    if not path.is_file():
        raise OSError(f"{path}: no such image file")
    try:
        with PIL.Image.open(path) as opened:
            # As diffusers.utils.load_image: honour the EXIF orientation, then RGB.
            return PIL.ImageOps.exif_transpose(opened).convert("RGB")
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise OSError(f"{path}: cannot read as an image ({error})") from None


def _read_video_frames(path: Path):
    """Yields uint8 [H, W, 3] frames decoded by ffmpeg (rgb24, as imageio's reader in diffusers)."""
    if not path.is_file():
        raise OSError(f"{path}: no such video file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        width, height = meta["size"]
    except (OSError, RuntimeError, StopIteration, KeyError) as error:
        raise OSError(f"{path}: cannot read as a video ({_first_line(error)})") from None
    count = 0
    try:
        for raw in reader:
            count += 1
            yield np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    except (OSError, RuntimeError) as error:
        raise OSError(f"{path}: video decoding failed after {count} frames ({_first_line(error)})") from None
    finally:
        reader.close()
    if count == 0:
        raise OSError(f"{path}: the video has no frames")


def _as_rgb_pil(frame, what: str) -> PIL.Image.Image:
    if isinstance(frame, PIL.Image.Image):
        return frame if frame.mode == "RGB" else frame.convert("RGB")
    array = np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"{what}: {array.dtype} {array.shape}, expected a PIL image or uint8 [H, W, 3]")
    return PIL.Image.fromarray(array)


def _fit(image: PIL.Image.Image, height: int, width: int, resample: str) -> PIL.Image.Image:
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}: expected one of {sorted(RESAMPLE)}")
    if image.size == (width, height):
        return image  # PIL's same-size resize is a copy, so skipping it changes nothing
    return image.resize((width, height), resample=RESAMPLE[resample])


def _normalise(image: PIL.Image.Image) -> np.ndarray:
    """uint8 HWC -> float32 HWC in [-1, 1], in diffusers' order of float32 operations."""
    unit = np.asarray(image).astype(np.float32) / np.float32(255.0)
    return np.float32(2.0) * unit - np.float32(1.0)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
