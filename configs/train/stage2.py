"""Stage 2: `helios-jax train --config configs/train/stage2.py[:ARGS]`, ARGS comma-separated:
`post` for stage_2_post.py (default stage_2_init.py), `tiny` for the tiny CPU model."""
from helios_jax.training.config import stage_run


def get_config(arg=None):
    return stage_run(2, arg)
