"""HeliosDMDScheduler's step as a pure jnp function (spec sampler.md §3.5, "DMD").

Each step predicts x0 from the flow output and re-noises it towards the stage's own start point
(no fresh noise); the last step returns x0. The index lookup in the reference goes through
argmin |timesteps - int(t)|, which always resolves to the step index, so this is index-based and
can run inside lax.scan / fori_loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dmd_step(
    model_output: jax.Array,
    sample: jax.Array,
    stage_start: jax.Array,
    step_index: jax.Array | int,
    sigmas: np.ndarray | jax.Array,
) -> jax.Array:
    """One DMD step. `sigmas` is the stage schedule (n+1 values ending at 0).

    The reference computes in float64; without jax x64 this runs in float32 (at least), which for
    the bf16/fp32 tensors the pipeline uses agrees to ~1 ulp of fp32 before the final cast.
    The result has stage_start's dtype (the reference returns x0 in the model output's dtype on
    the last step; the pipeline keeps both in one dtype).
    """
    compute = jnp.promote_types(sample.dtype, jnp.float32)
    sigmas = jnp.asarray(sigmas, compute)
    sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
    x0 = (sample.astype(compute) - sigma * model_output.astype(compute)).astype(model_output.dtype)
    renoised = (1 - sigma_next) * x0.astype(compute) + sigma_next * stage_start.astype(compute)
    is_last = step_index >= sigmas.shape[0] - 2
    return jnp.where(is_last, x0.astype(compute), renoised).astype(stage_start.dtype)
