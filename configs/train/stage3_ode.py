"""Stage 3a (ODE regression, stage_3_ode): `helios-jax train --config
configs/train/stage3_ode.py[:ARGS]` (= `--config stage3_ode[:ARGS]`), ARGS comma-separated: `tiny`
for the tiny CPU model. The numbers live in helios_jax/training/presets.py."""
from helios_jax.training import presets


def get_config(arg=None):
    return presets.get_config("stage3_ode", arg)
