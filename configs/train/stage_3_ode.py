"""stage_3_ode (spec §6.1, §7.1): Stage 3a, ODE regression onto teacher trajectories written by
`helios-jax prepare-ode` (set --config.data_dir to that folder). The generator starts from
Helios-Mid/transformer (--config.model.init)."""
from helios_jax.training.distill_config import stage3_config


def get_config(arg=None):
    return stage3_config("ode", arg)
