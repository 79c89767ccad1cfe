"""Every random draw the sampler makes, in the order the diffusers Helios pipelines make them
(spec sampler.md §11.1): from a seed (jax.random) or replayed from a list of arrays.

Replay is how tests reproduce a reference run exactly: torch's generator streams cannot be
reproduced in JAX, so the reference's draws are recorded and fed back one array per draw.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


class NoiseSource:
    """`normal(shape)` and `uniform(shape)` in draw order; `finish()` checks a replay was used up."""

    def __init__(self, seed: int = 0, *, replay: Iterable | None = None):
        self._key = jax.random.key(seed)
        self._replay = None if replay is None else iter(replay)
        self.draws = 0

    def normal(self, shape) -> jax.Array:
        return self._draw("normal", tuple(int(s) for s in shape))

    def uniform(self, shape) -> jax.Array:
        """U[0, 1) in fp32, as torch.rand."""
        return self._draw("uniform", tuple(int(s) for s in shape))

    def finish(self) -> None:
        """A replayed run must consume exactly the arrays it was given: more means the orders differ."""
        if self._replay is not None and next(self._replay, None) is not None:
            raise ValueError(f"noise: the sampler made {self.draws} draws but more arrays were given")

    def _draw(self, kind: str, shape: tuple[int, ...]) -> jax.Array:
        index = self.draws
        self.draws += 1
        if self._replay is not None:
            array = next(self._replay, None)
            if array is None:
                raise ValueError(f"noise: draw #{index} ({kind}, shape {shape}) needed but only {index} arrays were given")
            array = np.asarray(array, np.float32)
            if array.shape != shape:
                raise ValueError(f"noise: draw #{index} ({kind}) must have shape {shape}; got {array.shape}")
            return jnp.asarray(array)
        key = jax.random.fold_in(self._key, index)
        sample = jax.random.normal if kind == "normal" else jax.random.uniform
        return sample(key, shape, jnp.float32)
