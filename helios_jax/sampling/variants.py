"""The three released Helios variants: what tells them apart in a checkpoint, and the sampling
settings their inference scripts use (spec sampler.md §0 and §9)."""
from __future__ import annotations

VARIANTS = ("base", "mid", "distilled")

# Each variant's scheduler/scheduler_config.json, as spec §0 infers it (the released files are
# not available to this project); used for the weights-free tiny-random model.
SCHEDULER_CONFIGS = {
    "base": dict(_class_name="HeliosScheduler", stages=1, scheduler_type="unipc", use_dynamic_shifting=True,
                 time_shift_type="exponential"),
    "mid": dict(_class_name="HeliosScheduler", stages=3, scheduler_type="unipc", use_dynamic_shifting=True,
                time_shift_type="exponential"),
    "distilled": dict(_class_name="HeliosDMDScheduler", stages=3, use_dynamic_shifting=True,
                      time_shift_type="linear"),
}

# model_index.json flags of each variant.
PIPELINE_FLAGS = {
    "base": dict(is_cfg_zero_star=False, is_distilled=False),
    "mid": dict(is_cfg_zero_star=True, is_distilled=False),
    "distilled": dict(is_cfg_zero_star=False, is_distilled=True),
}

# scripts/inference/*.sh settings (num_frames is what the scripts ask for; it is rounded up to
# whole 33-frame chunks).
DEFAULTS = {
    "base": dict(num_frames=99, num_inference_steps=50, guidance_scale=5.0, pyramid_num_inference_steps_list=None,
                 is_amplify_first_chunk=False, use_zero_init=False, zero_steps=1),
    "mid": dict(num_frames=99, num_inference_steps=None, guidance_scale=5.0,
                pyramid_num_inference_steps_list=(20, 20, 20), is_amplify_first_chunk=False, use_zero_init=True,
                zero_steps=1),
    "distilled": dict(num_frames=240, num_inference_steps=None, guidance_scale=1.0,
                      pyramid_num_inference_steps_list=(2, 2, 2), is_amplify_first_chunk=True, use_zero_init=False,
                      zero_steps=1),
}


def variant_of(stages: int, is_cfg_zero_star: bool, is_distilled: bool) -> str:
    """Base samples in one stage; the pyramid variants differ by their pipeline flags."""
    if stages == 1:
        return "base"
    return "distilled" if is_distilled else "mid"


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}; got {name!r}")
    return name
