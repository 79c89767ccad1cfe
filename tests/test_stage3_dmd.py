"""Stage 3b (issue 10): DMD with a LoRA critic on the shared frozen score backbone, GAN heads, EMA.

On the tiny model: every loss is finite; each update's gradients reach only its own parameters
(generator LoRA for the DMD + GAN generator loss; critic LoRA and GAN heads for the critic loss;
the frozen backbones are never differentiated); the critic's loss falls when it is trained alone;
a SIGKILLed `helios-jax train` run resumes to the uninterrupted run's exact losses. The heavy parts
run in subprocesses with fast-compile XLA flags and one persistent compilation cache."""
import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_trainer import REPO, command_env, kill_after_a_checkpoint, logged

# Without the GAN heads: the gradient tests above cover them; this keeps the compile small.
CONFIG = "configs/train/stage3_dmd.py:tiny"
STEPS = 7  # generator updates at steps 0 and 5


def train_command(workdir, *overrides):
    return [sys.executable, "-m", "helios_jax", "train", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.total_steps={STEPS}", "--config.checkpoint_every=3", *overrides]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache_dmd")


GRADIENT_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from helios_jax.config_flags import load_config
    from helios_jax.parallel import make_mesh
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.models.transformer_config import preset
    from helios_jax.training import synthetic
    from helios_jax.training.stage3_dmd import Critic, critic_loss, generator_loss
    from helios_jax.training.stage3_dmd_trainer import critic_filter, initial_distill_state, make_distill_steps
    from helios_jax.training.stage3_gan_heads import GanHeads
    from helios_jax.training.lora import LoRAParam, add_lora, trainable_filter
    from helios_jax.training.optimizer import make_optimizer
    from helios_jax.training.trainer import split_model

    config = load_config("configs/train/stage3_dmd.py:gan,tiny")
    model_config = preset("tiny-random", dtype="float32", remat_policy="none")
    generator = HeliosTransformer3DModel(model_config, rngs=nnx.Rngs(0))
    add_lora(generator, rank=4, alpha=4.0, history_patches="lora", rngs=nnx.Rngs(1))
    backbone = HeliosTransformer3DModel(model_config, rngs=nnx.Rngs(2))
    add_lora(backbone, rank=4, alpha=4.0, rngs=nnx.Rngs(3))
    dim = model_config.num_attention_heads * model_config.attention_head_dim
    critic = Critic(backbone, GanHeads(dim, model_config.out_channels, 64, hooks=(0, 1), rngs=nnx.Rngs(4)))
    # LoRA B starts at zero; make every adapter non-trivial so no gradient is zero by construction.
    for module in (generator, critic):
        for path, variable in nnx.to_flat_state(nnx.state(module, LoRAParam)):
            variable.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), variable.shape))
    batch = next(synthetic.synthetic_iterator(model_config, batch_size=1, seed=0, paired=True))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["negative_prompt_embeds"] = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 64)), jnp.float32)
    batch["history_latents"] = batch["history_latents"] + 0.5  # real history for sample A (no T2V-only path)
    key = jax.random.key(5)
    g_def, g_state = nnx.split(generator)
    c_def, c_state = nnx.split(critic)

    def norms(tree, select):
        flat = nnx.to_flat_state(tree)
        return {"/".join(map(str, p)): float(jnp.linalg.norm(v.get_value().ravel())) for p, v in flat if select(p, v)}

    def report(grads_g, grads_c):
        is_lora = lambda p, v: isinstance(v, LoRAParam)
        heads = lambda p, v: "heads" in p
        base = lambda p, v: not isinstance(v, LoRAParam) and "heads" not in p
        return {name: norms(tree, sel) for name, tree, sel in (
            ("generator_lora", grads_g, is_lora), ("generator_base", grads_g, base),
            ("critic_lora", grads_c, is_lora), ("critic_heads", grads_c, heads), ("critic_base", grads_c, base))}

    def gen_loss(gs, cs):
        return generator_loss(nnx.merge(g_def, gs), nnx.merge(c_def, cs), batch, key, 0, config, gan_active=True)

    def crit_loss(gs, cs):
        return critic_loss(nnx.merge(c_def, cs), nnx.merge(g_def, gs), batch, key, 0, config, gan_active=True)

    out = {}
    for name, fn in (("generator", gen_loss), ("critic", crit_loss)):
        (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(g_state, c_state)
        out[name] = {"metrics": {k: float(v) for k, v in metrics.items()}, "grads": report(*grads)}

    # The trainer's trainable sets.
    g_split, g_master = split_model(generator, trainable_filter("lora"))
    c_split, c_master = split_model(critic, critic_filter())
    out["trainable"] = {"generator": sorted({str(p[-1]) for p, _ in nnx.to_flat_state(
                            nnx.state(generator, trainable_filter("lora")))}),
                        "critic_lora": sum(1 for _ in nnx.to_flat_state(nnx.state(critic, LoRAParam))),
                        "critic_all": len(jax.tree.leaves(c_master))}

    # The critic trained alone (generator fixed, no GAN): its denoising loss over 32 steps.
    config.critic_optimizer.lr = 3e-3
    g_opt, c_opt = make_optimizer(config.optimizer), make_optimizer(config.critic_optimizer)
    state = initial_distill_state(g_master, c_master, g_opt, c_opt, 0, make_mesh(fsdp=1))
    _, critic_step = make_distill_steps(g_split, c_split, g_opt, c_opt, config)
    critic_step = jax.jit(critic_step, static_argnums=5)
    losses = []
    for _ in range(32):
        state, metrics = critic_step(state, g_split.frozen, c_split.frozen, batch, jnp.asarray(False), False)
        losses.append(float(metrics["critic_loss"]))
    out["critic_alone"] = losses
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def gradient_report(cache_dir):
    result = subprocess.run([sys.executable, "-c", GRADIENT_SCRIPT], env=command_env(cache_dir), cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _all_zero(norms: dict) -> bool:
    return bool(norms) and all(v == 0.0 for v in norms.values())


def _all_nonzero(norms: dict) -> bool:
    return bool(norms) and all(v > 0.0 for v in norms.values())


def test_every_loss_is_finite(gradient_report):
    values = {**gradient_report["generator"]["metrics"], **gradient_report["critic"]["metrics"]}
    for name in ("dmd_loss", "gan_g_loss", "generator_loss", "critic_loss", "gan_d_loss", "r1", "loss"):
        assert np.isfinite(values[name]), name
    assert values["dmd_loss"] > 0 and values["critic_loss"] > 0
    assert np.all(np.isfinite(gradient_report["critic_alone"]))


def test_generator_loss_reaches_only_the_generator(gradient_report):
    grads = gradient_report["generator"]["grads"]
    assert _all_nonzero(grads["generator_lora"]), grads["generator_lora"]  # every adapter, history patchers too
    assert any(v > 0 for v in grads["generator_base"].values())  # x_g depends on them; the trainer freezes them
    for name in ("critic_lora", "critic_heads", "critic_base"):  # score evaluations are under stop_gradient
        assert _all_zero(grads[name]), name


def test_critic_loss_reaches_only_the_critic_adapters_and_heads(gradient_report):
    grads = gradient_report["critic"]["grads"]
    assert _all_zero(grads["generator_lora"]) and _all_zero(grads["generator_base"])  # roll-out without gradient
    assert any(v > 0 for v in grads["critic_lora"].values())
    kernels = {k: v for k, v in grads["critic_heads"].items() if k.endswith("kernel")}
    assert len(kernels) == 3 * 7 and _all_nonzero(kernels), kernels  # every head: the D + R1 losses
    # The teacher is the same backbone with adapters off: the backbone gets gradients only through the
    # critic's forward, and the trainer never differentiates it (its trainable set below).
    trainable = gradient_report["trainable"]
    assert trainable["generator"] == ["down", "up"]  # LoRA factors only: the backbone is frozen
    assert trainable["critic_all"] > trainable["critic_lora"]  # LoRA + the heads' parameters, no base weight


def test_critic_loss_falls_when_trained_alone(gradient_report):
    losses = gradient_report["critic_alone"]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.8 * first, (first, last)


def test_sigkill_then_resume_repeats_the_uninterrupted_losses(cache_dir, tmp_path):
    reference_dir = tmp_path / "reference"
    result = subprocess.run(train_command(reference_dir), env=command_env(cache_dir), cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = logged(reference_dir)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert [r["generator_step"] for r in reference] == [s % 5 == 0 for s in range(STEPS)]

    workdir = tmp_path / "killed"
    kill_after = random.Random().randint(3, 5)
    process = subprocess.Popen(train_command(workdir), env=command_env(cache_dir), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at = kill_after_a_checkpoint(process, workdir, kill_after)

    result = subprocess.run(train_command(workdir), env=command_env(cache_dir), cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    resumed = logged(workdir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "critic_loss", "critic_grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], f"{key}, killed at step {killed_at}"
    generator = lambda records: [r.get("generator_loss") for r in records]  # noqa: E731
    assert generator(resumed) == generator(reference), f"killed at step {killed_at}"

    # The run's generator as a transformer folder: its EMA (the Stage-3 default) and its last values.
    from helios_jax.cli import main
    from helios_jax.loading import load

    folders = {}
    for weights in ("ema", "trained"):
        folders[weights] = tmp_path / f"merged_{weights}"
        assert main(["merge-lora", "--workdir", str(workdir), "--weights", weights, "--out", str(folders[weights])]) == 0
        merged_from = json.loads((folders[weights] / "conversion.json").read_text())["merged_from"]
        assert merged_from == {**merged_from, "stage": "stage3_dmd", "step": STEPS, "weights": weights}
    from helios_jax.training.run_weights import load_trained

    ema, trained = (np.asarray(load(folders[w]).blocks.attn1.to_q.kernel.get_value()) for w in ("ema", "trained"))
    # EMA updates at s = 0, 1 (s < ema.start_step = 2) and 5 (the generator moved): the third has
    # k' = 3 - 2 - 1 = 0, so decay 0 (spec §7.3): the EMA is a copy of the generator here.
    np.testing.assert_array_equal(ema, trained)
    unmerged = np.asarray(load_trained(workdir, weights="trained").model.blocks.attn1.to_q.kernel.get_value())
    assert np.abs(trained - unmerged).max() > 1e-6  # the generator's LoRA moved and is fused in


def test_stage3_configs_carry_the_spec_numbers():
    from helios_jax.config_flags import load_config

    # stage_3_ode, stage_3_post, stage_3_post_gan
    for name, seed, ema_start, gan in (("stage3_ode", 47, 250, None), ("stage3_dmd", 49, 750, False),
                                        ("stage3_dmd:gan", 49, 750, True)):
        config = load_config(name)
        o = config.optimizer
        assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.schedule) == (2e-6, 0.0, 0.999, 1e-8, 1e-3, "constant")
        assert (config.seed, config.ema.decay, config.ema.start_step, config.checkpoint_every) == (seed, 0.99, ema_start, 250)
        assert (config.lora.rank, config.lora.alpha, config.lora.patch_embedding, config.lora.history_patches) == \
            (256, 256.0, "frozen", "lora")
        assert tuple(config.distill.pyramid_steps) == (2, 2, 2) and config.data.batch_size == 1
        if gan is None:
            assert config.distill.ode_sections == 3 and config.distill.ode_loss_weight == 80.0
            continue
        c = config.critic_optimizer
        assert (c.lr, c.b1, c.weight_decay, config.critic.lora_rank) == (4e-7, 0.0, 1e-3, 256)
        assert (config.distill.generator_every, config.distill.real_guidance_scale) == (5, 3.0)
        assert dict(config.distill.generator_timesteps) == dict(kind="beta", a0=4.0, b0=1.5, anneal_steps=500)
        assert config.distill.critic_timesteps.kind == "uniform"
        assert (config.history.drop_t2v, config.history.drop_v2v, config.history.saturation) == (0.4, 0.5, True)
        assert config.history.corrupt_mode == ("random" if gan else "noise")
        g = config.gan
        assert (g.enabled, g.start_step, tuple(g.hooks), g.cond_map_dim) == (gan, 1000, (5, 15, 25, 35), 768)
        assert (g.g_weight, g.d_weight, g.r1_weight, g.r1_sigma) == (0.05, 0.01, 100.0, 0.1)
    assert load_config("configs/train/stage3_dmd.py:gan").gan.enabled
    assert load_config("configs/train/stage3_dmd.py:tiny").model.config == "tiny-random"
