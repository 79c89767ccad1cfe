"""stage_2_post (spec §7.1, §3.5, §5.2): `helios-jax train --config configs/train/stage_2_post.py[:tiny]`.
Starts from Helios-Mid/transformer_init (spec §2):
set --config.model.init to that folder (converted or diffusers format)."""
from helios_jax.training.config import training_config


def get_config(arg=None):
    return training_config(stage="stage2", lr=3e-5, schedule="constant_with_warmup", warmup_steps=500, seed=46,
                           lora_rank=256, patch_embedding="lora", history_patches="lora",
                           sample_ratios=(1, 1, 1), batch_size=1, arg=arg)
