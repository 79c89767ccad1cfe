"""The `helios-jax` command. Each subcommand exits 0 on success and, on bad input, prints one line
naming the file, tensor or flag at fault and exits 2."""
from __future__ import annotations

import argparse
import sys

from helios_jax import distributed
from helios_jax.commands import (aot, convert, export, forward, generate, merge_lora, prepare_data, prepare_ode, serve,
                                 train)
from helios_jax import __version__


# In the order `helios-jax --help` lists them.
COMMANDS = (forward, generate, serve, convert, export, aot, prepare_data, prepare_ode, train, merge_lora)


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other bad-input error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="helios-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"helios-jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    for command in COMMANDS:
        command.add_command(commands)
    return parser


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
