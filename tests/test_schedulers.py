"""Scheduler parity against diffusers' HeliosScheduler / HeliosDMDScheduler and the spec's golden
schedules (spec sampler.md §3). Torch is test-only."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from helios_jax.sampling import schedule_tables as st

GOLDEN = Path("/work/shared/spec/sampler_golden_schedules.json")

# Per-variant scheduler configs (spec §0 / §9).
BASE = {"_class_name": "HeliosScheduler", "stages": 1, "scheduler_type": "unipc",
        "use_dynamic_shifting": True, "time_shift_type": "exponential"}
MID = {"_class_name": "HeliosScheduler", "stages": 3, "scheduler_type": "unipc",
       "use_dynamic_shifting": True, "time_shift_type": "exponential"}
DISTILLED = {"_class_name": "HeliosDMDScheduler", "stages": 3,
             "use_dynamic_shifting": True, "time_shift_type": "linear"}

MU_540, MU_2160, MU_8640 = (st.dynamic_shift_mu(n, st.SchedulerConfig()) for n in (540, 2160, 8640))
PYRAMID_MUS = (MU_540, MU_540, MU_2160)  # mu from the pre-upsample latents (spec §3.2 quirk)


def _diffusers_scheduler(config):
    from diffusers.schedulers.scheduling_helios import HeliosScheduler
    from diffusers.schedulers.scheduling_helios_dmd import HeliosDMDScheduler

    cls = HeliosDMDScheduler if config["_class_name"] == "HeliosDMDScheduler" else HeliosScheduler
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def _ours(config):
    cfg = st.from_config_json(config)
    return cfg, st.stage_constants(cfg)


def _reference_schedules(config, steps, amplify=False):
    """[(timesteps, sigmas)] per stage from diffusers' set_timesteps, as the pipelines call it."""
    ref = _diffusers_scheduler(config)
    if config["stages"] == 1:
        ref.set_timesteps(steps[0], sigmas=np.linspace(0.999, 0.0, steps[0] + 1)[:-1], mu=MU_8640)
        return [(ref.timesteps.numpy(), ref.sigmas.numpy())]
    out = []
    for stage, (n, mu) in enumerate(zip(steps, PYRAMID_MUS)):
        kwargs = {"is_amplify_first_chunk": amplify} if amplify else {}
        ref.set_timesteps(n, stage, mu=mu, **kwargs)
        out.append((ref.timesteps.numpy(), ref.sigmas.numpy()))
    return out


def _our_schedules(config, steps, amplify=False):
    cfg, constants = _ours(config)
    if cfg.stages == 1:
        return [st.make_schedule(cfg, constants, steps[0], mu=MU_8640)]
    return [st.make_schedule(cfg, constants, n, i, mu=mu, is_amplify_first_chunk=amplify)
            for i, (n, mu) in enumerate(zip(steps, PYRAMID_MUS))]


@pytest.mark.parametrize(
    "config,steps,amplify",
    [(BASE, [50], False), (MID, [20, 20, 20], False), (DISTILLED, [2, 2, 2], False), (DISTILLED, [2, 2, 2], True)],
    ids=["base", "mid", "distilled", "distilled-amplified"],
)
def test_set_timesteps_matches_diffusers(config, steps, amplify):
    reference = _reference_schedules(config, steps, amplify)
    ours = _our_schedules(config, steps, amplify)
    for (ref_t, ref_s), sched in zip(reference, ours):
        assert ref_t.dtype == np.float64 and ref_s.dtype == np.float64
        np.testing.assert_array_equal(sched.timesteps, ref_t)
        np.testing.assert_array_equal(sched.sigmas, ref_s)


def test_stage_constants_match_diffusers():
    ref = _diffusers_scheduler(MID)
    _, constants = _ours(MID)
    for i in range(3):
        assert constants.start_sigmas[i] == ref.start_sigmas[i]
        assert constants.end_sigmas[i] == ref.end_sigmas[i]
        assert constants.ori_start_sigmas[i] == ref.ori_start_sigmas[i]
        assert constants.timestep_ratios[i] == ref.timestep_ratios[i]
        np.testing.assert_array_equal(constants.windows[i].timesteps, ref.timesteps_per_stage[i].numpy())
        np.testing.assert_array_equal(constants.windows[i].sigmas, ref.sigmas_per_stage[i].numpy())


def _close(ours, golden, rtol=1e-12):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(golden, np.float64), rtol=rtol, atol=1e-12)


def test_golden_schedules():
    golden = json.loads(GOLDEN.read_text())
    for key, tokens in (("tokens_540", 540), ("tokens_2160", 2160), ("tokens_8640", 8640)):
        assert math.isclose(st.dynamic_shift_mu(tokens, st.SchedulerConfig()), golden["mu"][key], rel_tol=1e-14)

    _, constants = _ours(MID)
    gc = golden["stage_constants"]
    for i in range(3):
        _close(constants.start_sigmas[i], gc["start_sigmas"][str(i)])
        _close(constants.end_sigmas[i], gc["end_sigmas"][str(i)])
        _close(constants.timestep_ratios[i], gc["timestep_ratios"][str(i)])
        _close(constants.windows[i].timesteps.max(), gc["timesteps_per_stage_max"][str(i)])
        _close(constants.windows[i].timesteps.min(), gc["timesteps_per_stage_min"][str(i)])

    cases = [
        ("base_384x640_50steps_exponential", BASE, [50], False),
        ("mid_384x640_20x3_exponential", MID, [20, 20, 20], False),
        ("distilled_384x640_2x3_linear", DISTILLED, [2, 2, 2], False),
        ("distilled_384x640_2x3_linear_amplified_first_chunk", DISTILLED, [2, 2, 2], True),
    ]
    for key, config, steps, amplify in cases:
        entries = golden[key] if isinstance(golden[key], list) else [golden[key]]
        ours = _our_schedules(config, steps, amplify)
        assert len(entries) == len(ours), key
        for entry, sched in zip(entries, ours):
            _close(sched.timesteps, entry["timesteps"])
            _close(sched.sigmas, entry["sigmas"])
            assert [int(t) for t in sched.timesteps] == entry["timesteps_int64"], key

    unshifted = dict(DISTILLED, use_dynamic_shifting=False)
    for key, amplify in (("normal", False), ("amplified", True)):
        ours = _our_schedules(unshifted, [2, 2, 2], amplify)
        for entry, sched in zip(golden["distilled_unshifted_reference_check"][key], ours):
            _close(sched.timesteps, entry["timesteps"])
            _close(sched.sigmas, entry["sigmas"])


def test_config_loading_refuses_unknowns(tmp_path):
    with pytest.raises(ValueError, match="unsupported scheduler _class_name"):
        st.from_config_json({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(NotImplementedError, match="solver_type"):
        st.from_config_json(dict(MID, solver_type="bh1"))
    with pytest.raises(NotImplementedError, match="scheduler_type"):
        st.from_config_json(dict(MID, scheduler_type="euler"))
    assert st.from_config_json(dict(MID, scheduler_type="dmd")).kind == "dmd"
    assert st.from_config_json({"_class_name": "HeliosDMDScheduler"}).time_shift_type == "linear"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(DISTILLED, _diffusers_version="0.42.1")))
    cfg = st.from_folder(str(tmp_path))
    assert cfg.kind == "dmd" and cfg.time_shift_type == "linear" and cfg.use_dynamic_shifting


# ----------------------------------------------------------------------------------------------
# Step parity on random fp32 inputs

SHAPE = (1, 4, 2, 3, 5)  # [B, C, T, H, W]; the DMD reference reshapes sigma to 5-D


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("config,steps", [(BASE, [50]), (MID, [20, 20, 20])], ids=["base", "mid"])
def test_unipc_step_matches_diffusers(config, steps, jit):
    """Eager agrees to ~1 fp32 ulp; under jit XLA's fusion (FMA) adds a few ulps."""
    import jax
    import jax.numpy as jnp
    import torch

    from helios_jax.sampling import unipc_step as up

    ours = _our_schedules(config, steps)
    ref = _diffusers_scheduler(config)
    rng = np.random.default_rng(0)
    step = jax.jit(up.unipc_step) if jit else up.unipc_step
    worst = 0.0
    for stage, (sched, n) in enumerate(zip(ours, steps)):
        if config["stages"] == 1:
            ref.set_timesteps(n, sigmas=np.linspace(0.999, 0.0, n + 1)[:-1], mu=MU_8640)
        else:
            ref.set_timesteps(n, stage, mu=PYRAMID_MUS[stage])
        tables = up.unipc_tables(sched.sigmas)
        x_ref = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
        x = jnp.asarray(x_ref.numpy())
        state = up.init_state(x)
        for i, t in enumerate(ref.timesteps):
            v_np = rng.standard_normal(SHAPE).astype(np.float32)
            x_ref = ref.step(torch.from_numpy(v_np), t, x_ref, return_dict=False)[0]
            x, state = step(tables, jnp.asarray(v_np), x, i, state)
            err = _rel_err(x, x_ref.numpy())
            assert err <= 1e-6, (stage, i, err)
            worst = max(worst, err)
            # Continue both from the reference's sample so errors do not compound.
            x = jnp.asarray(x_ref.numpy())
    print(f"unipc {config['stages']}-stage jit={jit} worst rel err {worst:.2e}")


@pytest.mark.parametrize("amplify", [False, True], ids=["normal", "amplified"])
def test_dmd_step_matches_diffusers(amplify):
    import jax.numpy as jnp
    import torch

    from helios_jax.sampling.dmd_step import dmd_step

    ref = _diffusers_scheduler(DISTILLED)
    ours = _our_schedules(DISTILLED, [2, 2, 2], amplify)
    rng = np.random.default_rng(1)
    worst = 0.0
    for stage, sched in enumerate(ours):
        kwargs = {"is_amplify_first_chunk": True} if amplify else {}
        ref.set_timesteps(2, stage, mu=PYRAMID_MUS[stage], **kwargs)
        start = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
        x_ref = start.clone()
        for i, t in enumerate(ref.timesteps):
            v = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
            x_prev = x_ref
            x_ref = ref.step(v, t, x_ref, return_dict=False, cur_sampling_step=i, dmd_noisy_tensor=start,
                             dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps)[0]
            x = dmd_step(jnp.asarray(v.numpy()), jnp.asarray(x_prev.numpy()), jnp.asarray(start.numpy()), i, sched.sigmas)
            assert x.dtype == jnp.float32
            err = _rel_err(x, x_ref.numpy())
            assert err <= 1e-6, (stage, i, err)
            worst = max(worst, err)
    print(f"dmd worst rel err {worst:.2e}")


# ----------------------------------------------------------------------------------------------
# Whole-stage chains: the stateful wrapper against diffusers, and the pure step inside lax.scan


def _chain_inputs(n, seed):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    vs = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    return x0, vs


def test_mid_stage_chain_wrapper_and_scan_match_diffusers():
    import jax
    import jax.numpy as jnp
    import torch

    from helios_jax.sampling import unipc_step as up
    from helios_jax.sampling.schedulers import HeliosScheduler

    ref = _diffusers_scheduler(MID)
    ours = HeliosScheduler.from_config_json(MID)
    stage, n = 1, 20
    ref.set_timesteps(n, stage, mu=PYRAMID_MUS[stage])
    ours.set_timesteps(n, stage, mu=PYRAMID_MUS[stage])
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())

    x0, vs = _chain_inputs(n, seed=2)
    x_ref, x = torch.from_numpy(x0), jnp.asarray(x0)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(vs[i]), t, x_ref, return_dict=False)[0]
        x = ours.step(jnp.asarray(vs[i]), x)
    wrapper_err = _rel_err(x, x_ref.numpy())

    tables = up.unipc_tables(ours.sigmas)

    def body(carry, inputs):
        sample, state = carry
        i, v = inputs
        sample, state = up.unipc_step(tables, v, sample, i, state)
        return (sample, state), None

    x_start = jnp.asarray(x0)
    (x_scan, _), _ = jax.jit(lambda x, v: jax.lax.scan(body, (x, up.init_state(x)), (jnp.arange(n), v)))(x_start, jnp.asarray(vs))
    scan_err = _rel_err(x_scan, x_ref.numpy())
    print(f"20-step chain rel err: wrapper {wrapper_err:.2e}, scan {scan_err:.2e}")
    assert wrapper_err <= 1e-6 and scan_err <= 1e-6


def test_dmd_stage_chain_in_fori_loop_matches_diffusers():
    import jax
    import jax.numpy as jnp
    import torch

    from helios_jax.sampling.dmd_step import dmd_step
    from helios_jax.sampling.schedulers import HeliosScheduler

    ref = _diffusers_scheduler(DISTILLED)
    ours = HeliosScheduler.from_config_json(DISTILLED)
    stage = 2
    ref.set_timesteps(2, stage, mu=PYRAMID_MUS[stage], is_amplify_first_chunk=True)
    ours.set_timesteps(2, stage, mu=PYRAMID_MUS[stage], is_amplify_first_chunk=True)
    n = len(ours.timesteps)
    x0, vs = _chain_inputs(n, seed=3)
    start = torch.from_numpy(x0)
    x_ref, x_wrap = start.clone(), jnp.asarray(x0)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(vs[i]), t, x_ref, return_dict=False, cur_sampling_step=i, dmd_noisy_tensor=start,
                         dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps)[0]
        x_wrap = ours.step(jnp.asarray(vs[i]), x_wrap, stage_start=jnp.asarray(x0))

    sigmas, v_all, start_j = ours.sigmas, jnp.asarray(vs), jnp.asarray(x0)
    x_loop = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, s: dmd_step(v_all[i], s, start_j, i, sigmas), x))(start_j)
    assert _rel_err(x_wrap, x_ref.numpy()) <= 1e-6
    assert _rel_err(x_loop, x_ref.numpy()) <= 1e-6


def test_dmd_step_bf16_matches_diffusers():
    """The Distilled pipeline runs the DMD step on bf16 latents: x0 is cast to bf16 before re-noising."""
    import jax.numpy as jnp
    import torch

    from helios_jax.sampling.dmd_step import dmd_step

    ref = _diffusers_scheduler(DISTILLED)
    sched = _our_schedules(DISTILLED, [2, 2, 2])[0]
    ref.set_timesteps(2, 0, mu=PYRAMID_MUS[0])
    rng = np.random.default_rng(4)
    start = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)).to(torch.bfloat16)
    x_ref = start.clone()
    to_jnp = lambda t: jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
    mismatched = 0
    for i, t in enumerate(ref.timesteps):
        v = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)).to(torch.bfloat16)
        x_prev = x_ref
        x_ref = ref.step(v, t, x_ref, return_dict=False, cur_sampling_step=i, dmd_noisy_tensor=start,
                         dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps)[0]
        x = dmd_step(to_jnp(v), to_jnp(x_prev), to_jnp(start), i, sched.sigmas)
        assert x.dtype == jnp.bfloat16 and x_ref.dtype == torch.bfloat16
        diff = np.asarray(x.astype(jnp.float32)) != x_ref.float().numpy()
        mismatched += int(diff.sum())
        # float32 instead of float64 arithmetic may flip a rare bf16 rounding by one ulp.
        np.testing.assert_allclose(np.asarray(x.astype(jnp.float32)), x_ref.float().numpy(), rtol=2 ** -7, atol=2 ** -7)
    print(f"bf16 DMD elements differing from diffusers: {mismatched}")
    assert mismatched <= 2, mismatched
