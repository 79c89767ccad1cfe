"""Stage 2 (Mid, pyramid): `helios-jax train --config configs/train/stage2.py[:ARGS]` (= `--config
stage2[:ARGS]`), ARGS comma-separated: `post` for stage_2_post (default stage_2_init), `tiny` for
the tiny CPU model. The numbers live in helios_jax/training/presets.py."""
from helios_jax.training import presets


def get_config(arg=None):
    return presets.get_config("stage2", arg)
