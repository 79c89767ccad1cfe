"""The training runs of spec training.md §7.1 as named presets, shipped with the package so an
installed wheel trains without the repository's configs/:

  `helios-jax train --config stage1[:ARGS]`  (or `--config configs/train/stage1.py[:ARGS]`, the same)

  preset       ARGS (comma-separated)   runs (spec §7.1 names)
  stage1       post, tiny               stage_1_init (default), stage_1_post
  stage2       post, tiny               stage_2_init (default), stage_2_post
  stage3_ode   tiny                     stage_3_ode
  stage3_dmd   gan, tiny                stage_3_post (default), stage_3_post_gan

`tiny` swaps in the tiny random transformer (CPU tests and the demo). `parse_args` is the one
place an ARG is read; an unknown one is a ValueError naming the preset's accepted args.
"""
from __future__ import annotations

import ml_collections

from helios_jax.training.config import training_config
from helios_jax.training.stage3_config import stage3_config

# preset -> the args it accepts; the first run is the default, each other one is chosen by an arg
PRESET_ARGS = {
    "stage1": ("post", "tiny"),
    "stage2": ("post", "tiny"),
    "stage3_ode": ("tiny",),
    "stage3_dmd": ("gan", "tiny"),
}
PRESETS = tuple(PRESET_ARGS)

# Stage 1/2 runs (spec §7.1, §3.5, §5.2); `init` of each run (its config.model.init) in the docstring.
STAGE12_RUNS = {
    # Wan-AI/Wan2.1-T2V-14B-Diffusers/transformer (spec §2): the history patchers are derived from its
    # patch_embedding (docs/training.md, "Starting from Wan2.1")
    "stage_1_init": dict(stage="stage1", lr=5e-5, schedule="constant", warmup_steps=0, seed=43, lora_rank=128,
                         patch_embedding="lora", history_patches="full", sample_ratios=(), batch_size=2),
    # Helios-Base/transformer_init
    "stage_1_post": dict(stage="stage1", lr=3e-5, schedule="constant", warmup_steps=0, seed=44, lora_rank=128,
                         patch_embedding="lora", history_patches="full", sample_ratios=(), batch_size=2),
    # Helios-Base/transformer
    "stage_2_init": dict(stage="stage2", lr=1e-4, schedule="constant_with_warmup", warmup_steps=1000, seed=45,
                         lora_rank=256, patch_embedding="frozen", history_patches="frozen",
                         sample_ratios=(1, 2, 1), batch_size=1),
    # Helios-Mid/transformer_init
    "stage_2_post": dict(stage="stage2", lr=3e-5, schedule="constant_with_warmup", warmup_steps=500, seed=46,
                         lora_rank=256, patch_embedding="lora", history_patches="lora",
                         sample_ratios=(1, 1, 1), batch_size=1),
}
# Stage 3 runs -> stage3_config.stage3_config's kind: 3a from Helios-Mid/transformer on prepare-ode
# data; 3b's generator from Helios-Distilled/transformer_ode, score/critic from Helios-Base/transformer.
STAGE3_RUNS = {"stage_3_ode": "ode", "stage_3_post": "post", "stage_3_post_gan": "post_gan"}
RUNS = tuple(STAGE12_RUNS) + tuple(STAGE3_RUNS)


def parse_args(preset: str, arg: str | None) -> set[str]:
    """The set of `arg`'s comma-separated names, each one `preset` accepts."""
    if preset not in PRESET_ARGS:
        raise ValueError(f"no training preset {preset!r}; the presets are {', '.join(PRESETS)}")
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = args - set(PRESET_ARGS[preset])
    if unknown:
        raise ValueError(f"{preset}: unknown argument(s) {', '.join(sorted(unknown))}; "
                         f"use {' and/or '.join(PRESET_ARGS[preset])}")
    return args


def run_name(preset: str, arg: str | None = None) -> str:
    """The spec §7.1 run `preset:arg` stands for, e.g. run_name("stage1", "post,tiny") == "stage_1_post"."""
    args = parse_args(preset, arg)
    if preset == "stage3_ode":
        return "stage_3_ode"
    if preset == "stage3_dmd":
        return "stage_3_post_gan" if "gan" in args else "stage_3_post"
    return f"stage_{preset[-1]}_{'post' if 'post' in args else 'init'}"


def get_config(preset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of preset `preset` (stage1, stage2, stage3_ode, stage3_dmd) with its ARGS."""
    tiny = "tiny" in parse_args(preset, arg)
    run = run_name(preset, arg)
    if run in STAGE3_RUNS:
        return stage3_config(STAGE3_RUNS[run], tiny=tiny)
    return training_config(**STAGE12_RUNS[run], tiny=tiny)
