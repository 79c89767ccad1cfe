"""Streaming mp4 output: frames go to ffmpeg as each chunk is decoded, and the file appears atomically.

Encoding settings are diffusers' `export_to_video` (imageio's ffmpeg writer, libx264, quality 5,
macro_block_size 16), so our files match the reference's. Frames are piped one at a time, so memory
stays flat however long the video is. ffmpeg writes to a temporary file beside the destination, which is
renamed onto it only on a clean close; on any failure nothing is left at the destination.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

MACRO_BLOCK_SIZE = 16  # as export_to_video: sizes not divisible by 16 are scaled up by ffmpeg


class Mp4Writer:
    """`with Mp4Writer(path, fps=24) as out: out.append(uint8 [T, H, W, 3]) ...`"""

    def __init__(self, path: str | os.PathLike, *, fps: float = 24, quality: float = 5):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise OSError(f"{self.path}: parent folder {self.path.parent} does not exist")
        if self.path.is_dir():
            raise OSError(f"{self.path}: is a folder, expected an .mp4 file path")
        if not fps > 0:
            raise ValueError(f"fps={fps}: must be positive")
        self.fps, self.quality = fps, quality
        self.frames_written = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._writer = None
        self._partial: Path | None = None

    def __enter__(self) -> "Mp4Writer":
        self.open()
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False  # never swallow the caller's exception

    def open(self) -> None:
        if self._partial is not None:
            raise ValueError(f"{self.path}: writer is already open")
        # Same folder as the destination so that the final rename is atomic; .mp4 so ffmpeg picks the muxer.
        handle, partial = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".partial.mp4", dir=self.path.parent)
        os.close(handle)
        self._partial = Path(partial)
        try:
            self._writer = imageio.get_writer(self._partial, format="FFMPEG", mode="I", fps=self.fps,
                                              quality=self.quality, macro_block_size=MACRO_BLOCK_SIZE)
        except Exception:
            self.abort()
            raise

    def append(self, frames) -> None:
        """Encodes uint8 frames [T, H, W, 3]; every call must use the same H and W."""
        if self._writer is None:
            raise ValueError(f"{self.path}: writer is not open (use it as a context manager)")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames: {frames.dtype} {frames.shape}, expected uint8 [T, H, W, 3]")
        if self._frame_shape is None:
            self._frame_shape = frames.shape[1:]
        elif frames.shape[1:] != self._frame_shape:
            raise ValueError(f"frames: size {frames.shape[1:]} differs from the first frames' {self._frame_shape}")
        with warnings.catch_warnings():
            # The first frame starts ffmpeg, an exec'd child sharing nothing with JAX's threads.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            for frame in frames:
                self._writer.append_data(frame)
                self.frames_written += 1

    def close(self) -> None:
        """Finishes encoding and moves the file into place; on failure removes it and raises."""
        if self._writer is None:
            return
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"{self.path}: no frames were appended, nothing written")
        writer, self._writer = self._writer, None
        try:
            writer.close()
            os.chmod(self._partial, 0o666 & ~_umask())  # mkstemp makes it private; a video is not
            os.replace(self._partial, self.path)
        except Exception:
            self.abort()
            raise
        self._partial = None

    def abort(self) -> None:
        """Stops ffmpeg and deletes the partial file; the destination is left untouched."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # ffmpeg may already be dead; the partial file goes either way
                pass
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
            self._partial = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
