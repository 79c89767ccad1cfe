"""Stage 3a: `helios-jax train --config configs/train/stage3_ode.py[:tiny]` (= stage_3_ode.py)."""
from helios_jax.training.distill_config import stage3_config


def get_config(arg=None):
    return stage3_config("ode", arg)
