import sys

from helios_jax.cli import main

sys.exit(main())
