"""The training negative prompt (reference helios/utils/train_config.py, also the default of
tools/offload_data/get_ode-pairs.py): the unconditional text of every guided teacher in Stage 3,
prepare-ode's CFG and Stage 3b's real score. A module of its own: the CLI reads it without jax."""

TRAINING_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")
