"""History augmentation (spec training.md §3.1, §3.3), the Stage-1 flow loss (§4) and the Stage-2
pyramid loss (§5): zero patterns, corruption statistics, timestep tables, and oracle models that
return the true velocity (zero loss checks how x_t and the target are built)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import preset
from helios_jax.training import history_augment
from helios_jax.training import stage1_flow_matching as flow_matching
from helios_jax.training import stage2_pyramid as pyramid_training
from helios_jax.training.history_augment import DROP_I2V, DROP_NONE, DROP_T2V, DROP_V2V

CHANNELS, HEIGHT, WIDTH, TEXT_LEN, TEXT_DIM = 4, 8, 8, 8, 16


def history_config(**overrides):
    values = dict(drop_t2v=0.4, drop_i2v=0.0, drop_v2v=0.4, corrupt=True, corrupt_mode="noise", clean_prob=0.1,
                  noise_ratio=1 / 3, saturation=False, saturation_clean_prob=0.1)
    return ml_collections.ConfigDict({**values, **overrides})


def train_config(sample_ratios=(1, 2, 1), **history):
    return ml_collections.ConfigDict(dict(history=history_config(**history),
                                          pyramid=dict(sample_ratios=list(sample_ratios))))


def make_batch(batch=2, seed=0, height=HEIGHT, width=WIDTH):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    return {
        "x0_latents": normal(batch, CHANNELS, 1, height, width),
        "history_latents": normal(batch, CHANNELS, 19, height, width),
        "target_latents": normal(batch, CHANNELS, 9, height, width),
        "prompt_embeds": normal(batch, TEXT_LEN, TEXT_DIM),
    }


def keys(count, seed=0):
    return jax.random.split(jax.random.key(seed), count)


# ------------------------------------------------------------------------------------------------
# History drop and corruption


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _drop(key, x0, history, p_t2v, p_i2v, p_v2v):
    return history_augment.random_drop(key, x0, history, p_t2v, p_i2v, p_v2v)


def test_each_drop_mode_zeroes_its_frames():
    batch = make_batch()
    x0, history = batch["x0_latents"], batch["history_latents"]
    cases = {(1.0, 0.0, 0.0): DROP_T2V, (0.0, 1.0, 0.0): DROP_I2V, (0.0, 0.0, 1.0): DROP_V2V, (0.0, 0.0, 0.0): DROP_NONE}
    v2v_counts = set()
    for probabilities, expected_mode in cases.items():
        for key in keys(12):
            out_x0, out_history, mode = _drop(key, x0, history, *probabilities)
            assert int(mode) == expected_mode
            zero = np.all(np.asarray(out_history) == 0, axis=(0, 1, 3, 4))
            kept = np.all(np.asarray(out_history) == history, axis=(0, 1, 3, 4))
            assert np.all(zero | kept)
            dropped = int(zero.sum())
            assert np.all(zero[:dropped])  # the oldest frames go first
            if expected_mode == DROP_T2V:
                assert dropped == 19 and np.all(np.asarray(out_x0) == 0)
            else:
                np.testing.assert_array_equal(out_x0, x0)  # the prefix survives every other mode
            if expected_mode == DROP_I2V:
                assert dropped == 18
            if expected_mode == DROP_V2V:
                v2v_counts.add(dropped)
            if expected_mode == DROP_NONE:
                assert dropped == 0
    assert v2v_counts == {1, 10, 19}


def test_drop_mode_frequencies_follow_the_probabilities():
    batch = make_batch(batch=1)
    modes = jax.vmap(lambda k: _drop(k, batch["x0_latents"], batch["history_latents"], 0.4, 0.1, 0.4)[2])(keys(4000))
    freq = np.bincount(np.asarray(modes), minlength=4) / 4000
    # t2v 0.4; i2v 0.6 * 0.1; v2v 0.54 * 0.4; none the rest.
    np.testing.assert_allclose(freq[[DROP_T2V, DROP_I2V, DROP_V2V]], [0.4, 0.06, 0.216], atol=0.025)


@functools.partial(jax.jit, static_argnames=("mode", "clean_prob", "noise_ratio"))
def _corrupt(key, x0, history, mode="noise", clean_prob=0.0, noise_ratio=1 / 3):
    return history_augment.corrupt_history(key, x0, history, mode=mode, clean_prob=clean_prob, noise_ratio=noise_ratio)


def test_corruption_leaves_zero_windows_zero_and_changes_every_other_frame():
    batch = make_batch()
    x0, history = np.zeros_like(batch["x0_latents"]), batch["history_latents"].copy()
    history[:, :, :5] = 0  # the tail and part of the oldest 9-frame window
    history[1, :, 5:10] = 0  # sample 1: tail and the whole oldest window are empty
    for mode in ("noise", "random"):
        for key in keys(4):
            out_x0, out = map(np.asarray, _corrupt(key, x0, history, mode=mode))
            assert np.all(out_x0 == 0)  # an empty prefix stays empty
            assert np.all(out[:, :, :1] == 0)  # the empty tail window
            assert np.all(out[1, :, 1:10] == 0)  # sample 1's empty window
            changed = np.any(out != history, axis=(1, 3, 4))  # [B, T]
            # A non-empty window is corrupted whole, its zero frames included (noise mode).
            assert np.all(changed[0, 5:]) and np.all(changed[1, 10:])
            if mode == "noise":
                assert np.all(changed[0, 1:5])


def test_clean_prob_and_per_frame_noise_level():
    history = np.ones((64, 1, 19, 32, 32), np.float32)
    x0 = np.ones((64, 1, 1, 32, 32), np.float32)
    _, out = _corrupt(jax.random.key(3), x0, history, noise_ratio=1 / 3)
    # x <- s n + (1 - s) x: the frame mean estimates 1 - s (n averages out: error s / 32 per frame).
    s = 1 - np.asarray(out).mean(axis=(1, 3, 4))
    assert s.min() > -0.05 and s.max() < 1 / 3 + 0.05
    np.testing.assert_allclose(s.mean(), 1 / 6, atol=0.01)
    np.testing.assert_allclose(s.std(), (1 / 3) / np.sqrt(12), atol=0.01)  # U(0, 1/3), per (sample, frame)
    assert np.abs(np.corrcoef(s[:, 0], s[:, 1])[0, 1]) < 0.3  # frames draw independently

    small_x0, small = np.ones((1, 1, 1, 2, 2), np.float32), np.ones((1, 1, 19, 2, 2), np.float32)
    untouched = jax.vmap(lambda k: jnp.all(_corrupt(k, small_x0, small, clean_prob=0.1)[1] == 1))(keys(1500))
    np.testing.assert_allclose(np.mean(np.asarray(untouched)), 0.1, atol=0.025)
    assert np.all(np.asarray(_corrupt(jax.random.key(0), small_x0, small, clean_prob=1.0)[1]) == 1)


def test_downsample_corruption_blurs_frames_keeps_zeros_and_constants():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 20, 48, 40)).astype(np.float32)
    x[:, :, 0] = 0  # an empty prefix
    x[:, :, 1] = 2.5  # a constant frame: a resize and back keeps it
    window_ids = history_augment.corruption_windows(19)
    blur = jax.jit(functools.partial(history_augment.downsample_corrupt, window_ids=window_ids))
    out = np.asarray(blur(jax.random.key(0), x))
    assert np.all(out[:, :, 0] == 0)
    np.testing.assert_allclose(out[:, :, 1], 2.5, rtol=1e-5)
    assert np.all(np.abs(out[:, :, 2:] - x[:, :, 2:]).mean(axis=(1, 3, 4)) > 0.05)  # every frame blurred
    assert out[:, :, 2:].std() < x[:, :, 2:].std()  # a blur lowers the variance of white noise


def test_resize_matrix_is_jax_antialiased_linear_resize():
    image = np.random.default_rng(1).standard_normal((48, 5)).astype(np.float32)
    for size in (43, 47, 60):
        expected = jax.image.resize(image, (size, 5), "linear", antialias=True)
        np.testing.assert_allclose(history_augment.resize_matrix(48, size) @ image, expected, atol=5e-5)


def test_saturation_scales_around_the_channel_mean_per_group_and_keeps_zeros():
    history = make_batch()["history_latents"]
    history[:, :, :1] = 0
    out = np.asarray(jax.jit(history_augment.saturate_history, static_argnums=2)(jax.random.key(1), history, 0.0))
    assert np.all(out[:, :, :1] == 0)
    mean = history.mean(axis=1, keepdims=True)
    centred, moved = (history - mean)[:, :, 1:], (out - mean)[:, :, 1:]
    # Least-squares factor per frame, then the frame must be exactly mean + factor * (x - mean).
    factor = (moved * centred).sum(axis=(0, 1, 3, 4)) / (centred**2).sum(axis=(0, 1, 3, 4))
    np.testing.assert_allclose(moved, factor[None, None, :, None, None] * centred, atol=1e-5)
    groups = history_augment.saturation_groups(19)
    assert list(groups) == [0] + [1] * 9 + [2] * 2 + [3] * 7
    for group in range(1, 4):
        f = factor[groups[1:] == group]
        np.testing.assert_allclose(f, f[0], rtol=1e-5)  # one factor per group, batch-wide
        assert 0.3 <= f[0] <= 0.999 or 1.001 <= f[0] <= 1.7
    np.testing.assert_allclose(out.mean(axis=1), history.mean(axis=1), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Stage 1


class FlowOracle:
    """Returns the true velocity of x_t = (1 - s) x0 + s eps: v = (x_t - x0) / s, s = t / 1000."""

    dtype = jnp.float32

    def __init__(self, x0, scale=1.0):
        self.x0, self.scale, self.calls = x0, scale, []

    def __call__(self, hidden_states, timestep, encoder_hidden_states, **history):
        self.calls.append((hidden_states.shape, {k: v.shape for k, v in history.items()}))
        sigma = (timestep / 1000.0)[:, None, None, None, None]
        return self.scale * (hidden_states - self.x0) / sigma


def test_flow_sigmas_come_from_the_table_with_logit_normal_density():
    sigma = np.asarray(jax.jit(flow_matching.sample_flow_sigmas, static_argnums=1)(jax.random.key(0), 20000))
    steps = sigma * 1000
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the table's 0.001 grid
    assert steps.min() >= 1 and steps.max() <= 1000
    assert abs(np.median(sigma) - 0.5) < 0.01
    # P(|N(0, 1)| < logit(0.75)) = 0.7275 for u = sigmoid(N) in [0.25, 0.75).
    np.testing.assert_allclose(np.mean((sigma > 0.25) & (sigma <= 0.75)), 0.7275, atol=0.015)


def test_stage1_oracle_velocity_gives_zero_loss():
    batch = make_batch()
    config = train_config()
    target = jnp.asarray(batch["target_latents"])
    oracle, off = FlowOracle(target), FlowOracle(target, scale=1.05)

    @jax.jit
    def losses(batch, key):
        return flow_matching.stage1_loss(oracle, batch, key, config), flow_matching.stage1_loss(off, batch, key, config)

    (loss, metrics), (off_loss, _) = losses(batch, jax.random.key(0))
    shapes, history = oracle.calls[0]
    assert len(oracle.calls) == 1 and shapes == (2, CHANNELS, 9, HEIGHT, WIDTH)
    assert history["latents_history_short"] == (2, CHANNELS, 2, HEIGHT, WIDTH)
    assert history["latents_history_mid"][2] == 2 and history["latents_history_long"][2] == 16
    assert float(loss) < 1e-9 and float(off_loss) > 1e-3  # the check can fail
    assert set(metrics) >= {"loss", "sigma_mean", "drop_mode"}


# ------------------------------------------------------------------------------------------------
# Stage 2


def test_stage_tables_match_spec_section_5_1():
    tables = pyramid_training.pyramid_tables()
    np.testing.assert_allclose(tables.start_sigmas, [0.999, 0.799760, 0.500374], atol=1e-6)
    np.testing.assert_allclose(tables.end_sigmas, [0.666333, 0.333666, 0.0], atol=1e-6)
    np.testing.assert_allclose(tables.timesteps[:, 0], [999.0, 743.256, 385.614], atol=1e-3)
    np.testing.assert_allclose(tables.timesteps[:, -1], [743.5117, 385.9716, 1.38361], atol=1e-4)
    assert tables.timesteps.shape == (3, 1000)
    np.testing.assert_allclose(tables.local_sigmas, 0.999 * (1 - np.arange(1000) / 1000), atol=1e-12)


class PyramidOracle:
    """Solves x = s A + (1 - s) B for the noise with the spec's start/end formulas, from the clean
    chunk alone, and returns v = A - B. Counts its forwards."""

    dtype = jnp.float32

    def __init__(self, clean, wrong_end=False):
        self.tables = pyramid_training.pyramid_tables()
        self.levels = [pyramid_training.downsample_mean(pyramid_training.downsample_mean(clean)),
                       pyramid_training.downsample_mean(clean), clean]
        self.wrong_end, self.heights = wrong_end, []

    def __call__(self, x, timestep, encoder_hidden_states, **history):
        self.heights.append(x.shape[3])
        stage = [level.shape[3] for level in self.levels].index(x.shape[3])
        table = self.tables.timesteps[stage]
        index = jnp.round((table[0] - timestep) / (table[0] - table[1]))
        s = (0.999 * (1 - index / 1000))[:, None, None, None, None]
        start_sigma, end_sigma = self.tables.start_sigmas[stage], self.tables.end_sigmas[stage]
        if self.wrong_end:
            end_sigma = 0.5 * end_sigma + 0.1
        if stage == 0:
            a_n, a_c = 1.0, 0.0
        else:
            up = jnp.repeat(jnp.repeat(self.levels[stage - 1], 2, axis=3), 2, axis=4)
            a_n, a_c = start_sigma, (1 - start_sigma) * up
        b_n, b_c = end_sigma, (1 - end_sigma) * self.levels[stage]
        noise = (x - s * a_c - (1 - s) * b_c) / (s * a_n + (1 - s) * b_n)
        return (a_n - b_n) * noise + a_c - b_c


def test_stage2_oracle_zero_loss_and_one_forward_per_sample():
    batch = make_batch(height=16, width=16)
    config = train_config(sample_ratios=(1, 2, 1))
    clean = jnp.asarray(batch["target_latents"])
    oracle, wrong = PyramidOracle(clean), PyramidOracle(clean, wrong_end=True)

    @jax.jit
    def losses(batch, key):
        return (pyramid_training.stage2_loss(oracle, batch, key, config),
                pyramid_training.stage2_loss(wrong, batch, key, config))

    (loss, metrics), (wrong_loss, _) = losses(batch, jax.random.key(1))
    assert oracle.heights == [4, 8, 8, 16]  # sum(sample_ratios) forwards, coarsest stage first
    assert float(loss) < 1e-6 and float(wrong_loss) > 1e-3
    assert {"loss_stage0", "loss_stage1", "loss_stage2"} <= set(metrics)


def test_noise_pyramid_has_unit_variance_at_every_level():
    noise = jax.random.normal(jax.random.key(0), (2, 4, 9, 64, 64))
    tables = pyramid_training.pyramid_tables()
    points = pyramid_training.stage_endpoints(jnp.zeros_like(noise), noise, tables)
    # With a zero clean chunk A_0 = n_0 and A_i = S_i n_i, so each level's noise is recoverable.
    levels = [points[0][0]] + [points[i][0] / tables.start_sigmas[i] for i in (1, 2)]
    for level, size in zip(levels, (16, 32, 64)):
        assert level.shape[3] == size
        np.testing.assert_allclose(float(jnp.var(level)), 1.0, atol=0.03)
    # Levels are spatially consistent: n_1 = 2 * (2x2 mean of n_2).
    np.testing.assert_allclose(levels[1], 2 * pyramid_training.downsample_mean(levels[2]), atol=1e-5)


def test_stage2_rejects_sample_ratios_of_the_wrong_length():
    with pytest.raises(ValueError, match="sample_ratios"):
        pyramid_training.stage2_loss(FlowOracle(0.0), make_batch(), jax.random.key(0), train_config(sample_ratios=(1, 1)))


# ------------------------------------------------------------------------------------------------
# The real (tiny) transformer


def test_losses_with_the_tiny_transformer_are_finite():
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    batch = make_batch(batch=1)
    config = train_config(sample_ratios=(1, 0, 0), saturation=True, corrupt_mode="random")

    @nnx.jit
    def losses(model, batch, key):
        return (flow_matching.stage1_loss(model, batch, key, config)[0],
                pyramid_training.stage2_loss(model, batch, key, config)[0])

    for loss in losses(model, batch, jax.random.key(0)):
        assert np.isfinite(float(loss)) and float(loss) > 0
