"""Stage 1 (Base): `helios-jax train --config configs/train/stage1.py[:ARGS]` (= `--config
stage1[:ARGS]`), ARGS comma-separated: `post` for stage_1_post (default stage_1_init), `tiny` for
the tiny CPU model. The numbers live in helios_jax/training/presets.py."""
from helios_jax.training import presets


def get_config(arg=None):
    return presets.get_config("stage1", arg)
