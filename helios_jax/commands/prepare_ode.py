"""`helios-jax prepare-ode`: prompts -> the Stage-3a ODE-pair dataset (spec training.md §6.1, §8.2).

For each non-empty prompt line the Mid teacher rolls out --num-chunks chunks (T2V, pyramid UniPC
with --teacher-steps per stage, CFG --guidance-scale with the negative prompt, seed --seed) on
schedules that pass through the student's timesteps, and the states there are stored with the
prompt's embedding (training/stage3_ode_data.py has the record layout). On any error nothing is left at --out.
"""
from __future__ import annotations

from pathlib import Path

from helios_jax.data.negative_prompt import TRAINING_NEGATIVE_PROMPT

# 8x VAE, then the coarsest of the 3 pyramid stages (1/4 of the latent) must still patchify whole
# into 2x2 patches: the pipeline's own size rule (pipeline.check_size).
SPATIAL_MULTIPLE = 64
TINY_TEACHER_SEED = 0  # the tiny-random teacher = the tiny-random transformer a `:tiny` run with seed 0 builds


def add_command(commands) -> None:
    prepare = commands.add_parser(
        "prepare-ode", help="roll out the Mid teacher on prompts into an ODE-pair dataset (Stage 3a)",
        description="For each non-empty line of --prompts, sample --num-chunks chunks with the Mid teacher "
        "(pyramid UniPC, --teacher-steps per stage with the student's timesteps merged in, CFG) and store the "
        "teacher's states at the student's timesteps, each stage's end state and the prompt embedding as "
        "ArrayRecord shards in --out (a new folder), for `helios-jax train --config configs/train/stage3_ode.py`.")
    prepare.add_argument("--prompts", required=True, help="text file, one prompt per line (empty lines skipped)")
    prepare.add_argument("--model", required=True,
                         help="Helios-Mid model folder (transformer/, text_encoder/, tokenizer/) or 'tiny-random'")
    prepare.add_argument("--out", required=True, help="dataset folder to create (must not exist)")
    prepare.add_argument("--num-chunks", type=int, default=5, help="chunks (33 frames each) per prompt")
    prepare.add_argument("--height", type=int, default=384, help="pixel height (a multiple of 64)")
    prepare.add_argument("--width", type=int, default=640, help="pixel width (a multiple of 64)")
    prepare.add_argument("--teacher-steps", type=int, default=20, help="teacher UniPC steps per pyramid stage")
    prepare.add_argument("--guidance-scale", type=float, default=5.0, help="the teacher's CFG scale")
    prepare.add_argument("--seed", type=int, default=42, help="seed of the teacher's noise (the same for every prompt)")
    prepare.add_argument("--negative-prompt", default=TRAINING_NEGATIVE_PROMPT,
                         help="negative prompt of the teacher's CFG (default: the reference's)")
    prepare.set_defaults(run=run)


def run(args, overrides) -> None:
    import numpy as np

    from helios_jax.distributed import log
    from helios_jax.training.stage3_ode_data import record_arrays, write_ode_dataset
    from helios_jax.training.stage3_ode_teacher import TeacherRollout

    if overrides:
        raise ValueError(f"{overrides[0]}: prepare-ode takes no --config overrides")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % SPATIAL_MULTIPLE:
            raise ValueError(f"{flag}={value}: must be a positive multiple of {SPATIAL_MULTIPLE}")
    for flag, value in (("--num-chunks", args.num_chunks), ("--teacher-steps", args.teacher_steps)):
        if value < 1:
            raise ValueError(f"{flag}={value}: must be >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed={args.seed}: must be >= 0")
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (choose a new --out folder)")
    prompts = read_prompts(args.prompts)
    transformer, text_encoder = load_teacher(args.model)

    stem = Path(args.prompts).stem
    rollout = TeacherRollout(transformer, latent_height=args.height // 8, latent_width=args.width // 8,
                             teacher_steps=args.teacher_steps, guidance_scale=args.guidance_scale)
    negative = text_encoder.encode_negative(args.negative_prompt, 1) if args.guidance_scale > 1 else None

    def examples():
        for done, (line, prompt) in enumerate(prompts, 1):
            embeds = text_encoder.encode([prompt])
            record = record_arrays(rollout(embeds, negative, num_chunks=args.num_chunks, seed=args.seed))
            if not all(np.isfinite(v).all() for v in record.values()):
                raise FloatingPointError(f"{args.prompts}:{line + 1}: the teacher's trajectory has non-finite values")
            log(f"[{done}/{len(prompts)}] {stem}_{line:05d}: {args.num_chunks} chunks x 3 stages "
                f"{prompt[:60]!r}")
            yield {**record, "prompt_embed": np.asarray(embeds[0], np.float32), "caption": prompt,
                   "id": f"{stem}_{line:05d}"}

    write_ode_dataset(out, examples())
    log(f"wrote {len(prompts)} prompts to {out}")


def read_prompts(path) -> list[tuple[int, str]]:
    """(line index, prompt) of each non-empty line of the prompts file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    lines = [(index, line.strip()) for index, line in enumerate(path.read_text().splitlines())]
    prompts = [(index, line) for index, line in lines if line]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (every line is empty)")
    return prompts


def load_teacher(model: str):
    """(transformer, text encoder) of a Helios-Mid folder, or the tiny random ones."""
    if model == "tiny-random":
        from flax import nnx

        from helios_jax.data.encoding import tiny_random_components
        from helios_jax.models.transformer import HeliosTransformer3DModel
        from helios_jax.models.transformer_config import preset

        _, text_encoder = tiny_random_components()
        return HeliosTransformer3DModel(preset("tiny-random"), rngs=nnx.Rngs(TINY_TEACHER_SEED)), text_encoder
    from helios_jax.loading import load
    from helios_jax.text.prompt_embeddings import TextEncoder

    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such model folder")
    for part in ("transformer", "text_encoder", "tokenizer"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"--model {folder}: no {part}/ folder (prepare-ode needs transformer/, "
                                    "text_encoder/, tokenizer/)")
    return load(folder / "transformer"), TextEncoder.from_pretrained(folder)
