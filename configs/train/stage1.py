"""Stage 1: `helios-jax train --config configs/train/stage1.py[:ARGS]`, ARGS comma-separated:
`post` for stage_1_post.py (default stage_1_init.py), `tiny` for the tiny CPU model."""
from helios_jax.training.config import stage_run


def get_config(arg=None):
    return stage_run(1, arg)
