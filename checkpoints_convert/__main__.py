"""`python -m checkpoints_convert SRC DST [...]`: the same command as `helios-jax convert`
(and `python -m checkpoints_convert export SRC DST` as `helios-jax export`)."""
import sys

from helios_jax.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if argv[:1] in (["convert"], ["export"]) else ["convert", *argv]))
