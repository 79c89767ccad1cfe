"""Interactive mode for the web demo: the prompt of a running request, which the page may change
at any time; the chunk loop asks for each chunk's embedding just before running it.

The switch uses the CSV mode's blend (sampling/interactive.py: lerp from the previous embedding with
linspace weights, same arithmetic), but starts at once: with `transition_chunks` = S the next S chunks
take weights linspace(0, 1, S + 1)[1:], so S = 1 (the default) switches on the very next chunk and
S = 3 goes 1/3, 2/3, then the new prompt. A prompt posted during a blend blends on from the embedding
the last chunk used.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from helios_jax.sampling.interactive import blend_embeddings, interpolation_weights


class LivePrompt:
    def __init__(self, prompt: str, encode: Callable[[str], np.ndarray], *, transition_chunks: int = 1):
        """`encode(text)` -> embedding [1, L, D] (the pipeline's text encoder)."""
        if transition_chunks < 1:
            raise ValueError(f"transition_chunks={transition_chunks}: must be at least 1")
        self._encode = encode
        self._lock = threading.Lock()  # post() comes from the page's thread, for_chunk() from the worker's
        self._pending: str | None = None
        self._weights = interpolation_weights(transition_chunks + 1)[1:]
        self._target = np.asarray(encode(prompt))
        self.initial = self._target  # the first prompt's embedding
        self._last = self._target
        self._blend_from: np.ndarray | None = None
        self._position = 0
        self.text = prompt  # the prompt the latest chunk follows (fully or blending towards)
        self.chunk_texts: list[str] = []  # per chunk run so far

    def post(self, text: str) -> None:
        """A new prompt for the chunks still to come (thread-safe; the last one posted wins)."""
        text = text.strip()
        if not text:
            raise ValueError("new prompt: empty")
        with self._lock:
            self._pending = text

    @property
    def pending(self) -> str | None:
        with self._lock:
            return self._pending

    def for_chunk(self, chunk_index: int) -> np.ndarray:
        """The embedding [1, L, D] chunk `chunk_index` runs with; takes up a posted prompt first."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._blend_from, self._target, self._position = self._last, np.asarray(self._encode(pending)), 0
            self.text = pending
        if self._blend_from is not None:
            weight = self._weights[self._position]
            pair = np.concatenate([self._blend_from, self._target], axis=0)
            self._last = blend_embeddings(pair, 0, 1, weight)[None]
            self._position += 1
            if self._position == len(self._weights):
                self._blend_from = None
        else:
            self._last = self._target
        self.chunk_texts.append(self.text)
        return self._last
