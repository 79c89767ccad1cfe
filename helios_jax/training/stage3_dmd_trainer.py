"""The Stage-3b loop (spec training.md §6.2.5): per global step s, a generator update when
s % generator_every == 0, then a critic update; EMA of the generator after the step while
s < ema.start_step or when the generator moved (spec §7.3).

Memory recipe (spec §6.5) in JAX terms: the generator backbone and the score backbone are frozen
(model dtype, FSDP-sharded by their logical axes); only the two LoRA sets (and the GAN heads) are
differentiated and have optimizer state (fp32); the teacher is the score backbone traced with its
adapters disabled, so teacher and critic share one copy; blocks are rematerialised per
config.model.remat_policy. Both updates are pure functions of (state, frozen, batch) with keys
fold_in(rng, s), so a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from helios_jax.distributed import log
from helios_jax.parallel import use_mesh
from helios_jax.training.stage3_dmd import Critic, critic_loss, generator_loss
from helios_jax.training.ema import EMAState, ema_init, ema_update
from helios_jax.training.lora import LoRAParam, trainable_filter
from helios_jax.training.optimizer import make_optimizer
from helios_jax.training.trainer import SplitModel, initial_state, merge_model, place_batch, split_model, \
    start_run


class DistillState(NamedTuple):
    generator: Any  # fp32 pure dict: the generator's trainable parameters
    generator_opt: Any
    critic: Any  # fp32 pure dict: the critic's LoRA (and GAN heads)
    critic_opt: Any
    ema: EMAState  # of `generator`
    step: jax.Array  # global step s (critic updates taken)
    rng: jax.Array


def critic_filter():
    """The critic's trainables: its LoRA and, when present, the GAN heads (all of them)."""
    return nnx.Any(LoRAParam, lambda path, variable: isinstance(variable, nnx.Param) and "heads" in path)


def _gan_active(config, step: int) -> bool:
    return bool(config.get("gan") and config.gan.enabled and step >= int(config.gan.start_step))


def make_distill_steps(generator_split: SplitModel, critic_split: SplitModel, generator_opt, critic_opt, config):
    """(generator_step, critic_step), each (state, frozen_g, frozen_c, batch) -> (state, metrics);
    `gan` is a static flag (the heads join from gan.start_step), `update_ema` a traced bool."""

    def models(state, frozen_g, frozen_c):
        return (merge_model(generator_split, state.generator, frozen_g),
                merge_model(critic_split, state.critic, frozen_c))

    def generator_step(state: DistillState, frozen_g, frozen_c, batch, gan: bool):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
        _, critic = models(state, frozen_g, frozen_c)

        def loss_of(trainable):
            generator = merge_model(generator_split, trainable, frozen_g)
            return generator_loss(generator, critic, batch, key, state.step, config, gan_active=gan)

        trainable, opt_state, metrics = _update(generator_opt, loss_of, state.generator, state.generator_opt)
        metrics["generator_grad_norm"] = metrics.pop("grad_norm")
        return state._replace(generator=trainable, generator_opt=opt_state), metrics

    def critic_step(state: DistillState, frozen_g, frozen_c, batch, update_ema, gan: bool):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
        generator, _ = models(state, frozen_g, frozen_c)

        def loss_of(trainable):
            critic = merge_model(critic_split, trainable, frozen_c)
            return critic_loss(critic, generator, batch, key, state.step, config, gan_active=gan)

        trainable, opt_state, metrics = _update(critic_opt, loss_of, state.critic, state.critic_opt)
        metrics["critic_grad_norm"] = metrics.pop("grad_norm")
        averaged = ema_update(state.ema, state.generator, decay=float(config.ema.decay),
                              update_after_step=int(config.ema.start_step))
        ema = jax.tree.map(lambda new, old: jnp.where(update_ema, new, old), averaged, state.ema)
        return DistillState(state.generator, state.generator_opt, trainable, opt_state, ema, state.step + 1,
                            state.rng), metrics

    return generator_step, critic_step


def _update(optimizer, loss_of, params, opt_state):
    """One optimizer update of `params` on loss_of(params) -> (loss, metrics): (params, opt_state,
    metrics + grad_norm before clipping)."""
    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def initial_distill_state(generator_master, critic_master, generator_opt, critic_opt, seed: int,
                          mesh: Mesh) -> DistillState:
    g = initial_state(generator_master, generator_opt, seed, mesh)
    c = initial_state(critic_master, critic_opt, seed, mesh)
    # Every leaf committed to its sharding from the start: the compiled steps then see the same
    # input placement on every call (an uncommitted leaf would compile the step a second time).
    replicated = NamedSharding(mesh, PartitionSpec())
    state = DistillState(g.trainable, g.opt_state, c.trainable, c.opt_state, ema_init(g.trainable), g.step, g.rng)
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding if isinstance(x.sharding, NamedSharding)
                                                 else replicated), state)


def train_dmd(config, workdir, *, generator: nnx.Module, critic: Critic, iterator, mesh: Mesh,
              negative_prompt_embeds: np.ndarray) -> DistillState:
    """Run Stage 3b to config.total_steps global steps, resuming from WORKDIR/checkpoints.
    `negative_prompt_embeds` [L, D]: the real score's unconditional text (the default negative prompt)."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    generator_opt, critic_opt = make_optimizer(config.optimizer), make_optimizer(config.critic_optimizer)
    generator_split, generator_master = split_model(generator, trainable_filter(config.lora.history_patches))
    critic_split, critic_master = split_model(critic, critic_filter())
    frozen_g, frozen_c = generator_split.frozen, critic_split.frozen
    del generator, critic
    state = initial_distill_state(generator_master, critic_master, generator_opt, critic_opt, int(config.seed), mesh)

    state, checkpoints, metrics_log = start_run(workdir, config, state, iterator)

    generator_step, critic_step = make_distill_steps(generator_split, critic_split, generator_opt, critic_opt, config)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    generator_step = jax.jit(generator_step, static_argnums=4, out_shardings=(shardings, None), donate_argnums=0)
    critic_step = jax.jit(critic_step, static_argnums=5, out_shardings=(shardings, None), donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    every, ema_start = int(config.distill.generator_every), int(config.ema.start_step)
    steps, log_every = int(config.total_steps), int(config.train.log_every)
    since, since_step = time.perf_counter(), int(state.step)
    with use_mesh(mesh):
        for step in range(int(state.step), steps):
            local = next(iterator)
            rows = np.asarray(local["prompt_embeds"]).shape[0]
            local = {**local, "negative_prompt_embeds": np.broadcast_to(negative_prompt_embeds,
                                                                        (rows, *negative_prompt_embeds.shape))}
            batch = place_batch(local, mesh)
            gan = _gan_active(config, step)
            metrics = {}
            moved = step % every == 0
            if moved:
                state, metrics = generator_step(state, frozen_g, frozen_c, batch, gan)
            update_ema = jax.device_put(jnp.asarray(step < ema_start or moved), replicated)
            state, critic_metrics = critic_step(state, frozen_g, frozen_c, batch, update_ema, gan)
            metrics = {**critic_metrics, **metrics}
            done = step + 1
            if done % log_every == 0 or done == steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - since
                metrics_log.write({"step": done, **values, "generator_step": moved,
                                   "step_time_s": elapsed / (done - since_step)})
                since, since_step = time.perf_counter(), done
            if checkpoints.save_step(done, steps, state, iterator):
                log(f"train: preemption signalled; saved step {done} and stopping")
                break
    checkpoints.close()
    return state
