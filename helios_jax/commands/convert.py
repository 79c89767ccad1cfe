"""`helios-jax convert` (also `python -m checkpoints_convert`): diffusers/transformers safetensors -> a
converted folder, streamed."""
from __future__ import annotations

from checkpoints_convert.convert import DTYPE_CHOICES


def add_command(commands) -> None:
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
    convert.set_defaults(run=run)


def run(args, overrides=()) -> None:
    from pathlib import Path

    from checkpoints_convert.convert import convert, verify

    if args.verify and Path(args.dst).exists() and not args.overwrite:
        count = verify(args.src, args.dst)
        print(f"verified {count} tensors: {args.dst} matches {args.src}")
        return
    dst = convert(args.src, args.dst, components=args.component, dtype=args.dtype, overwrite=args.overwrite,
                  verify=args.verify, progress=not args.quiet)
    print(f"converted {args.src} -> {dst}" + (" (verified)" if args.verify else ""))
