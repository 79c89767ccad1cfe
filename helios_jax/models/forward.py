"""A jitted transformer forward: parameters are an argument, so one compile serves every call of the
same shapes (and a new checkpoint of the same config)."""
from __future__ import annotations

import jax
from flax import nnx


def make_forward(model):
    """Returns (forward, state): `forward(state, **inputs)` runs the model compiled once per input shape."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, **inputs):
        return nnx.merge(graphdef, state)(**inputs)

    return forward, state


def parameter_count(model_or_state) -> int:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
