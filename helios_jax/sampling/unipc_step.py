"""HeliosScheduler's UniPC step (bh2, order 2, predict-x0, flow sigmas) as a pure jnp function
(spec sampler.md §3.5).

All sigma-dependent scalars (ratios, phi/B terms, r_k and the corrector's 2x2 solve) depend only on
the schedule, so `unipc_tables` computes them once on the host in float64, as the reference does.
The step then only indexes those tables with the step index and carries a small state pytree
(last corrected sample and the last two x0 predictions), so it runs inside lax.scan / fori_loop.
Each float64 scalar is rounded to the sample dtype before it multiplies a tensor, which is what
torch does with a 0-dim float64 tensor times an fp32 tensor.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SOLVER_ORDER = 2


class UniPCTables(NamedTuple):
    """Per-step coefficients, each shape (n,). p_* = predictor (UniP), c_* = corrector (UniC)."""

    sigma: np.ndarray  # S[i], for x0 = x - S[i] * v
    p_order: np.ndarray  # 1 or 2
    p_ratio: np.ndarray  # sig(S[i+1]) / sig(S[i])
    p_alpha_phi: np.ndarray  # alpha(S[i+1]) * expm1(-h); with bh2, B(h) = expm1(-h) too
    p_rk: np.ndarray  # (lambda(S[i-1]) - lambda(S[i])) / h; 1 where unused
    c_order: np.ndarray  # previous step's order; 0 at step 0 (no corrector)
    c_ratio: np.ndarray
    c_alpha_phi: np.ndarray
    c_rk: np.ndarray
    c_rho0: np.ndarray  # corrector weights (rho for D1s, rho for m_i - m_{i-1})
    c_rho1: np.ndarray


class UniPCState(NamedTuple):
    last_sample: jax.Array  # the (corrected) sample that entered the previous predictor
    m_prev: jax.Array  # x0 prediction of step i-1
    m_prev2: jax.Array  # x0 prediction of step i-2


def init_state(sample: jax.Array) -> UniPCState:
    zeros = jnp.zeros_like(sample)
    return UniPCState(zeros, zeros, zeros)


def unipc_tables(sigmas: np.ndarray) -> UniPCTables:
    """Coefficients for a schedule of n+1 sigmas (last = 0), in float64."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    alpha = 1 - s
    sig = np.maximum(s, 1e-8)
    lam = np.log(alpha) - np.log(sig)

    cols = {name: np.zeros(n) for name in UniPCTables._fields}
    cols["sigma"] = s[:n].copy()
    for i in range(n):
        # lower_order_final + warm-up: order 1 at the first and the last step.
        order = min(SOLVER_ORDER, n - i, min(i, SOLVER_ORDER) + 1)
        h = lam[i + 1] - lam[i]
        phi = np.expm1(-h)
        cols["p_order"][i] = order
        cols["p_ratio"][i] = sig[i + 1] / sig[i]
        cols["p_alpha_phi"][i] = alpha[i + 1] * phi
        cols["p_rk"][i] = (lam[i - 1] - lam[i]) / h if order == 2 else 1.0

        cols["c_rk"][i] = 1.0
        if i == 0:
            continue
        c_order = cols["p_order"][i - 1]
        h = lam[i] - lam[i - 1]
        hh = -h
        phi = np.expm1(hh)
        cols["c_order"][i] = c_order
        cols["c_ratio"][i] = sig[i] / sig[i - 1]
        cols["c_alpha_phi"][i] = alpha[i] * phi
        if c_order == 1:
            cols["c_rho1"][i] = 0.5
        else:
            rk = (lam[i - 2] - lam[i - 1]) / h
            b1 = (phi / hh - 1) / phi
            b2 = ((phi / hh - 1) / hh - 0.5) * 2 / phi
            rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
            cols["c_rk"][i] = rk
            cols["c_rho0"][i], cols["c_rho1"][i] = rho
    return UniPCTables(**cols)


def unipc_step(
    tables: UniPCTables,
    model_output: jax.Array,
    sample: jax.Array,
    step_index: jax.Array | int,
    state: UniPCState,
) -> tuple[jax.Array, UniPCState]:
    """One UniPC step: corrector on `sample` (from step 1 on), then predictor to S[i+1]."""
    dtype = sample.dtype
    t = {name: jnp.asarray(value, dtype if name not in ("p_order", "c_order") else jnp.int32)[step_index]
         for name, value in tables._asdict().items()}
    m_i = sample - t["sigma"] * model_output  # x0 from the uncorrected sample the model saw
    m1, m2 = state.m_prev, state.m_prev2

    # UniC: (rho0 * D1s + rho1 * D1_t), as the reference adds the terms.
    x_c = t["c_ratio"] * state.last_sample - t["c_alpha_phi"] * m1
    d1_t = m_i - m1
    corr = jnp.where(t["c_order"] == 2, t["c_rho0"] * ((m2 - m1) / t["c_rk"]) + t["c_rho1"] * d1_t, t["c_rho1"] * d1_t)
    x = jnp.where(t["c_order"] > 0, x_c - t["c_alpha_phi"] * corr, sample)

    # UniP with rho = 0.5 for order 2.
    x_p = t["p_ratio"] * x - t["p_alpha_phi"] * m_i
    d1 = (m1 - m_i) / t["p_rk"]
    x_next = jnp.where(t["p_order"] == 2, x_p - t["p_alpha_phi"] * (0.5 * d1), x_p)
    return x_next.astype(dtype), UniPCState(last_sample=x, m_prev=m_i, m_prev2=m1)
