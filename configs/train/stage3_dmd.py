"""Stage 3b: `helios-jax train --config configs/train/stage3_dmd.py[:ARGS]`, ARGS comma-separated:
`gan` for stage_3_post_gan (default stage_3_post), `tiny` for the tiny CPU model."""
from helios_jax.training.distill_config import stage3_config


def get_config(arg=None):
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = args - {"gan", "tiny"}
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; use gan and/or tiny")
    return stage3_config("post_gan" if "gan" in args else "post", "tiny" if "tiny" in args else None)
