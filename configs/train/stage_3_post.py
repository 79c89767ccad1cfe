"""stage_3_post (spec §6.2, §7.1): Stage 3b, DMD with ground-truth history. The generator starts
from Helios-Distilled/transformer_ode (--config.model.init); the real score and the critic share the
Helios-Base/transformer backbone (--config.score.init). --config.data_dir: a prepare-data folder."""
from helios_jax.training.distill_config import stage3_config


def get_config(arg=None):
    return stage3_config("post", arg)
