"""`helios-jax train --config stage1[:post,tiny] --workdir DIR [--config.F=V ...]`.

Re-running the same command resumes from the latest checkpoint in DIR/checkpoints (after a
preemption, on every host). The model gets LoRA per `config.lora` (spec §3.5) and trains the
stage's loss (`stage1`: flow matching with history, `stage2`: the pyramid loss, `stage3_ode`: ODE
regression onto teacher trajectories) on the batches of `config.data_dir`: a folder written by
`helios-jax prepare-data` (`helios-jax prepare-ode` for stage3_ode), or `synthetic` for a small
fixed set of random batches in the same format (tests, and trying the loop without data).
The per-stage choice of loop, loss and data is helios_jax/training/stages.py; this module only
parses the command line.
"""
from __future__ import annotations

from helios_jax import distributed


def add_command(commands) -> None:
    train = commands.add_parser(
        "train", help="train the transformer (the Stage 1/2/3 presets), resuming from the workdir's latest checkpoint",
        description="Train with a training preset (stage1, stage2, stage3_ode, stage3_dmd; the same as "
        "configs/train/NAME.py) and its comma-separated args (':post', ':gan', ':tiny' for the tiny CPU model) and "
        "--config.FIELD=VALUE overrides. Checkpoints, metrics.jsonl and config.json go to --workdir; "
        "running the same command again resumes from the latest checkpoint there.")
    train.add_argument("--config", required=True, help="training preset NAME[:ARGS] or config file PATH[:ARGS]")
    train.add_argument("--workdir", required=True, help="folder for checkpoints/, metrics.jsonl and config.json")
    train.set_defaults(run=run_train)


def run_train(args, overrides) -> None:
    distributed.initialize_if_configured()  # no-op when main() already joined the hosts
    from helios_jax.config_flags import apply_overrides, load_config
    from helios_jax.training import stages

    stages.run(apply_overrides(load_config(args.config), overrides), args.workdir, label=args.config)
