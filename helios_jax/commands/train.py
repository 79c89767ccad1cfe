"""`helios-jax train --config configs/train/stage_1_init.py[:tiny] --workdir DIR [--config.F=V ...]`.

Re-running the same command resumes from the latest checkpoint in DIR/checkpoints (after a
preemption, on every host). The model gets LoRA per `config.lora` (spec §3.5) and trains the
stage's loss (`stage1`: flow matching with history, `stage2`: the pyramid loss, `stage3_ode`: ODE
regression onto teacher trajectories) on the batches of `config.data_dir`: a folder written by
`helios-jax prepare-data` (`helios-jax prepare-ode` for stage3_ode), or `synthetic` for a small
fixed set of random batches in the same format (tests, and trying the loop without data).
"""
from __future__ import annotations

from helios_jax import distributed
from helios_jax.training.stage_names import DISTILL_STAGES, STAGE_LOSSES


def add_command(commands) -> None:
    train = commands.add_parser(
        "train", help="train the transformer (Stage 1/2/3a configs), resuming from the workdir's latest checkpoint",
        description="Train with a configs/train/stage_*.py config (':tiny' for the tiny CPU model) and "
        "--config.FIELD=VALUE overrides. Checkpoints, metrics.jsonl and config.json go to --workdir; "
        "running the same command again resumes from the latest checkpoint there.")
    train.add_argument("--config", required=True, help="training config file PATH[:ARG]")
    train.add_argument("--workdir", required=True, help="folder for checkpoints/, metrics.jsonl and config.json")
    train.set_defaults(run=run_train)


def run_train(args, overrides) -> None:
    distributed.initialize_if_configured()  # no-op when main() already joined the hosts
    import jax

    from helios_jax.config_flags import apply_overrides, load_config
    from helios_jax.parallel import make_mesh
    from helios_jax.training.checkpointing import Checkpoints
    from helios_jax.training.lora import trainable_filter
    from helios_jax.training.model_setup import build_student
    from helios_jax.training.trainer import train

    config = apply_overrides(load_config(args.config), overrides)
    stages = STAGE_LOSSES + DISTILL_STAGES
    if config.train.stage not in stages:
        raise ValueError(f"--config.train.stage={config.train.stage!r}: must be one of {', '.join(stages)}")
    if not config.data_dir:
        writer = "prepare-ode" if config.train.stage == "stage3_ode" else "prepare-data"
        raise ValueError(f"--config.data_dir: give a folder written by `helios-jax {writer}` "
                         "(or `synthetic` for random batches)")
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size {config.data.batch_size} does not split over "
                         f"{jax.process_count()} processes")
    iterator = _batches(config)  # missing or corrupt shards are named before the workdir is touched
    existing = Checkpoints(args.workdir, config)  # refuse a mismatched resume before building anything
    existing.check_latest_config()
    existing.close()
    mesh = make_mesh(**{axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor", "seq")})
    model = build_student(config, mesh)
    if config.train.stage in DISTILL_STAGES:
        return _run_dmd(args, config, model, iterator, mesh)
    distributed.log(f"train: {args.config} -> {args.workdir}  {config.train.stage}  data={config.data_dir}  "
                    f"mesh={dict(mesh.shape)}  LoRA rank {config.lora.rank}")
    train(config, args.workdir, model=model, loss_fn=_stage_loss(config),
          trainable_filter=trainable_filter(config.lora.history_patches), iterator=iterator, mesh=mesh,
          uses_history=True, cost_fn=_step_cost(config))


def _run_dmd(args, config, generator, iterator, mesh) -> None:
    """Stage 3b: the generator (config.model with its LoRA, from build_student), the critic = the
    score backbone (config.score.init; random from seed + 1 when empty) with its own LoRA and, in
    the GAN version, the discriminator heads."""
    import ml_collections
    import numpy as np
    from flax import nnx

    from helios_jax.parallel import shard_state
    from helios_jax.training.dmd import Critic
    from helios_jax.training.dmd_trainer import train_dmd
    from helios_jax.training.gan_heads import GanHeads
    from helios_jax.training.lora import add_lora
    from helios_jax.training.model_setup import build_model

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
    negative = _negative_prompt_embeds(config, generator.config)
    distributed.log(f"train: {args.config} -> {args.workdir}  stage3_dmd  data={config.data_dir}  "
                    f"mesh={dict(mesh.shape)}  LoRA rank {config.lora.rank} / critic {config.critic.lora_rank}  "
                    f"GAN {'on from step ' + str(config.gan.start_step) if heads else 'off'}")
    train_dmd(config, args.workdir, generator=generator, critic=critic, iterator=iterator, mesh=mesh,
              negative_prompt_embeds=np.asarray(negative, np.float32))


def _negative_prompt_embeds(config, model_config):
    """The real score's unconditional text: stored by prepare-data, or a fixed random one for synthetic data."""
    import numpy as np

    if config.data_dir == "synthetic":
        return np.random.default_rng(int(config.data.seed) + 7).standard_normal((8, model_config.text_dim))
    from helios_jax.data.storage import read_extra
    from helios_jax.data.storage import NEGATIVE_PROMPT_EMBED

    return read_extra(config.data_dir, NEGATIVE_PROMPT_EMBED)


def _stage_loss(config):
    if config.train.stage == "stage1":
        from helios_jax.training.flow_matching import stage1_loss as loss
    elif config.train.stage == "stage2":
        from helios_jax.training.pyramid_training import stage2_loss as loss
    else:
        from helios_jax.training.ode_regression import ode_loss as loss
    return lambda model, batch, key: loss(model, batch, key, config)


def _step_cost(config):
    """The ODE step's cost (several forwards per row); None: the trainer's one-chunk-per-row default."""
    if config.train.stage != "stage3_ode":
        return None
    from helios_jax.training.ode_regression import ode_step_cost

    return lambda model_config, batch: ode_step_cost(model_config, batch, int(config.distill.ode_sections))


def _batches(config):
    """This host's batches: the prepared dataset (sharded over hosts by the loader) or synthetic ones."""
    import jax

    local = config.data.batch_size // jax.process_count()
    if config.train.stage == "stage3_ode":
        return _ode_batches(config, local)
    if config.data_dir == "synthetic":
        from helios_jax.training import synthetic
        from helios_jax.training.model_setup import model_config_of

        return synthetic.synthetic_iterator(model_config_of(config), batch_size=local, seed=int(config.data.seed),
                                            shard_index=jax.process_index(), shard_count=jax.process_count(),
                                            paired=config.train.stage in DISTILL_STAGES)
    from helios_jax.training.data import make_loader

    return make_loader(config.data_dir, batch_size=int(config.data.batch_size), seed=int(config.data.seed),
                       worker_count=int(config.data.worker_count), paired=config.train.stage in DISTILL_STAGES)


def _ode_batches(config, local: int):
    """Stage 3a: a `helios-jax prepare-ode` folder, or `synthetic` random records in its layout."""
    import jax

    if config.data_dir == "synthetic":
        from helios_jax.training.model_setup import model_config_of
        from helios_jax.training.ode_data import synthetic_ode_iterator

        return synthetic_ode_iterator(model_config_of(config), batch_size=local, seed=int(config.data.seed),
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
    from helios_jax.training.ode_data import make_ode_loader

    return make_ode_loader(config.data_dir, batch_size=int(config.data.batch_size), seed=int(config.data.seed),
                           worker_count=int(config.data.worker_count))
