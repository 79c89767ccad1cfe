"""The video shown while it grows, and how long its files live.

Each decoded chunk is encoded once as its own mp4 segment and joined onto the video so far with
ffmpeg's concat demuxer and stream copy (no re-encoding, so a chunk costs the same however long the
video already is; joining the previous join and one segment gives the same packets as joining every
segment at once). Each join gets a new name, so the page (and its browser cache) sees every update
as a new video. Superseded files are deleted as the video grows: the folder holds the latest join
and the one before it (the page may still be fetching it), so disk use stays at most about twice
the video's size instead of growing with the square of its length.

`RequestFolders` gives each request a folder of its own and removes it once nothing shows it: when
its browser session starts another request (after this one ended), when the session ends (the tab
is closed), or when the server process exits.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import imageio_ffmpeg

from helios_jax.media.video_writer import Mp4Writer


class GrowingVideo:
    """`video = GrowingVideo(folder, fps)`; `path = video.append(frames)` after each chunk gives an mp4
    of every chunk so far; `video.finish(name)` the downloadable whole; `video.close()` at the end
    deletes what the page no longer shows. `folder` is the video's own (a request's folder)."""

    def __init__(self, folder: str | Path, *, fps: int = 24):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.chunks = 0
        self.frames = 0
        self.latest: Path | None = None  # the video so far, the last path handed out
        self.previous: Path | None = None  # the one before: the page may still be reading it
        self.finished: Path | None = None

    def append(self, frames) -> Path:
        """uint8 frames [T, H, W, 3] of one chunk -> the path of the video so far."""
        segment = self.folder / f"segment_{self.chunks + 1:04d}.mp4"
        with Mp4Writer(segment, fps=self.fps) as writer:
            writer.append(frames)
        so_far = self.folder / f"so_far_{self.chunks + 1:04d}.mp4"
        try:
            if self.latest is None:
                segment.rename(so_far)
            else:
                self._join([self.latest, segment], so_far)
        finally:
            segment.unlink(missing_ok=True)
        self.chunks += 1
        self.frames += len(frames)
        self._supersede(so_far)
        return so_far

    def finish(self, name: str) -> Path:
        """The whole video under `name` (the download): a second name for the latest join, no new bytes."""
        if self.latest is None:
            raise ValueError("no chunk has been added to the video yet")
        out = self.folder / name
        out.unlink(missing_ok=True)
        try:
            os.link(self.latest, out)
        except OSError:  # a file system without hard links
            shutil.copyfile(self.latest, out)
        self.finished = out
        return out

    def close(self) -> None:
        """Deletes the join before the latest. The latest (on the page) and the finished mp4 stay
        until the request's folder is removed (RequestFolders)."""
        self._unlink(self.previous)
        self.previous = None

    def _supersede(self, so_far: Path) -> None:
        self._unlink(self.previous)
        self.previous, self.latest = self.latest, so_far

    @staticmethod
    def _unlink(path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)

    def _join(self, parts: list[Path], out: Path) -> None:
        listing = self.folder / "parts.txt"
        listing.write_text("".join(f"file '{part.name}'\n" for part in parts))
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "concat", "-safe", "0",
                   "-i", str(listing), "-c", "copy", "-movflags", "+faststart", str(out)]
        try:
            with warnings.catch_warnings():
                # ffmpeg is exec'd at once and shares nothing with JAX's threads.
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        finally:
            listing.unlink(missing_ok=True)
        if result.returncode != 0:
            out.unlink(missing_ok=True)
            raise OSError(f"{out}: joining chunk {self.chunks + 1} onto the video failed "
                          f"({result.stderr.strip()[:200]})")


class RequestFolders:
    """A folder per request under `work_dir`, removed once no page shows its video (see the module
    docstring). Thread-safe: requests, session ends and the exit hook come from different threads."""

    def __init__(self, work_dir: str | Path, *, remove_work_dir: bool = False):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._remove_work_dir = remove_work_dir
        self._lock = threading.Lock()
        self._current: dict[str, Path] = {}  # session -> its latest request's folder
        self._running: set[Path] = set()
        self._obsolete: set[Path] = set()  # superseded while their request still runs: removed at its end
        atexit.register(self.remove_all)

    def open(self, session: str) -> Path:
        """A new folder for the session's next request; the session's previous one goes."""
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.work_dir))
        with self._lock:
            previous = self._current.get(session)
            self._current[session] = folder
            self._running.add(folder)
        self._drop(previous)
        return folder

    def request_ended(self, folder: Path) -> None:
        with self._lock:
            self._running.discard(folder)
            remove = folder in self._obsolete or folder not in self._current.values()
            self._obsolete.discard(folder)
        if remove:
            shutil.rmtree(folder, ignore_errors=True)

    def end_session(self, session: str) -> None:
        with self._lock:
            folder = self._current.pop(session, None)
        self._drop(folder)

    def remove_all(self) -> None:
        """Every request folder (at server exit)."""
        with self._lock:
            folders = set(self._current.values()) | self._obsolete | self._running
            self._current.clear()
            self._obsolete.clear()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if self._remove_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _drop(self, folder: Path | None) -> None:
        """Remove a folder no page needs any more, or, while its request still writes, at its end."""
        if folder is None:
            return
        with self._lock:
            if folder in self._running:
                self._obsolete.add(folder)
                return
        shutil.rmtree(folder, ignore_errors=True)
