"""The trainer loop (issue 9): the optimizer touches only trainable parameters, gradient
accumulation equals the whole batch, the loss falls, a SIGKILLed run resumes to the uninterrupted
run's exact loss sequence, an 8-device FSDP step equals the single-device step, and bad configs or
mismatched checkpoints are refused in one line. The `helios-jax train` runs share a persistent
compilation cache, so only the first one compiles the tiny transformer's step."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helios_jax.training.config import training_config
from helios_jax.training.optimizer import learning_rate_schedule, make_optimizer
from helios_jax.training.trainer import initial_state, make_train_step, split_model
from helios_jax.parallel import make_mesh
from tests.xla_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/train/stage1.py:tiny"  # the api.md name (stage_1_init, tiny)
REFERENCE_STEPS = 80


def command_env(cache_dir) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["XLA_FLAGS"] = FAST_COMPILE
    return env


def train_command(workdir, cache_dir, *overrides):
    return [sys.executable, "-m", "helios_jax", "train", "--config", CONFIG, "--workdir", str(workdir),
            *overrides]


def logged(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def fsdp_process(cache_dir):
    """The 8-device comparison, started first so it compiles while the single-process runs do."""
    process = subprocess.Popen([sys.executable, "-c", FSDP_SCRIPT], env=command_env(cache_dir), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir, fsdp_process):
    """An uninterrupted `helios-jax train` of REFERENCE_STEPS steps, a checkpoint every 10."""
    workdir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(train_command(workdir, cache_dir, f"--config.total_steps={REFERENCE_STEPS}"),
                            env=command_env(cache_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


# ------------------------------------------------------------------------------------------------
# The step on a small module (fast to compile)


class Toy(nnx.Module):
    """`blocks` is frozen in these tests, the rest trainable, as the stand-in task does."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(3, 8, rngs=rngs)
        self.blocks = nnx.Linear(8, 8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.blocks(jnp.tanh(self.embed(x)))))


def toy_loss(model, batch, key):
    noise = 0.01 * jax.random.normal(key, batch["x"].shape)
    loss = jnp.mean(jnp.square(model(batch["x"] + noise) - batch["y"]))
    return loss, {"prediction_mean": jnp.mean(model(batch["x"]))}


def toy_optimizer_config():
    config = training_config(stage="stage1", lr=1e-2, schedule="constant", warmup_steps=0, seed=0, lora_rank=4,
                             patch_embedding="lora", history_patches="full", batch_size=4)
    return config.optimizer


def toy_batch(rows=4):
    rng = np.random.default_rng(0)
    return {"x": jnp.asarray(rng.standard_normal((rows, 3)), jnp.float32),
            "y": jnp.asarray(rng.standard_normal((rows, 2)), jnp.float32)}


def test_only_trainable_parameters_change_and_have_optimizer_state():
    model = Toy(nnx.Rngs(0))
    frozen_before = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model.blocks))}
    optimizer = make_optimizer(toy_optimizer_config())
    split, master = split_model(model, nnx.Not(nnx.PathContains("blocks")))
    state = initial_state(master, optimizer, 0, make_mesh())
    before = jax.tree.map(np.array, state.trainable)
    step = jax.jit(make_train_step(split, toy_loss, optimizer))
    new_state, metrics = step(state, split.frozen, toy_batch())

    assert sorted(new_state.trainable) == ["embed", "head"]
    adam = new_state.opt_state[1][0]  # chain(clip, adamw): adamw's first state is scale_by_adam's
    assert jax.tree.structure(adam.mu) == jax.tree.structure(new_state.trainable)
    assert sum(x.size for x in jax.tree.leaves(new_state.opt_state)) == \
        2 * sum(x.size for x in jax.tree.leaves(before)) + 1 + 1  # mu, nu, adam count, schedule count
    for (path, value), old in zip(jax.tree_util.tree_flatten_with_path(new_state.trainable)[0],
                                  jax.tree.leaves(before)):
        assert value.dtype == jnp.float32 and not np.array_equal(np.asarray(value), old), path
    for path, variable in nnx.to_flat_state(split.frozen):
        assert np.array_equal(np.asarray(variable.get_value()), frozen_before[path[1:]]), path
    assert int(new_state.step) == 1 and set(metrics) == {"loss", "grad_norm", "prediction_mean"}


def test_bf16_model_trains_fp32_masters_and_keeps_frozen_in_bf16():
    model = Toy(nnx.Rngs(0))
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        variable.set_value(variable.get_value().astype(jnp.bfloat16))
    split, master = split_model(model, nnx.Not(nnx.PathContains("blocks")))
    assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(split.frozen)} == {jnp.dtype(jnp.bfloat16)}
    optimizer = make_optimizer(toy_optimizer_config())
    state = initial_state(master, optimizer, 0, make_mesh())
    new_state, metrics = jax.jit(make_train_step(split, toy_loss, optimizer))(state, split.frozen, toy_batch())
    assert {x.dtype for x in jax.tree.leaves(new_state.trainable)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"]))


def test_grad_accumulation_averages_micro_batches():
    optimizer = make_optimizer(toy_optimizer_config())
    results = []
    for grad_accum in (1, 2):
        split, master = split_model(Toy(nnx.Rngs(0)), nnx.Not(nnx.PathContains("blocks")))
        state = initial_state(master, optimizer, 0, make_mesh())
        # A noiseless mean over rows: the mean of two half-batch losses is the whole batch's loss.
        clean_loss = lambda m, b, k: (jnp.mean(jnp.square(m(b["x"]) - b["y"])), {})
        results.append(jax.jit(make_train_step(split, clean_loss, optimizer, grad_accum))(
            state, split.frozen, toy_batch()))
    (one, m1), (two, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one.trainable), jax.tree.leaves(two.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_warmup_schedule_follows_spec():
    config = ml_collections.ConfigDict(dict(lr=1e-4, schedule="constant_with_warmup", warmup_steps=1000))
    schedule = learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(250)), 2.5e-5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(5000)), 1e-4, rtol=1e-6)
    config.schedule = "cosine"
    with pytest.raises(ValueError, match="config.optimizer.schedule"):
        learning_rate_schedule(config)


def test_stage_configs_carry_the_spec_numbers():
    from helios_jax.config_flags import load_config

    expected = {  # spec §7.1 / §3.5 / §5.2: lr, schedule, warmup, seed, LoRA rank, patch_embedding, ratios
        "stage1": (5e-5, "constant", 0, 43, 128, "lora", ()),  # stage_1_init
        "stage1:post": (3e-5, "constant", 0, 44, 128, "lora", ()),  # stage_1_post
        "stage2": (1e-4, "constant_with_warmup", 1000, 45, 256, "frozen", (1, 2, 1)),  # stage_2_init
        "stage2:post": (3e-5, "constant_with_warmup", 500, 46, 256, "lora", (1, 1, 1)),  # stage_2_post
    }
    for name, (lr, schedule, warmup, seed, rank, patch, ratios) in expected.items():
        config = load_config(name)
        got = (config.optimizer.lr, config.optimizer.schedule, config.optimizer.warmup_steps, config.seed,
               config.lora.rank, config.lora.patch_embedding, tuple(config.pyramid.sample_ratios))
        assert got == (lr, schedule, warmup, seed, rank, patch, ratios), name
        assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.999, 1e-8)
        assert (config.optimizer.weight_decay, config.optimizer.clip_norm) == (1e-4, 1.0)
        assert config.checkpoint_every == 500 and config.lora.alpha == rank
        tiny = load_config(f"{name}{',' if ':' in name else ':'}tiny")
        assert tiny.model.config == "tiny-random" and tiny.total_steps == 20 and tiny.seed == seed
        assert tiny.data_dir == "synthetic" and config.data_dir == ""


# ------------------------------------------------------------------------------------------------
# helios-jax train on the tiny transformer


def test_loss_falls(reference_run):
    losses = [record["loss"] for record in logged(reference_run)]
    assert len(losses) == REFERENCE_STEPS
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, (first, last)
    record = logged(reference_run)[-1]
    assert record["mfu"] == "n/a" and record["tokens_per_s"] > 0 and record["lr"] == pytest.approx(1e-3)
    saved = sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [REFERENCE_STEPS - 10, REFERENCE_STEPS]  # keep_checkpoints=2, every 10 steps
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().metadata(reference_run / "checkpoints" / str(REFERENCE_STEPS) / "state")
    tree = getattr(tree, "item_metadata", tree)
    # Only LoRA adapters and the fully trained history patchers are saved, with optimizer state for them alone.
    for saved_tree in (tree["trainable"], tree["opt_state"][1][0]["mu"]):
        paths = list(_leaf_paths(saved_tree))
        assert any(p[0] == "blocks" and "lora" in p for p in paths) and any(p[0] == "patch_long" for p in paths)
        assert all("lora" in p or p[0] in ("patch_short", "patch_mid", "patch_long") for p in paths), paths


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaf_paths(value, prefix + (key,))
    else:
        yield prefix


def kill_after_a_checkpoint(process, workdir, step: int, timeout: float = 600) -> int:
    """SIGKILL the training `process` once it has logged `step` and saved a checkpoint; the last
    step it logged."""
    deadline = time.monotonic() + timeout
    checkpoints = Path(workdir) / "checkpoints"
    while time.monotonic() < deadline and process.poll() is None:
        steps = [r["step"] for r in logged(workdir)]
        saved = [p for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.exists() else []
        if steps and steps[-1] >= step and saved:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"finished before the kill: {process.stderr.read()[-2000:]}"
    return logged(workdir)[-1]["step"]


def test_sigkill_then_resume_repeats_the_uninterrupted_losses(reference_run, cache_dir, tmp_path):
    kill_after = random.Random().randint(12, 30)
    process = subprocess.Popen(train_command(tmp_path, cache_dir, f"--config.total_steps={REFERENCE_STEPS}"),
                               env=command_env(cache_dir), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    killed_at = kill_after_a_checkpoint(process, tmp_path, kill_after)
    assert killed_at < REFERENCE_STEPS

    result = subprocess.run(train_command(tmp_path, cache_dir, f"--config.total_steps={REFERENCE_STEPS}"),
                            env=command_env(cache_dir), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    resumed = [r["loss"] for r in logged(tmp_path)]
    reference = [r["loss"] for r in logged(reference_run)]
    assert [r["step"] for r in logged(tmp_path)] == list(range(1, REFERENCE_STEPS + 1))
    assert resumed == reference, f"killed at step {killed_at}"


def test_config_typo_is_one_line(cache_dir, tmp_path):
    result = subprocess.run(train_command(tmp_path, cache_dir, "--config.optimizer.lrr=1"),
                            env=command_env(cache_dir), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "helios-jax train: error: --config.optimizer.lrr: no config field 'lrr'"]


def test_checkpoint_from_another_config_is_refused(reference_run, cache_dir):
    result = subprocess.run(train_command(reference_run, cache_dir, "--config.lora.rank=8",
                                          f"--config.total_steps={REFERENCE_STEPS + 5}"),
                            env=command_env(cache_dir), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "different config: lora.rank (4 -> 8)" in lines[0], result.stderr[-2000:]
    assert logged(reference_run)[-1]["step"] == REFERENCE_STEPS  # nothing was trained


# ------------------------------------------------------------------------------------------------
# FSDP on 8 CPU devices

FSDP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from flax import nnx
    from helios_jax.config_flags import load_config
    from helios_jax.parallel import make_mesh, shard_state, use_mesh
    from helios_jax.training import synthetic
    from helios_jax.training.stage1_flow_matching import stage1_loss
    from helios_jax.training.lora import add_lora, trainable_filter
    from helios_jax.training.model_setup import build_model
    from helios_jax.training.optimizer import make_optimizer
    from helios_jax.training.trainer import initial_state, make_train_step, merge_model, place_batch, split_model

    config = load_config("stage1:tiny")
    config.data.batch_size = 8
    optimizer = make_optimizer(config.optimizer)
    results = []
    # The sharded run also rematerialises every block: neither may change the numbers.
    for mesh, remat in ((make_mesh(devices=jax.devices()[:1]), "none"), (make_mesh(data=2, fsdp=4), "full")):
        config.model.remat_policy = remat
        # The real Stage-1 step of `helios-jax train`: LoRA + full history patchers, the flow loss.
        model = build_model(config, mesh)
        add_lora(model, rank=4, alpha=4.0, patch_embedding="lora", history_patches="full", rngs=nnx.Rngs(1))
        shard_state(model, mesh)
        batch = next(synthetic.synthetic_iterator(model.config, batch_size=8, seed=0))
        split, master = split_model(model, trainable_filter("full"))
        state = initial_state(master, optimizer, 0, mesh)
        loss = lambda model, batch, key: stage1_loss(model, batch, key, config)
        # The step's gradient, as the step computes it (same key), to compare leaf by leaf.
        key = jax.random.fold_in(state.rng, state.step)
        gradient = lambda t, frozen, batch: jax.grad(lambda t: loss(merge_model(split, t, frozen), batch, key)[0])(t)
        with use_mesh(mesh):
            placed = place_batch(batch, mesh)
            grads = jax.jit(gradient)(state.trainable, split.frozen, placed)
            new_state, metrics = jax.jit(make_train_step(split, loss, optimizer))(state, split.frozen, placed)
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(new_state.trainable)})
        print(mesh.shape, model.config.remat_policy, "trainable shardings:", specs)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.map(np.asarray, grads),
                        jax.tree.map(np.asarray, new_state.trainable["patch_long"])))
    (loss_1, norm_1, grads_1, patch_1), (loss_8, norm_8, grads_8, patch_8) = results
    assert abs(loss_8 - loss_1) <= 1e-5 * abs(loss_1), (loss_1, loss_8)
    assert abs(norm_8 - norm_1) <= 1e-5 * abs(norm_1), (norm_1, norm_8)
    relative = lambda a, b: float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
    worst = max(relative(a, b) for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8)))
    assert worst <= 1e-5, worst
    # Updated weights too, where Adam's first step is not a sign function of tiny gradients (the fully
    # trained history patcher; a zero-initialised LoRA factor moves by +-lr, ill-conditioned near g = 0).
    updated = max(relative(a, b) for a, b in zip(jax.tree.leaves(patch_1), jax.tree.leaves(patch_8)))
    assert updated <= 1e-5, updated
    print("fsdp ok", loss_1, loss_8, worst, updated)
""")


def test_fsdp_step_on_8_devices_equals_single_device(fsdp_process):
    stdout, stderr = fsdp_process.communicate(timeout=600)
    assert fsdp_process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "fsdp ok" in stdout
    assert "'fsdp'" in stdout  # the 8-device run really shards parameters over fsdp
