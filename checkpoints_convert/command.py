"""The `convert` and `export` commands, shared by `helios-jax` and `python -m checkpoints_convert`."""
from __future__ import annotations

import argparse

from checkpoints_convert.convert import DTYPE_CHOICES


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * units[unit])
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}")


def add_commands(commands) -> None:
    convert = commands.add_parser(
        "convert", help="diffusers/transformers safetensors -> converted (tensorstore) folder, streamed",
        description="Convert a diffusers model folder (model_index.json) or one component folder "
        "(config.json + safetensors) into a folder helios_jax.load restores. Streams one tensor at a "
        "time; DST appears only when complete.")
    convert.add_argument("src", help="diffusers model folder or component folder")
    convert.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    convert.add_argument("--component", action="append", metavar="NAME",
                         help="convert/copy only this part (transformer, vae, text_encoder, tokenizer, scheduler); repeatable")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES,
                         help="stored dtype; default: each component's spec dtype (bf16 transformer with fp32 "
                         "islands, fp32 VAE, bf16 text encoder); keep: as in the source")
    convert.add_argument("--overwrite", action="store_true", help="replace DST (only once the new one is complete)")
    convert.add_argument("--verify", action="store_true",
                         help="compare a sample of tensors between SRC and DST afterwards (only that, if DST "
                         "exists and --overwrite is not given)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=run_convert)

    export = commands.add_parser(
        "export", help="converted folder -> diffusers-format safetensors",
        description="Write a converted folder back as diffusers/transformers safetensors (sharded with an "
        "index json) that from_pretrained loads.")
    export.add_argument("src", help="folder written by convert")
    export.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    export.add_argument("--max-shard-size", type=_size, default="5GB", help="largest shard (default 5GB)")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=run_export)


def run_convert(args, overrides=()) -> None:
    from pathlib import Path

    from checkpoints_convert.convert import convert, verify

    if args.verify and Path(args.dst).exists() and not args.overwrite:
        count = verify(args.src, args.dst)
        print(f"verified {count} tensors: {args.dst} matches {args.src}")
        return
    dst = convert(args.src, args.dst, components=args.component, dtype=args.dtype, overwrite=args.overwrite,
                  verify=args.verify, progress=not args.quiet)
    print(f"converted {args.src} -> {dst}" + (" (verified)" if args.verify else ""))


def run_export(args, overrides=()) -> None:
    from checkpoints_convert.export import export

    dst = export(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                 progress=not args.quiet)
    print(f"exported {args.src} -> {dst}")
