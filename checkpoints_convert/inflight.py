"""The converter's bounded pipeline: a pool of buffers for tensors in flight, and a hashing thread.

The converter reads each source file once, front to back: the bytes it reads are both converted
(by a worker) and fed to the file's sha256 (by the hashing thread), so the hash costs no second
read pass. A tensor's buffer is held until both are done with it, and the pool caps how many
bytes such buffers (and those of the converted copies) add up to, so peak memory does not grow
with the checkpoint however far the reader runs ahead.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

import numpy as np

from checkpoints_convert.param_store import DIRECT_ALIGN
from checkpoints_convert.safetensors_folder import CheckpointError

_GAP_CHUNK = 16 << 20  # bytes the converter skips (headers, ignored tensors) are hashed in these
# How far ahead of the reader the kernel is asked to fetch the file (posix_fadvise WILLNEED): a
# cold read then overlaps the disk with the copy out of the page cache instead of alternating.
_READ_AHEAD = 256 << 20


class BufferPool:
    """Page-aligned byte buffers, reused from tensor to tensor, at most `limit` bytes allocated.

    Reuse matters: a fresh buffer's pages are faulted in and zeroed by the kernel on first touch,
    which on a small VM cost more CPU than reading the bytes into them. `take` waits while the
    buffers in use plus the request would exceed the limit; a request above the limit is served
    when nothing else is in use (the largest tensor must always pass). Free buffers that do not
    fit a request are dropped only as needed to stay within the limit."""

    def __init__(self, limit: int):
        self.limit, self.in_use, self.allocated, self.peak = limit, 0, 0, 0
        self._free: list[np.ndarray] = []
        self._changed = threading.Condition()

    def take(self, *sizes: int) -> list[np.ndarray]:
        """One buffer of at least each size (page-aligned, lengths rounded up to whole pages), all at once:
        taking them one by one could wait for each other."""
        needs = [-(-max(size, 1) // DIRECT_ALIGN) * DIRECT_ALIGN for size in sizes]
        with self._changed:
            self._changed.wait_for(lambda: self.in_use == 0 or self.in_use + sum(needs) <= self.limit)
            taken = []
            for need in needs:
                fitting = [b for b in self._free if b.size >= need]
                if fitting:
                    buffer = min(fitting, key=lambda b: b.size)
                    self._free = [b for b in self._free if b is not buffer]
                else:
                    self._free.sort(key=lambda b: b.size)
                    while self._free and self.allocated + need > max(self.limit, self.in_use + need):
                        self.allocated -= self._free.pop(0).size
                    buffer = _aligned_bytes(need)
                    self.allocated += buffer.size
                self.in_use += buffer.size
                taken.append(buffer)
            self.peak = max(self.peak, self.allocated)
            return taken

    def give(self, buffer: np.ndarray) -> None:
        with self._changed:
            self.in_use -= buffer.size
            self._free.append(buffer)
            self._changed.notify_all()


def _aligned_bytes(size: int) -> np.ndarray:
    raw = np.empty(size + DIRECT_ALIGN, np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return raw[start:start + size]


def as_array(buffer: np.ndarray, shape, dtype) -> np.ndarray:
    """The start of a pool buffer as an array of `shape` and `dtype`."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return buffer[:nbytes].view(dtype).reshape(shape)


class Hasher:
    """sha256 of files fed in order, on its own thread (hashlib releases the GIL)."""

    def __init__(self):
        self.digests: dict[Path, str] = {}
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        digest = None
        while (item := self._queue.get()) is not None:
            kind, value, done = item
            try:
                if kind == "start":
                    digest = hashlib.sha256()
                elif kind == "data":
                    digest.update(value)
                else:
                    self.digests[value] = digest.hexdigest()
            except BaseException as error:  # reported by finish()
                self._error = error
            if done is not None:
                done()

    def start_file(self, path: Path) -> None:
        self._queue.put(("start", None, None))

    def feed(self, data, done=None) -> None:
        """Hash `data` next; `done()` is called once it has been (the buffer may then be reused)."""
        self._queue.put(("data", data, done))

    def end_file(self, path: Path) -> None:
        self._queue.put(("end", path, None))

    def finish(self) -> dict[Path, str]:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.digests


class HashingFile:
    """A source file read front to back, every byte fed to the hasher exactly once: `read_into`
    reads one tensor (positioned reads), gaps between tensors are read and hashed as they are
    passed, and `finish` hashes the rest of the file."""

    def __init__(self, path: Path, hasher: Hasher, pool: BufferPool):
        self.path, self.hasher, self.pool = path, hasher, pool
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_fd = _open_direct(path)
        self.size = os.fstat(self.fd).st_size
        self.position = 0  # bytes hashed so far
        self.fetched_to = 0  # bytes the kernel was asked to read ahead
        hasher.start_file(path)

    def _read(self, view: memoryview, offset: int) -> None:
        self._fetch_ahead(offset + len(view) + _READ_AHEAD)
        done = 0
        while done < len(view):
            count = os.preadv(self.fd, [view[done:]], offset + done)
            if not count:
                raise CheckpointError(f"{self.path}: truncated at byte {offset + done}")
            done += count

    def _read_direct(self, view: memoryview, offset: int, needed: int) -> bool:
        """Read the page-aligned span `view` at `offset` with O_DIRECT (the disk straight into our
        buffer: no page-cache fill and copy, the reader's main CPU cost on a cold file); at least
        `needed` bytes must exist. False where the file system refuses, for plain reads."""
        done = 0
        try:
            while done < needed:
                count = os.preadv(self.direct_fd, [view[done:]], offset + done)
                if not count or (count % DIRECT_ALIGN and done + count < needed):
                    raise CheckpointError(f"{self.path}: truncated at byte {offset + done + count}")
                done += count
        except OSError:
            os.close(self.direct_fd)
            self.direct_fd = None
            return False
        return True

    def _fetch_ahead(self, end: int) -> None:
        end = min(end, self.size)
        if end > self.fetched_to and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self.fetched_to, end - self.fetched_to, os.POSIX_FADV_WILLNEED)
            self.fetched_to = end

    def hash_up_to(self, end: int) -> None:
        """Read and hash the bytes before `end` not hashed yet; call it before taking a tensor's
        buffers from the pool, as it takes buffers of its own."""
        while self.position < end:
            size = min(_GAP_CHUNK, end - self.position)
            (chunk,) = self.pool.take(size)
            view = memoryview(chunk)[:size]
            self._read(view, self.position)
            self.hasher.feed(view, lambda chunk=chunk: self.pool.give(chunk))
            self.position += size

    def read_tensor(self, buffer: np.ndarray, offset: int, nbytes: int, done) -> int:
        """Read `nbytes` at `offset` into `buffer` (a pool buffer of at least `nbytes + 2 *
        DIRECT_ALIGN` bytes), hash them if not hashed yet, call `done()` once the hasher no longer
        needs the buffer, and return where in `buffer` the bytes start (a direct read starts at the
        page boundary before `offset`)."""
        self.hash_up_to(offset)
        lead = offset % DIRECT_ALIGN
        span = -(-(lead + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
        if self.direct_fd is not None and self._read_direct(memoryview(buffer)[:span], offset - lead, lead + nbytes):
            self._hash_read(memoryview(buffer)[lead:lead + nbytes], offset, done)
            return lead
        self.read_into(memoryview(buffer)[:nbytes], offset, done)
        return 0

    def read_into(self, view: memoryview, offset: int, done) -> None:
        """Read `len(view)` bytes at `offset` into `view`, hash them if not hashed yet, and call
        `done()` once the hasher no longer needs the buffer."""
        self.hash_up_to(offset)
        self._read(view, offset)
        self._hash_read(view, offset, done)

    def _hash_read(self, view: memoryview, offset: int, done) -> None:
        end = offset + len(view)
        if end > self.position:  # (bytes shared with an earlier tensor were hashed with it)
            self.hasher.feed(view[self.position - offset:], done)
            self.position = end
        else:
            done()

    def finish(self) -> None:
        """Hash the rest of the file and hand the hasher its end."""
        self.hash_up_to(self.size)
        self.hasher.end_file(self.path)

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)


def _open_direct(path: Path) -> int | None:
    """A second descriptor reading `path` with O_DIRECT, or None where that is not available."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
