"""The `helios-jax` command. Each subcommand exits 0 on success and, on bad input, prints one line
naming the file, tensor or flag at fault and exits 2."""
from __future__ import annotations

import argparse
import sys
import time

from checkpoints_convert.command import add_commands
from helios_jax import (aot_command, distributed, generate_command, merge_lora_command, prepare_data_command,
                        prepare_ode_command, serve_command, train_command)
from helios_jax import __version__


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,H,W latent sizes, got {text!r}") from None
    if min(t, h, w) < 1:
        raise argparse.ArgumentTypeError(f"latent sizes must be positive, got {text!r}")
    return t, h, w


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other bad-input error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="helios-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"helios-jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    forward = commands.add_parser(
        "forward",
        help="run one transformer forward on random pipeline-shaped inputs and report it",
        description="Run the Helios transformer once on random inputs shaped as the pipeline builds them "
        "(history of 16+2+2 latent frames, 512 text tokens) and print shapes, statistics and timings. "
        "Accepts --config PATH[:ARG] and --config.FIELD=VALUE overrides with --model tiny-random.",
    )
    forward.add_argument("--model", required=True, help="'tiny-random' (random weights) or a transformer folder")
    forward.add_argument("--config", default="tiny", help="model config for tiny-random: PATH[:ARG] or a name")
    forward.add_argument("--latent-size", type=_parse_size, default=(9, 16, 16), help="current chunk T,H,W in latents")
    forward.add_argument("--no-history", action="store_true", help="run without history latents (a plain Wan forward)")
    forward.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter and compute dtype")
    forward.add_argument("--seed", type=int, default=0)
    forward.set_defaults(run=run_forward)
    generate_command.add_command(commands)
    serve_command.add_command(commands)
    add_commands(commands)
    aot_command.add_command(commands)
    prepare_data_command.add_command(commands)
    prepare_ode_command.add_command(commands)
    train_command.add_command(commands)
    merge_lora_command.add_command(commands)
    return parser


def run_forward(args, overrides) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from helios_jax.config_flags import apply_overrides, load_config
    from helios_jax.distributed import log
    from helios_jax.loading import load
    from helios_jax.models.example_inputs import example_inputs, token_counts
    from helios_jax.models.forward import make_forward, parameter_count
    from helios_jax.models.transformer import HeliosTransformer3DModel

    if args.model == "tiny-random":
        config = apply_overrides(load_config(args.config), overrides)
        if args.dtype:
            config.dtype = args.dtype
        model = HeliosTransformer3DModel(config, rngs=nnx.Rngs(args.seed))
    else:
        if overrides:
            raise ValueError(f"{overrides[0]}: --config overrides apply to --model tiny-random only")
        model = load(args.model, dtype=args.dtype)
        config = model.config
    history = not args.no_history
    inputs = example_inputs(config, args.latent_size, history=history, seed=args.seed)
    history_tokens, current_tokens = token_counts(config, args.latent_size, history=history)
    forward, state = make_forward(model)

    log(f"model: {args.model}  layers={config.num_layers}  dim={config.num_attention_heads * config.attention_head_dim}"
          f"  dtype={config.dtype}  parameters={parameter_count(model):,}")
    log(f"tokens: {history_tokens} history + {current_tokens} current = {history_tokens + current_tokens}"
          f"  (backend: {jax.default_backend()})")
    for name, value in inputs.items():
        log(f"  {name:32s} {tuple(value.shape)} {value.dtype}")
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, **inputs))
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, **inputs))
    ran = time.perf_counter() - start
    values = np.asarray(out, np.float32)
    if not np.isfinite(values).all():
        raise FloatingPointError("transformer output has non-finite values")
    log(f"output (velocity for the current chunk): {tuple(out.shape)} {out.dtype}"
          f"  mean={values.mean():+.4f} std={values.std():.4f}")
    log(f"first call (compile + run): {compiled:.2f} s   second call: {ran * 1e3:.1f} ms")


def main(argv=None) -> int:
    from helios_jax.backend_env import quiet_libtpu_without_tpu

    # Before any jax backend starts (the imports above load jax, not libtpu): on a host without TPU
    # chips, libtpu's warnings about a missing TPU VM would open every command's output.
    quiet_libtpu_without_tpu()
    from helios_jax.config_flags import split_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = split_overrides(argv)
    args = build_parser().parse_args(argv)
    try:
        distributed.initialize_if_configured()  # before any jax use: joins the other hosts, if any
        args.run(args, overrides)
    except (ValueError, NotImplementedError, OSError, FloatingPointError) as error:
        distributed.error_log(f"helios-jax {args.command}: error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
