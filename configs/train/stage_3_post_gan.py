"""stage_3_post_gan (spec §6.3): stage_3_post plus the GAN heads on the critic features from step
1000 and `random` history corruption. Same inits and data as stage_3_post."""
from helios_jax.training.distill_config import stage3_config


def get_config(arg=None):
    return stage3_config("post_gan", arg)
