"""Stage-3 schedules against the spec's reference-computed tables (training.md §6.1, §6.2.2)."""
import jax
import numpy as np
import pytest

from helios_jax.training import stage3_distill_schedules as ds

STAGE_SIZES = [(12, 20), (24, 40), (48, 80)]
# spec §6.1: student timesteps after shifting, per stage (chunk 0 amplified, later chunks 2 steps).
AMPLIFIED = [[998.5342, 902.2183, 833.9636, 783.0660], [742.8216, 640.0038, 547.1926, 462.9951],
             [385.4137, 328.6249, 253.9905, 151.5308]]
PLAIN = [[998.5342, 833.9636], [742.8216, 547.1926], [385.4137, 253.9905]]
PLAIN_SIGMAS = [[0.9982, 0.3540], [0.9988, 0.4512], [0.9995, 0.6574]]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_student_timesteps_are_the_ode_data_timesteps(stage):
    plain = ds.student_schedule(stage, *STAGE_SIZES[stage])
    np.testing.assert_allclose(plain.timesteps, PLAIN[stage], atol=1e-4)
    np.testing.assert_allclose(plain.sigmas[:-1], PLAIN_SIGMAS[stage], atol=1e-4)
    assert plain.sigmas[-1] == 0.0
    amplified = ds.student_schedule(stage, *STAGE_SIZES[stage], amplified=True)
    np.testing.assert_allclose(amplified.timesteps, AMPLIFIED[stage], atol=1e-4)


def test_training_mu_per_stage():
    # spec §3.4 table (linear mu at 12x20, 24x40, 48x80 with T = 9)
    np.testing.assert_allclose([ds.training_mu(*hw) for hw in STAGE_SIZES], [0.54807, 0.82229, 1.91917], atol=1e-5)


def test_score_table_noise_and_x0_round_trip():
    table = ds.score_table()
    t, sigma = table
    assert t.shape == (1000,) and t[0] == 1000.0 and sigma[-1] == pytest.approx(1.91917 * 0.001 / (1 + 0.91917 * 0.001), rel=1e-4)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 16, 9, 4, 4)).astype(np.float32)
    steps = np.array([980.0, 20.0])
    noisy = ds.add_noise(x0, noise, steps, table)
    # With the true velocity (noise - x0) the x0 conversion recovers x0 exactly.
    np.testing.assert_allclose(ds.to_x0(noise - x0, noisy, steps, table), x0, atol=1e-5)
    s = np.asarray(ds.sigma_at(steps, table))
    assert s[0] > s[1] and np.all(np.isin(s, sigma.astype(np.float32)))


def test_score_timestep_samplers():
    mu = ds.training_mu(48, 80)
    key = jax.random.key(0)
    early = np.asarray(ds.sample_score_timesteps(key, 20000, step=0, kind="beta", mu=mu))
    late = np.asarray(ds.sample_score_timesteps(key, 20000, step=500, kind="beta", mu=mu))
    uniform = np.asarray(ds.sample_score_timesteps(key, 20000, step=0, kind="uniform", mu=mu))
    for t in (early, late, uniform):
        assert t.min() >= 20 and t.max() <= 980 and np.all(t == np.round(t))
    # Beta(4, 1.5) (mean 0.73) leans to high noise at the start; by step 500 it is uniform.
    assert np.mean(early) > np.mean(late) + 50
    assert abs(np.mean(late) - np.mean(uniform)) < 10
    with pytest.raises(ValueError, match="beta' or 'uniform"):
        ds.sample_score_timesteps(key, 1, step=0, kind="normal", mu=mu)
