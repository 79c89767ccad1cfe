"""`helios-jax merge-lora --workdir DIR --out DST`: a training run's transformer with its LoRA fused
in, as the folder the next stage starts from and inference loads (spec training.md §2, §10)."""
from __future__ import annotations


def add_command(commands) -> None:
    merge = commands.add_parser(
        "merge-lora", help="fuse a training run's LoRA (or its EMA) into its transformer and write the folder",
        description="Read the run in --workdir (its config.json and one checkpoint), fuse the trained "
        "(default for Stages 1-2) or EMA (default for Stage 3) LoRA into the transformer the run started from, "
        "and write a converted transformer folder to --out: the next stage's --config.model.init, "
        "`helios_jax.load`, `helios-jax generate --transformer`, and `helios-jax export` for diffusers. "
        "The unmerged adapters are written beside it as pytorch_lora_weights.safetensors (PEFT names).")
    merge.add_argument("--workdir", required=True, help="the `helios-jax train` workdir")
    merge.add_argument("--out", required=True, help="transformer folder to write")
    merge.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    merge.add_argument("--weights", choices=("ema", "trained"),
                       help="the EMA or the last trained values (default: ema where the run keeps one)")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.set_defaults(run=run)


def run(args, overrides) -> None:
    from pathlib import Path

    from helios_jax.distributed import log
    from helios_jax.training.release_folder import write_release_folder
    from helios_jax.training.run_weights import load_trained

    if overrides:
        raise ValueError(f"{overrides[0]}: merge-lora takes the run's own config.json; no --config overrides")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out}: already exists (use --overwrite)")
    trained = load_trained(args.workdir, step=args.step, weights=args.weights)
    log(f"merge-lora: {args.workdir} step {trained.step} ({trained.weights} weights, stage "
        f"{trained.config.train.stage}) -> {out}")
    write_release_folder(trained, out, workdir=args.workdir, overwrite=args.overwrite)
    log(f"merge-lora: wrote {out}")
