"""`helios-jax export` (also `python -m checkpoints_convert export`): a converted folder back to
diffusers-format safetensors."""
from __future__ import annotations

from helios_jax.commands.arguments import byte_size


def add_command(commands) -> None:
    export = commands.add_parser(
        "export", help="converted folder -> diffusers-format safetensors",
        description="Write a converted folder back as diffusers/transformers safetensors (sharded with an "
        "index json) that from_pretrained loads.")
    export.add_argument("src", help="folder written by convert")
    export.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    export.add_argument("--max-shard-size", type=byte_size, default="5GB", help="largest shard (default 5GB)")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=run)


def run(args, overrides=()) -> None:
    from checkpoints_convert.export import export

    dst = export(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                 progress=not args.quiet)
    print(f"exported {args.src} -> {dst}")
