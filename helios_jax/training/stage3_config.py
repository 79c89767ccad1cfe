"""The Stage-3 training configs (spec training.md §6, §7.1): `stage_3_ode` (3a, ODE regression),
`stage_3_post` (3b, DMD with ground-truth history) and `stage_3_post_gan` (3b + GAN heads); the
presets stage3_ode and stage3_dmd[:gan] (training/presets.py) build them.

They extend the Stage 1/2 config (training/config.py) with:
  ema       the generator's EMA (decay, the step it starts averaging at)
  distill   the student's pyramid schedule and the stage's loss settings
  critic    (3b) the fake-score critic: its LoRA rank and optimizer
  score     (3b) the frozen backbone shared by the real-score teacher and the critic
  gan       (3b) the discriminator heads on the critic's features
"""
from __future__ import annotations

import ml_collections

from helios_jax.training.config import shrink_to_tiny, training_config

STAGE3_KINDS = ("ode", "post", "post_gan")
# Score-timestep samplers (spec §6.2.2): the generator's Beta anneals to uniform over 500 steps.
GENERATOR_TIMESTEPS = dict(kind="beta", a0=4.0, b0=1.5, anneal_steps=500)
CRITIC_TIMESTEPS = dict(kind="uniform", a0=4.0, b0=1.5, anneal_steps=500)


def stage3_config(kind: str, *, tiny: bool = False) -> ml_collections.ConfigDict:
    if kind not in STAGE3_KINDS:
        raise ValueError(f"Stage-3 config kind must be one of {', '.join(STAGE3_KINDS)}; got {kind!r}")
    ode = kind == "ode"
    config = training_config(stage="stage3_ode" if ode else "stage3_dmd", lr=2e-6, schedule="constant",
                             warmup_steps=0, seed=47 if ode else 49, lora_rank=256, patch_embedding="frozen",
                             history_patches="lora", batch_size=1)
    config.checkpoint_every = 250
    # The yaml says clip 10; the released Stage-3 runs went through DeepSpeed, whose zero2.json clips
    # at 1.0 (spec §7.1 caveat, §11.7): 1.0 is what the released weights most likely saw.
    config.optimizer.update(b1=0.0, b2=0.999, weight_decay=1e-3, clip_norm=1.0)
    config.ema = dict(decay=0.99, start_step=250 if ode else 750)
    config.distill = dict(
        pyramid_steps=(2, 2, 2),  # the Distilled sampler: 2 steps per pyramid stage
        amplify_first_chunk=True,  # 4 steps per stage where the chunk has no history (chunk 0 / T2V)
        # 3a: chunks of each teacher video that get gradients per step, and the loss weight
        ode_sections=3, ode_loss_weight=80.0,
        # 3b: generator update every `generator_every` critic steps; real-score CFG x_c + 3 (x_c - x_u)
        generator_every=5, real_guidance_scale=3.0,
        generator_timesteps=dict(GENERATOR_TIMESTEPS), critic_timesteps=dict(CRITIC_TIMESTEPS),
    )
    config.history.update(drop_v2v=0.5, saturation=not ode)
    if ode:
        config.history.update(drop_t2v=0.0, drop_v2v=0.0, corrupt=False)  # 3a: teacher context as is
    else:
        config.history.update(corrupt_mode="random" if kind == "post_gan" else "noise")
        config.score = dict(init="")  # Helios-Base/transformer: real score (LoRA off) and critic backbone
        config.critic = dict(lora_rank=256, lora_alpha=256.0)
        config.critic_optimizer = dict(lr=4e-7, schedule="constant", warmup_steps=0, b1=0.0, b2=0.999, eps=1e-8,
                                       weight_decay=1e-3, clip_norm=1.0)
        config.gan = dict(enabled=kind == "post_gan", start_step=1000, hooks=(5, 15, 25, 35), cond_map_dim=768,
                          g_weight=0.05, d_weight=0.01, r1_weight=100.0, r1_sigma=0.1,
                          # "A": the released pairing (target of sample A, history of B, spec §11.4);
                          # "B": the chunk that follows the history the discriminator sees
                          real_sample="A")
    if tiny:
        shrink_to_tiny(config)
        config.ema.start_step = 2
        if ode:
            config.data.batch_size = 1  # 3a trains one prompt's trajectories per step (spec §6.1)
        if not ode:
            config.critic.update(lora_rank=4, lora_alpha=4.0)
            config.critic_optimizer.update(lr=1e-3)
            # 64 channels = 2 per GroupNorm group: with one, the tiny maps (1x1x1 after the strides) normalise to 0.
            config.gan.update(start_step=0, hooks=(0, 1), cond_map_dim=64)
    return config
