"""The video shown while it grows: each decoded chunk is encoded once as its own mp4 segment, and the
video so far is those segments joined by ffmpeg's concat demuxer with stream copy (no re-encoding, so
a chunk costs the same however long the video already is)."""
from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import imageio_ffmpeg

from helios_jax.media.video_writer import Mp4Writer


class GrowingVideo:
    """`video = GrowingVideo(folder, fps)`; `path = video.append(frames)` after each chunk gives an mp4
    of every chunk so far; `video.finish(name)` the downloadable whole."""

    def __init__(self, folder: str | Path, *, fps: int = 24):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.segments: list[Path] = []
        self.frames = 0

    def append(self, frames) -> Path:
        """uint8 frames [T, H, W, 3] of one chunk -> the path of the video so far."""
        segment = self.folder / f"segment_{len(self.segments):04d}.mp4"
        with Mp4Writer(segment, fps=self.fps) as writer:
            writer.append(frames)
        self.segments.append(segment)
        self.frames += len(frames)
        # A new name each time: the page (and its browser cache) sees every update as a new video.
        return self.join(f"so_far_{len(self.segments):04d}.mp4")

    def finish(self, name: str) -> Path:
        return self.join(name)

    def join(self, name: str) -> Path:
        if not self.segments:
            raise ValueError("no chunk has been added to the video yet")
        out = self.folder / name
        if len(self.segments) == 1:
            out.write_bytes(self.segments[0].read_bytes())
            return out
        listing = self.folder / "segments.txt"
        listing.write_text("".join(f"file '{segment.name}'\n" for segment in self.segments))
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "concat", "-safe", "0",
                   "-i", str(listing), "-c", "copy", "-movflags", "+faststart", str(out)]
        with warnings.catch_warnings():
            # ffmpeg is exec'd at once and shares nothing with JAX's threads.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{out}: joining {len(self.segments)} segments failed ({result.stderr.strip()[:200]})")
        return out
