"""The device side of the server: pipelines loaded and compiled once at start-up, shared by every
request; a request's chunks run one at a time under one device lock, so requests queue for the
device and a cancelled request (whose chunk in flight still finishes) cannot overlap the next."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from helios_jax.distributed import log
from helios_jax.serve.growing_video import GrowingVideo
from helios_jax.serve.live_prompt import LivePrompt
from helios_jax.serve.validation import GenerationRequest

# Test and debugging hooks, called on the worker's thread just before a chunk runs:
# BeforeChunkHook(request_number, chunk_index) before the chunk's prompt is read (it may wait: the device waits);
# PromptHook(request_number, chunk_index, prompt_embeds [1, L, D]) with the embedding the pipeline receives.
BeforeChunkHook = Callable[[int, int], None]
PromptHook = Callable[[int, int, np.ndarray], None]


@dataclass
class Progress:
    request_number: int
    chunks_done: int
    num_chunks: int
    frames_done: int
    seconds: float  # since the request got the device
    video_so_far: Path
    prompt: str  # the prompt the latest chunk followed
    finished: Path | None = None  # the whole mp4, on the last update only

    @property
    def frames_per_second(self) -> float:
        return self.frames_done / max(self.seconds, 1e-9)


@dataclass
class PromptRecorder:
    """A PromptHook keeping the embeddings each chunk of each request received (tests, debugging)."""

    received: dict = field(default_factory=dict)  # request_number -> [embeds of chunk 0, chunk 1, ...]

    def __call__(self, request_number: int, chunk_index: int, embeds: np.ndarray) -> None:
        chunks = self.received.setdefault(request_number, [])
        assert len(chunks) == chunk_index, f"chunk {chunk_index} recorded out of order"
        chunks.append(np.array(embeds))


class Worker:
    def __init__(self, pipelines: dict, *, height: int, width: int, sampling: dict | None = None, fps: int = 24,
                 transition_chunks: int = 1):
        """`pipelines`: variant -> HeliosPipeline; `sampling`: iter_chunks settings every request uses
        (steps, amplification); `height`/`width`: the default size, compiled at warm-up."""
        self.pipelines = pipelines
        self.height, self.width = height, width
        self.sampling = dict(sampling or {})
        self.fps = fps
        self.transition_chunks = transition_chunks
        self.before_chunk_hooks: list[BeforeChunkHook] = []
        self.prompt_hooks: list[PromptHook] = []
        # Reentrant: a chunk (run under the lock) encodes a newly posted prompt under it too.
        self._device = threading.RLock()
        self._numbers = itertools.count(1)

    def warm_up(self, num_chunks: int = 2) -> None:
        """Compiles the chunk programs (first and later chunks) and the decoder at the default size, so
        the first request streams at full speed."""
        for variant, pipe in self.pipelines.items():
            started = time.perf_counter()
            frames = num_chunks * pipe.frame_plan(1).frames_per_chunk
            with self._device:
                chunks = list(pipe.iter_chunks("warm-up", height=self.height, width=self.width, num_frames=frames,
                                               decode=False, **self.sampling))
                pipe.decode_chunk(chunks[-1].latents)
            log(f"serve: {variant} compiled at {self.width}x{self.height} in {time.perf_counter() - started:.1f} s")

    def encode(self, variant: str, text: str) -> np.ndarray:
        pipe = self.pipelines[variant]
        if pipe.text_encoder is None:
            raise ValueError(f"the {variant} model has no text encoder")
        with self._device:
            return np.asarray(pipe.text_encoder.encode([text]))

    def live_prompt(self, request: GenerationRequest) -> LivePrompt:
        return LivePrompt(request.prompt, lambda text: self.encode(request.variant, text),
                          transition_chunks=self.transition_chunks)

    def generate(self, request: GenerationRequest, live: LivePrompt, folder: str | Path) -> Iterator[Progress]:
        """Runs one request, yielding after each decoded chunk; closing the iterator stops it between chunks.
        `folder` is the request's own: it holds the latest video and the one before, at most."""
        pipe = self.pipelines[request.variant]
        number = next(self._numbers)

        def prompt_for_chunk(chunk_index: int) -> np.ndarray:
            for hook in list(self.before_chunk_hooks):
                hook(number, chunk_index)
            embeds = live.for_chunk(chunk_index)
            for hook in list(self.prompt_hooks):
                hook(number, chunk_index, embeds)
            return embeds

        chunks = pipe.iter_chunks(
            negative_prompt=request.negative_prompt, prompt_embeds=live.initial, height=request.height,
            width=request.width, num_frames=request.num_frames, seed=request.seed, image=request.image,
            video=request.video, prompt_for_chunk=prompt_for_chunk, **self.sampling)
        video = GrowingVideo(folder, fps=self.fps)
        started = None
        try:
            while True:
                with self._device:
                    started = started or time.perf_counter()
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                so_far = video.append(chunk.frames[0])
                last = chunk.index == chunk.num_chunks - 1
                finished = video.finish(f"helios_{request.variant}_seed{request.seed}.mp4") if last else None
                yield Progress(number, chunk.index + 1, chunk.num_chunks, video.frames, time.perf_counter() - started,
                               so_far, live.text, finished)
        finally:
            chunks.close()
            video.close()  # only what the page shows stays: the latest video (the finished mp4, if done)
