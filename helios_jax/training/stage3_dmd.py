"""Stage 3b losses (spec training.md §6.2.4, §6.3): distribution matching for the generator, the
critic's denoising loss, and the GAN terms on the critic's features.

Three networks, two physical backbones (spec §6.5):
  generator  G: its backbone + generator LoRA (history patchers LoRA'd too);
  critic     F: the score backbone + critic LoRA (+ the GAN heads);
  real score R: the same score backbone traced with adapters disabled (PEFT's disable_adapter).
Each loss takes the modules it reads; which parameters it differentiates is the caller's choice
(trainer: the generator's trainable subtree for the generator step, the critic's for the critic
step). Score evaluations in the DMD loss are under stop_gradient, as the reference's no_grad.
Timesteps given to score models are integers in [20, 980] (spec §6.2.2), the shifted score table
converts them to sigma.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax.models.layers import adapters_disabled
from helios_jax.training import stage3_gan_heads as gan
from helios_jax.training.stage3_backward_simulation import generator_rollout, history_is_empty
from helios_jax.training.stage3_distill_schedules import add_noise, sample_score_timesteps, score_table, to_x0, \
    training_mu
from helios_jax.training.stage1_flow_matching import mean_squared_error, predict_velocity
from helios_jax.training.history_augment import corrupt_history, history_model_inputs, random_drop, \
    saturate_history


class Critic(nnx.Module):
    """The fake-score critic: the score backbone (with the critic's LoRA attached) and, in the GAN
    version, the discriminator heads on its features. One module so one filter picks its trainables."""

    def __init__(self, backbone: nnx.Module, heads: gan.GanHeads | None = None):
        self.backbone = backbone
        self.heads = heads


class Context(NamedTuple):
    """One GT sample's conditioning as the models see it."""

    score_history: dict  # dropped + corrupted history inputs (score models, critic)
    generator_history: dict  # the same, additionally saturated (the generator's roll-out)
    amplified: jax.Array  # bool: the batch has no history -> amplified first-chunk schedule
    target: jax.Array  # [B, C, 9, H, W] the real chunk
    prompt: jax.Array  # [B, L, D]


def sample_context(key, batch: dict, config, dtype, suffix: str = "") -> Context:
    """Random drop, frame-aware corruption and (generator only) saturation of GT sample `suffix`
    ("" = sample A, "_2" = sample B), spec §6.2.3 "Context"."""
    k_drop, k_corrupt, k_saturate = jax.random.split(key, 3)
    h = config.history
    x0 = jnp.asarray(batch["x0_latents" + suffix], jnp.float32)
    history = jnp.asarray(batch["history_latents" + suffix], jnp.float32)
    x0, history, _ = random_drop(k_drop, x0, history, h.drop_t2v, h.drop_i2v, h.drop_v2v)
    if h.corrupt:
        x0, history = corrupt_history(k_corrupt, x0, history, mode=h.corrupt_mode, clean_prob=h.clean_prob,
                                      noise_ratio=h.noise_ratio)
    score_history = history_model_inputs(x0, history, dtype)
    saturated = saturate_history(k_saturate, history, h.saturation_clean_prob) if h.saturation else history
    generator_history = history_model_inputs(x0, saturated, dtype)
    return Context(score_history, generator_history, history_is_empty(score_history),
                   jnp.asarray(batch["target_latents" + suffix], jnp.float32), batch["prompt_embeds" + suffix])


def frozen_copy(module: nnx.Module) -> nnx.Module:
    """The module on stop-gradient parameters: what the reference runs under no_grad or with
    requires_grad off (no gradient reaches its parameters, whoever differentiates them)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def rollout(generator, context: Context, key, config, *, differentiable: bool = True):
    """The generator's chunk x_g [B, C, 9, H, W] fp32 from fresh noise (backward simulation)."""
    frozen = frozen_copy(generator)
    history = context.generator_history

    def forward(model):
        return lambda x, t: predict_velocity(model, x, t, context.prompt, history)

    k_noise, k_exit = jax.random.split(key)
    noise = jax.random.normal(k_noise, context.target.shape, jnp.float32)
    x_g, exits = generator_rollout(forward(generator if differentiable else frozen), forward(frozen), noise, k_exit,
                                   amplified=context.amplified, steps=tuple(config.distill.pyramid_steps))
    return x_g, exits


def _score_table(x):
    return score_table(x.shape[3], x.shape[4])


def critic_velocity(critic: Critic, x, t, prompt, history, **kwargs):
    return predict_velocity(critic.backbone, x, t, prompt, history, **kwargs)


def real_score_x0(critic: Critic, x_t, t, prompt, negative_prompt, history, guidance: float):
    """The frozen teacher's CFG x0: x_c + guidance (x_c - x_u), cond and uncond in one batch."""
    with adapters_disabled():
        both = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
        v = predict_velocity(critic.backbone, both(x_t), both(t), jnp.concatenate([prompt, negative_prompt], 0),
                             {k: both(v) if v.ndim and v.shape[0] == x_t.shape[0] else v for k, v in history.items()})
    x_c, x_u = jnp.split(to_x0(v, both(x_t), both(t), _score_table(x_t)), 2, axis=0)
    return x_c + guidance * (x_c - x_u)


def dmd_loss(x_g, fake_x0, real_x0) -> jax.Array:
    """0.5 mean((x_g - sg(x_g - g))^2), g = (fake - real) / mean|x_g - real| per sample (NaN -> 0):
    its gradient with respect to x_g is g / numel."""
    x_g = x_g.astype(jnp.float32)
    scale = jnp.mean(jnp.abs(x_g - real_x0), axis=tuple(range(1, x_g.ndim)), keepdims=True)
    grad = jnp.nan_to_num((fake_x0 - real_x0) / scale, nan=0.0)
    target = jax.lax.stop_gradient(x_g - grad)
    return 0.5 * jnp.mean(jnp.square(x_g - target))


def _timesteps(key, x, step, spec) -> jax.Array:
    return sample_score_timesteps(key, x.shape[0], step=step, kind=spec.kind, mu=training_mu(x.shape[3], x.shape[4]),
                                  a0=spec.a0, b0=spec.b0, anneal_steps=spec.anneal_steps)


def discriminator_logits(critic: Critic, x_noisy, t, prompt, history, key, hooks) -> jax.Array:
    """Logits [B, 1 + hooks] of the critic in GAN mode on (H/2, W/2) crops of x_noisy (channels first)."""
    cropped = crop_half(key, x_noisy)
    velocity, features = critic_velocity(critic, cropped, t, prompt, history, feature_layers=tuple(hooks))
    return critic.heads(jnp.moveaxis(velocity, 1, -1), features)


def crop_half(key, x):
    """An independent random (H/2, W/2) crop per sample of x [B, C, T, H, W]."""
    _, _, _, h, w = x.shape
    channels_last = jnp.moveaxis(x, 1, -1)
    return jnp.moveaxis(gan.random_crop(key, channels_last, h // 2, w // 2), -1, 1)


def generator_loss(generator, critic: Critic, batch: dict, key, step, config, *, gan_active: bool = False):
    """(loss, metrics) of the generator step on GT sample A (spec §6.2.4 DMD, + §6.3 G loss).
    The critic (scores, discriminator) is frozen: gradients reach only the generator."""
    critic = frozen_copy(critic)
    k_context, k_rollout, k_t, k_noise, k_gan_noise, k_crop = jax.random.split(key, 6)
    dtype = getattr(generator, "dtype", jnp.float32)
    context = sample_context(k_context, batch, config, dtype)
    x_g, exits = rollout(generator, context, k_rollout, config)
    t = _timesteps(k_t, x_g, step, config.distill.generator_timesteps)
    table = _score_table(x_g)
    x_t = jax.lax.stop_gradient(add_noise(x_g, jax.random.normal(k_noise, x_g.shape), t, table))
    fake = to_x0(critic_velocity(critic, x_t, t, context.prompt, context.score_history), x_t, t, table)
    real = real_score_x0(critic, x_t, t, context.prompt, batch["negative_prompt_embeds"], context.score_history,
                         float(config.distill.real_guidance_scale))
    loss = dmd_loss(x_g, jax.lax.stop_gradient(fake), jax.lax.stop_gradient(real))
    metrics = {"dmd_loss": loss, "exit_stage0": exits[0], "amplified": context.amplified.astype(jnp.float32)}
    if gan_active:
        x_gan = add_noise(x_g, jax.random.normal(k_gan_noise, x_g.shape), t, table)
        logits = discriminator_logits(critic, x_gan, t, context.prompt, context.score_history, k_crop,
                                      config.gan.hooks)
        g_loss = gan.generator_loss(logits, float(config.gan.g_weight))
        metrics["gan_g_loss"] = g_loss
        loss = loss + g_loss
    return loss, {"generator_loss": loss, **metrics}


def critic_loss(critic: Critic, generator, batch: dict, key, step, config, *, gan_active: bool = False):
    """(loss, metrics) of the critic step on GT sample B: flow MSE on the generator's noised
    chunk (+ the discriminator loss and approximate R1). The generator is not differentiated."""
    generator = frozen_copy(generator)
    k_context, k_rollout, k_t, k_noise, k_perturb, k_crop = jax.random.split(key, 6)
    dtype = getattr(generator, "dtype", jnp.float32)
    context = sample_context(k_context, batch, config, dtype, suffix="_2")
    x_g, _ = rollout(generator, context, k_rollout, config, differentiable=False)
    x_g = jax.lax.stop_gradient(x_g)
    t = _timesteps(k_t, x_g, step, config.distill.critic_timesteps)
    table = _score_table(x_g)
    noise = jax.random.normal(k_noise, x_g.shape)
    x_t = add_noise(x_g, noise, t, table)
    velocity = critic_velocity(critic, x_t, t, context.prompt, context.score_history)
    loss = mean_squared_error(velocity, noise - x_g)
    metrics = {"critic_loss": loss}
    if gan_active:
        # Real: target A with history B as released (spec §11.4), or B's own target (gan.real_sample).
        # Real and its perturbation share one crop, so R1 compares like with like.
        if config.gan.real_sample not in ("A", "B"):
            raise ValueError(f"config.gan.real_sample must be 'A' or 'B'; got {config.gan.real_sample!r}")
        real = context.target if config.gan.real_sample == "B" else jnp.asarray(batch["target_latents"], jnp.float32)
        real_t = add_noise(real, noise, t, table)
        k_fake_crop, k_real_crop = jax.random.split(k_crop)
        fake_crop, real_crop = crop_half(k_fake_crop, x_t), crop_half(k_real_crop, real_t)
        perturbed = real_crop + float(config.gan.r1_sigma) * jax.random.normal(k_perturb, real_crop.shape)
        triple = lambda a: jnp.concatenate([a, a, a], axis=0)  # noqa: E731
        history = {k: triple(v) if v.ndim and v.shape[0] == x_t.shape[0] else v
                   for k, v in context.score_history.items()}
        velocity, features = critic_velocity(critic, jnp.concatenate([fake_crop, real_crop, perturbed], 0),
                                             triple(t), triple(context.prompt), history,
                                             feature_layers=tuple(config.gan.hooks))
        logits = critic.heads(jnp.moveaxis(velocity, 1, -1), features)
        fake_logits, real_logits, perturbed_logits = jnp.split(logits, 3, axis=0)
        d_loss = gan.discriminator_loss(fake_logits, real_logits, float(config.gan.d_weight))
        r1 = gan.approximate_r1(real_logits, perturbed_logits, float(config.gan.r1_weight))
        metrics.update(gan_d_loss=d_loss, r1=r1)
        loss = loss + d_loss + r1
    return loss, {"loss": loss, **metrics}
