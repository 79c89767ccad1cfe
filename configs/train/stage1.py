"""Stage 1 (spec training.md §4): `helios-jax train --config configs/train/stage1.py[:ARGS]`.

ARGS, comma-separated: `post` for the low-LR refinement run (stage_1_post.py; default: the
high-LR stage_1_init.py run), `tiny` for the tiny CPU model. `stage1.py:tiny` is stage_1_init.py:tiny.
"""
from pathlib import Path

from helios_jax.config_flags import load_config


def get_config(arg=None):
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = args - {"post", "tiny"}
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; use post and/or tiny")
    phase = "post" if "post" in args else "init"
    return load_config(f"{Path(__file__).parent / f'stage_1_{phase}.py'}{':tiny' if 'tiny' in args else ''}")
