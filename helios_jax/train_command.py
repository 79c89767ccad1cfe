"""`helios-jax train --config configs/train/stage_1_init.py[:tiny] --workdir DIR [--config.F=V ...]`.

Re-running the same command resumes from the latest checkpoint in DIR/checkpoints (after a
preemption, on every host). Until the Stage 1/2 losses and the latent loader are wired in, the
step trains the stand-in task of helios_jax/training/synthetic.py (flow matching on the target
chunk, no history) on synthetic batches, with everything but the transformer blocks trainable.
"""
from __future__ import annotations

from helios_jax import distributed


def add_command(commands) -> None:
    train = commands.add_parser(
        "train", help="train the transformer (Stage 1/2 configs), resuming from the workdir's latest checkpoint",
        description="Train with a configs/train/stage_*.py config (':tiny' for the tiny CPU model) and "
        "--config.FIELD=VALUE overrides. Checkpoints, metrics.jsonl and config.json go to --workdir; "
        "running the same command again resumes from the latest checkpoint there.")
    train.add_argument("--config", required=True, help="training config file PATH[:ARG]")
    train.add_argument("--workdir", required=True, help="folder for checkpoints/, metrics.jsonl and config.json")
    train.set_defaults(run=run_train)


def run_train(args, overrides) -> None:
    distributed.initialize_if_configured()  # no-op when main() already joined the hosts
    import jax
    from flax import nnx

    from helios_jax.config_flags import apply_overrides, load_config
    from helios_jax.parallel import make_mesh
    from helios_jax.training import synthetic
    from helios_jax.training.checkpointing import Checkpoints
    from helios_jax.training.model_setup import build_model
    from helios_jax.training.trainer import train

    config = apply_overrides(load_config(args.config), overrides)
    if config.data.path:
        raise ValueError(f"--config.data.path={config.data.path}: the latent loader is not wired into "
                         "`helios-jax train` yet (it trains the synthetic stand-in task); leave data.path empty")
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size {config.data.batch_size} does not split over "
                         f"{jax.process_count()} processes")
    existing = Checkpoints(args.workdir, config)  # refuse a mismatched resume before building anything
    existing.check_latest_config()
    existing.close()
    mesh = make_mesh(**{axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor", "seq")})
    model = build_model(config, mesh)
    iterator = synthetic.synthetic_iterator(
        model.config, batch_size=config.data.batch_size // jax.process_count(), seed=int(config.data.seed),
        shard_index=jax.process_index(), shard_count=jax.process_count())
    distributed.log(f"train: {args.config} -> {args.workdir}  mesh={dict(mesh.shape)}  "
                    f"stand-in task: synthetic batches, flow-matching loss without history")
    train(config, args.workdir, model=model, loss_fn=synthetic.chunk_velocity_loss,
          trainable_filter=nnx.Not(nnx.PathContains("blocks")), iterator=iterator, mesh=mesh,
          uses_history=False)
