"""stage_1_post (spec §7.1, §3.5, §5.2): `helios-jax train --config configs/train/stage_1_post.py[:tiny]`.
Starts from Helios-Base/transformer_init (spec §2):
set --config.model.init to that folder (converted or diffusers format)."""
from helios_jax.training.config import training_config


def get_config(arg=None):
    return training_config(stage="stage1", lr=3e-5, schedule="constant", warmup_steps=0, seed=44,
                           lora_rank=128, patch_embedding="lora", history_patches="full",
                           sample_ratios=(), batch_size=2, arg=arg)
