"""stage_1_init (spec §7.1, §3.5, §5.2): `helios-jax train --config configs/train/stage_1_init.py[:tiny]`.
Starts from Wan-AI/Wan2.1-T2V-14B-Diffusers/transformer (spec §2): set --config.model.init to that
diffusers folder; the history patchers are derived from its patch_embedding (docs/training.md,
"Starting from Wan2.1")."""
from helios_jax.training.config import training_config


def get_config(arg=None):
    return training_config(stage="stage1", lr=5e-5, schedule="constant", warmup_steps=0, seed=43,
                           lora_rank=128, patch_embedding="lora", history_patches="full",
                           sample_ratios=(), batch_size=2, arg=arg)
