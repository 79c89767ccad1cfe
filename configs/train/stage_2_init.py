"""stage_2_init (spec §7.1, §3.5, §5.2): `helios-jax train --config configs/train/stage_2_init.py[:tiny]`.
Starts from Helios-Base/transformer (spec §2):
set --config.model.init to that folder (converted or diffusers format)."""
from helios_jax.training.config import training_config


def get_config(arg=None):
    return training_config(stage="stage2", lr=1e-4, schedule="constant_with_warmup", warmup_steps=1000, seed=45,
                           lora_rank=256, patch_embedding="frozen", history_patches="frozen",
                           sample_ratios=(1, 2, 1), batch_size=1, arg=arg)
