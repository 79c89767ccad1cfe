"""The three training stages (spec training.md §4-§6) and what `helios-jax train` runs for each
config.train.stage: its loop, loss, data and step cost. commands/train.py only parses the command
line and calls `run`.

  stage        spec   loop                          loss / data
  stage1       §4     trainer.train                 stage1_flow_matching.stage1_loss on prepare-data clips
  stage2       §5     trainer.train                 stage2_pyramid.stage2_loss on prepare-data clips
  stage3_ode   §6.1   trainer.train                 stage3_ode_regression.ode_loss on prepare-ode trajectories
  stage3_dmd   §6.2   stage3_dmd_trainer.train_dmd  stage3_dmd (+ stage3_gan_heads) on paired prepare-data clips

Every module is imported when its stage runs, so this table is cheap to import (run_weights reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _stage1_loss(model, batch, key, config):
    from helios_jax.training.stage1_flow_matching import stage1_loss

    return stage1_loss(model, batch, key, config)


def _stage2_loss(model, batch, key, config):
    from helios_jax.training.stage2_pyramid import stage2_loss

    return stage2_loss(model, batch, key, config)


def _ode_loss(model, batch, key, config):
    from helios_jax.training.stage3_ode_regression import ode_loss

    return ode_loss(model, batch, key, config)


def _ode_step_cost(model_config, batch, config):
    """Several forwards per row (`distill.ode_sections` chunks of each teacher video)."""
    from helios_jax.training.stage3_ode_regression import ode_step_cost

    return ode_step_cost(model_config, batch, int(config.distill.ode_sections))


@dataclass(frozen=True)
class Stage:
    loop: str  # "trainer": one loss, trainer.train; "dmd": generator + critic, stage3_dmd_trainer.train_dmd
    data: str  # "clips": a prepare-data folder; "paired": the same, two chunks per clip; "ode": prepare-ode
    loss: Callable | None = None  # (model, batch, key, config) -> (loss, metrics), for the trainer loop
    cost: Callable | None = None  # (model_config, batch, config) -> step FLOPs; None: one chunk per row


STAGES = {
    "stage1": Stage(loop="trainer", data="clips", loss=_stage1_loss),
    "stage2": Stage(loop="trainer", data="clips", loss=_stage2_loss),
    "stage3_ode": Stage(loop="trainer", data="ode", loss=_ode_loss, cost=_ode_step_cost),
    "stage3_dmd": Stage(loop="dmd", data="paired"),
}
STAGE_LOSSES = tuple(name for name, stage in STAGES.items() if stage.loop == "trainer")  # one loss, trainer.train
DISTILL_STAGES = tuple(name for name, stage in STAGES.items() if stage.loop == "dmd")  # their state names `generator`


def stage_of(config) -> Stage:
    """config.train.stage's entry; a ValueError naming the stages for any other."""
    if config.train.stage not in STAGES:
        raise ValueError(f"--config.train.stage={config.train.stage!r}: must be one of {', '.join(STAGES)}")
    return STAGES[config.train.stage]


def run(config, workdir, *, label: str) -> None:
    """Train `config` (resolved, overrides applied) into `workdir`, resuming from its latest
    checkpoint; `label` names the config in the log line."""
    import jax

    from helios_jax import distributed
    from helios_jax.parallel import make_mesh
    from helios_jax.training.checkpointing import Checkpoints
    from helios_jax.training.lora import trainable_filter
    from helios_jax.training.model_setup import build_student
    from helios_jax.training.trainer import train

    stage = stage_of(config)
    if not config.data_dir:
        writer = "prepare-ode" if stage.data == "ode" else "prepare-data"
        raise ValueError(f"--config.data_dir: give a folder written by `helios-jax {writer}` "
                         "(or `synthetic` for random batches)")
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size {config.data.batch_size} does not split over "
                         f"{jax.process_count()} processes")
    iterator = batches(config)  # missing or corrupt shards are named before the workdir is touched
    existing = Checkpoints(workdir, config)  # refuse a mismatched resume before building anything
    existing.check_latest_config()
    existing.close()
    mesh = make_mesh(**{axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor", "seq")})
    model = build_student(config, mesh)
    if stage.loop == "dmd":
        return run_dmd(config, workdir, model, iterator, mesh, label=label)
    distributed.log(f"train: {label} -> {workdir}  {config.train.stage}  data={config.data_dir}  "
                    f"mesh={dict(mesh.shape)}  LoRA rank {config.lora.rank}")
    train(config, workdir, model=model, loss_fn=stage_loss(config),
          trainable_filter=trainable_filter(config.lora.history_patches), iterator=iterator, mesh=mesh,
          uses_history=True, cost_fn=step_cost(config))


def stage_loss(config):
    """The trainer's loss_fn(model, batch, key) of a one-loss stage."""
    loss = stage_of(config).loss
    return lambda model, batch, key: loss(model, batch, key, config)


def step_cost(config):
    """The trainer's cost_fn(model_config, batch); None: its one-chunk-per-row default."""
    cost = stage_of(config).cost
    if cost is None:
        return None
    return lambda model_config, batch: cost(model_config, batch, config)


def run_dmd(config, workdir, generator, iterator, mesh, *, label: str) -> None:
    """Stage 3b: the generator (config.model with its LoRA, from build_student), the critic = the
    score backbone (config.score.init; random from seed + 1 when empty) with its own LoRA and, in
    the GAN version, the discriminator heads."""
    import ml_collections
    import numpy as np
    from flax import nnx

    from helios_jax import distributed
    from helios_jax.parallel import shard_state
    from helios_jax.training.lora import add_lora
    from helios_jax.training.model_setup import build_model
    from helios_jax.training.stage3_dmd import Critic
    from helios_jax.training.stage3_dmd_trainer import train_dmd
    from helios_jax.training.stage3_gan_heads import GanHeads

    score_config = ml_collections.ConfigDict(config.to_dict())
    score_config.model.init = config.score.init
    score_config.seed = int(config.seed) + 1  # a random score backbone differs from the generator's
    backbone = build_model(score_config, mesh)
    add_lora(backbone, rank=int(config.critic.lora_rank), alpha=float(config.critic.lora_alpha),
             rngs=nnx.Rngs(int(config.seed) + 2))
    heads = None
    if config.gan.enabled:
        model_config = backbone.config
        heads = GanHeads(model_config.num_attention_heads * model_config.attention_head_dim, model_config.out_channels,
                         int(config.gan.cond_map_dim), hooks=tuple(config.gan.hooks), rngs=nnx.Rngs(int(config.seed) + 3))
    critic = Critic(backbone, heads)
    shard_state(critic, mesh)
    negative = negative_prompt_embeds(config, generator.config)
    distributed.log(f"train: {label} -> {workdir}  stage3_dmd  data={config.data_dir}  "
                    f"mesh={dict(mesh.shape)}  LoRA rank {config.lora.rank} / critic {config.critic.lora_rank}  "
                    f"GAN {'on from step ' + str(config.gan.start_step) if heads else 'off'}")
    train_dmd(config, workdir, generator=generator, critic=critic, iterator=iterator, mesh=mesh,
              negative_prompt_embeds=np.asarray(negative, np.float32))


def negative_prompt_embeds(config, model_config):
    """The real score's unconditional text: stored by prepare-data, or a fixed random one for synthetic data."""
    import numpy as np

    if config.data_dir == "synthetic":
        return np.random.default_rng(int(config.data.seed) + 7).standard_normal((8, model_config.text_dim))
    from helios_jax.data.storage import NEGATIVE_PROMPT_EMBED, read_extra

    return read_extra(config.data_dir, NEGATIVE_PROMPT_EMBED)


def batches(config):
    """This host's batches of the stage's data: the prepared dataset (sharded over hosts by the
    loader) or, for data_dir `synthetic`, random batches in its format."""
    import jax

    from helios_jax.training.model_setup import model_config_of

    data = stage_of(config).data
    local = config.data.batch_size // jax.process_count()
    loader_args = dict(batch_size=int(config.data.batch_size), seed=int(config.data.seed),
                       worker_count=int(config.data.worker_count))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if data == "ode":  # Stage 3a: a `helios-jax prepare-ode` folder, or random records in its layout
        from helios_jax.training.stage3_ode_data import make_ode_loader, synthetic_ode_iterator

        if config.data_dir == "synthetic":
            return synthetic_ode_iterator(model_config_of(config), batch_size=local, seed=int(config.data.seed),
                                          **shard)
        return make_ode_loader(config.data_dir, **loader_args)
    paired = data == "paired"
    if config.data_dir == "synthetic":
        from helios_jax.training import synthetic

        return synthetic.synthetic_iterator(model_config_of(config), batch_size=local, seed=int(config.data.seed),
                                            paired=paired, **shard)
    from helios_jax.training.data import make_loader

    return make_loader(config.data_dir, paired=paired, **loader_args)
