"""Stage 3b (DMD): `helios-jax train --config configs/train/stage3_dmd.py[:ARGS]` (= `--config
stage3_dmd[:ARGS]`), ARGS comma-separated: `gan` for stage_3_post_gan (default stage_3_post), `tiny`
for the tiny CPU model. The numbers live in helios_jax/training/presets.py."""
from helios_jax.training import presets


def get_config(arg=None):
    return presets.get_config("stage3_dmd", arg)
