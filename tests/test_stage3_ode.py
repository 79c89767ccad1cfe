"""Stage 3a (spec training.md §6.1): the student's timesteps, the teacher's recorded trajectories,
`helios-jax prepare-ode`, the ODE loader, the loss, and distillation of the tiny model end to end.

The end-to-end run (prepare-ode, then `helios-jax train` from the teacher's weights) is
tests/stage3_ode_worker.py in its own process, started first so it compiles while the in-process
tests run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helios_jax.cli import main
from helios_jax.models.transformer_config import preset
from helios_jax.parallel import make_mesh
from helios_jax.sampling.noise import NoiseSource
from helios_jax.sampling.pyramid import block_noise, downsample_noise, upsample_nearest
from helios_jax.training.stage3_distill_schedules import student_schedule
from helios_jax.training.stage3_ode_data import END, OdeDataset, make_ode_loader, synthetic_ode_records
from helios_jax.training.stage3_ode_regression import select_chunks, teacher_context
from helios_jax.training.stage3_ode_schedules import teacher_stage_schedule
from helios_jax.training.stage3_ode_teacher import draw_chunk_noise, plan_teacher_chunk
from helios_jax.training.trainer import initial_state, make_train_step, split_model
from tests.xla_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parent.parent

# tools/offload_data/get_ode-pairs.py's hard-coded student timesteps at 384x640 (latent 48x80).
REFERENCE_TIMESTEPS = {
    True: [[998.5342, 902.2183, 833.9636, 783.0660], [742.8216, 640.0038, 547.1926, 462.9951],
           [385.4137, 328.6249, 253.9905, 151.5308]],
    False: [[998.5342, 833.9636], [742.8216, 547.1926], [385.4137, 253.9905]],
}
STAGE_SIZES_384x640 = [(12, 20), (24, 40), (48, 80)]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("stage3_ode")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "stage3_ode_worker.py"), str(scratch)],
                               env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, scratch
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def worker_result(worker):
    process, scratch = worker
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), scratch


# ------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("amplified", [True, False], ids=["chunk0", "later_chunks"])
def test_student_timesteps_equal_the_reference_lists(worker, amplified):
    for stage, (h, w) in enumerate(STAGE_SIZES_384x640):
        ours = student_schedule(stage, h, w, amplified=amplified).timesteps
        np.testing.assert_allclose(ours, REFERENCE_TIMESTEPS[amplified][stage], atol=1e-3)


@pytest.mark.parametrize("amplified", [True, False], ids=["chunk0", "later_chunks"])
def test_teacher_schedule_passes_through_the_student_timesteps(amplified):
    for stage, (h, w) in enumerate(STAGE_SIZES_384x640):
        merged = teacher_stage_schedule(stage, h, w, teacher_steps=20, amplified=amplified)
        timesteps = merged.schedule.timesteps
        assert np.all(np.diff(timesteps) < 0) and merged.schedule.sigmas[-1] == 0
        assert len(timesteps) == 20 + len(merged.student_steps) - 1  # both start at the stage's first timestep
        # The merged step takes the stage grid's sigma at the nearest timestep (as the reference
        # does), so it lands within the grid's rounding of the student's own timestep.
        np.testing.assert_allclose(timesteps[merged.student_steps], REFERENCE_TIMESTEPS[amplified][stage], atol=0.25)


# ------------------------------------------------------------------------------------------------
# The teacher's recorded trajectory


def test_recorded_states_are_what_the_teacher_passed_through(worker_result):
    """prepare-ode's chunk 0 of the first prompt against the worker's re-run of that chunk with the
    plain chunk program (same merged schedule, same draws), and against the draws themselves."""
    _, scratch = worker_result
    record = OdeDataset(scratch / "ode")[0]
    states = [record[f"stage{i}_states"][0] for i in range(3)]  # chunk 0: [5, C, 9, h, w]
    plain = np.load(scratch / "plain_chunk0.npy")[0]
    np.testing.assert_allclose(states[2][END], plain, atol=1e-5)

    plan = plan_teacher_chunk(8, 8, teacher_steps=2, first_chunk=True, guided=True)
    noise, draws = draw_chunk_noise(NoiseSource(42), plan, 1, states[0].shape[1])
    # Every stage starts at the student's first timestep: from the noise, or the re-noised upsample.
    np.testing.assert_allclose(states[0][0], downsample_noise(noise, 2)[0], atol=1e-6)
    for i in (1, 2):
        alpha, beta = plan.tables.stages[i].renoise
        upsampled = upsample_nearest(jnp.asarray(states[i - 1][END][None]))
        renoised = alpha * upsampled + beta * block_noise(draws[i - 1], upsampled.shape,
                                                          jnp.asarray(plan.tables.block_factor))
        np.testing.assert_allclose(states[i][0], renoised[0], atol=1e-5)
    for i, size in enumerate([2, 4, 8]):
        np.testing.assert_array_equal(record[f"stage{i}_timesteps"][0], plan.student_timesteps[i])
        np.testing.assert_allclose(plan.student_timesteps[i], student_schedule(i, size, size, amplified=True).timesteps,
                                   atol=0.5)
        # The recorded states are distinct points of the trajectory, not one state repeated.
        assert min(np.abs(a - b).max() for a, b in zip(states[i][:-1], states[i][1:])) > 1e-3


# ------------------------------------------------------------------------------------------------
# prepare-ode, the loader, the loss's chunk choice


def test_prepare_ode_writes_what_the_loader_reads(worker_result):
    result, scratch = worker_result
    dataset = OdeDataset(scratch / "ode")
    assert result["ids"] == ["prompts_00000", "prompts_00002"]  # the empty line is skipped
    record = dataset[0]
    assert record["caption"] == "a red fox running through snow"
    np.testing.assert_array_equal(record["num_steps"], [4, 2])
    for i, size in enumerate([2, 4, 8]):
        states, timesteps = record[f"stage{i}_states"], record[f"stage{i}_timesteps"]
        assert states.shape == (2, 5, 4, 9, size, size) and timesteps.shape == (2, 4)
        assert np.all(states[1, 2:4] == 0) and np.all(timesteps[1, 2:] == 0)  # chunk 1's padding
        assert np.all(np.abs(states[:, END]).max(axis=(1, 2, 3, 4)) > 0)  # the end states
        np.testing.assert_allclose(timesteps[0], student_schedule(i, size, size, amplified=True).timesteps, atol=0.5)
    # Chunk 1 starts from fresh noise: it is not chunk 0's trajectory again.
    assert np.abs(record["stage0_states"][1, 0] - record["stage0_states"][0, 0]).max() > 0.1

    loader = make_ode_loader(scratch / "ode", batch_size=1, seed=0)
    first = next(loader)
    assert sorted(first) == sorted([*(f"stage{i}_{k}" for i in range(3) for k in ("states", "timesteps")),
                                    "num_steps", "prompt_embeds"])
    assert first["stage2_states"].shape == (1, 2, 5, 4, 9, 8, 8) and first["prompt_embeds"].shape == (1, 512, 64)
    saved = loader.get_state()
    following = next(loader)
    loader.set_state(saved)
    np.testing.assert_array_equal(next(loader)["stage0_states"], following["stage0_states"])
    # The synthetic set (data_dir = "synthetic") has the same layout.
    synthetic = synthetic_ode_records(preset("tiny-random"), count=1, num_chunks=2, latent_hw=(8, 8))[0]
    assert {k: v.shape for k, v in synthetic.items() if k != "prompt_embeds"} == \
        {k: v.shape[1:] for k, v in first.items() if k != "prompt_embeds"}


@pytest.mark.parametrize("case", ["missing_prompts", "empty_prompts", "missing_model", "out_exists", "bad_height"])
def test_prepare_ode_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, case):
    prompts, model, out, extra = tmp_path / "prompts.txt", "tiny-random", tmp_path / "out", []
    prompts.write_text("a cat\n")
    culprit = None
    if case == "missing_prompts":
        prompts, culprit = tmp_path / "nothing.txt", "--prompts"
    elif case == "empty_prompts":
        prompts.write_text("\n  \n")
        culprit = "no prompts"
    elif case == "missing_model":
        model, culprit = str(tmp_path / "no_model"), "--model"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep").write_text("x")
        culprit = "already exists"
    elif case == "bad_height":
        extra, culprit = ["--height", "96"], "--height=96"
    capsys.readouterr()
    code = main(["prepare-ode", "--prompts", str(prompts), "--model", model, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("helios-jax prepare-ode: error:") and culprit in err[0], err
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_teacher_context_is_the_previous_final_chunks():
    # Frame f of teacher chunk k holds k + 1 + f / 10, so every history slot names its source.
    frames = [[k + 1 + f / 10 for f in range(9)] for k in range(3)]
    finals = jnp.asarray(frames)[None, :, None, :, None, None] * jnp.ones((1, 3, 2, 9, 2, 2))
    expected = {0: [0.0] * 19, 1: [0.0] * 10 + frames[0], 2: [0.0] + frames[0] + frames[1]}
    for chunk, history_values in expected.items():
        prefix, history = teacher_context(finals, jnp.asarray(chunk))
        assert history.shape == (1, 2, 19, 2, 2) and prefix.shape == (1, 2, 1, 2, 2)
        np.testing.assert_allclose(history[0, 0, :, 0, 0], history_values, atol=1e-6)
        # The prefix is the first frame of chunk 0, and zeros for chunk 0 itself (pure T2V).
        np.testing.assert_allclose(prefix[0, 0, 0, 0, 0], 0.0 if chunk == 0 else 1.0)


def test_chunk_choice_is_distinct_ordered_and_checked():
    for seed in range(20):
        chosen = np.asarray(select_chunks(jax.random.PRNGKey(seed), 5, 3))
        assert len(set(chosen)) == 3 and list(chosen) == sorted(chosen) and chosen.max() < 5
    with pytest.raises(ValueError, match="config.distill.ode_sections=3"):
        select_chunks(jax.random.PRNGKey(0), 2, 3)


# ------------------------------------------------------------------------------------------------
# Training


def test_distilled_student_is_closer_to_the_teacher(worker_result):
    result, _ = worker_result
    assert result["step"] == len(result["losses"]) == 30
    assert all(np.isfinite(result["losses"]))
    # Distance of the student's x0 predictions at the stored states to the teacher's stage end
    # states, over every chunk, stage and step: the student starts as the teacher itself.
    assert result["after"] < 0.7 * result["before"], result
    # The EMA restored from the last checkpoint was updated every step and moved with the student.
    assert result["ema_updates"] == 30
    assert result["ema_after"] < 0.7 * result["before"], result
    # merge-lora's folder (EMA LoRA fused, the Stage-3 default) is the EMA model, without adapters.
    assert abs(result["merged_ema_after"] - result["ema_after"]) <= 1e-4 * result["ema_after"], result
    assert result["pipeline_uses_merged"]  # HeliosPipeline.tiny_random(transformer=...) = generate --transformer


def test_ema_in_the_step_equals_the_ema_recomputed_from_the_parameters():
    class Toy(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def loss_fn(model, batch, key):
        return jnp.mean((model.linear(batch["x"]) - batch["y"]) ** 2), {}

    decay, start = 0.9, 2
    split, master = split_model(Toy(), nnx.Param)
    optimizer = optax.sgd(0.3)
    state = initial_state(master, optimizer, 0, make_mesh(), with_ema=True)
    step = jax.jit(make_train_step(split, loss_fn, optimizer, ema=dict(decay=decay, start_step=start)))
    batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.ones((4, 2))}
    expected = jax.tree.map(np.asarray, master)
    for k in range(1, 16):
        state, _ = step(state, split.frozen, batch)
        params = jax.tree.map(np.asarray, state.trainable)
        after = k - start - 1  # spec §7.3: a copy until `start` updates have passed, then the warm-up decay
        d = 0.0 if after <= 0 else min(decay, (1 + after) / (10 + after))
        expected = jax.tree.map(lambda e, p: e - (1 - d) * (e - p), expected, params)
    assert int(state.ema.updates) == 15
    jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-6, atol=1e-7), expected, state.ema.params)
    # The average lags the parameters once the decay is on: it is not a copy.
    assert max(jax.tree.leaves(jax.tree.map(lambda e, p: np.abs(e - p).max(), expected, params))) > 1e-4
