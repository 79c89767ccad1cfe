"""`helios-jax generate`: text, image or video to an mp4, written chunk by chunk.

Every argument is checked before anything is built or compiled; each chunk is decoded and appended
to the mp4 as soon as it is done (the file appears at --out only once complete).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from helios_jax.commands.arguments import add_device_arguments, check_device_arguments, device_options, steps_list
from helios_jax.distributed import log
from helios_jax.sampling.variants import VARIANTS


def add_command(commands) -> None:
    generate = commands.add_parser(
        "generate", help="text/image/video to video (mp4), one 33-frame chunk at a time",
        description="Generate a video with Helios. Each chunk is decoded and appended to the mp4 as soon as it "
        "is denoised. --model tiny-random runs small random components without any weights.")
    generate.add_argument("--model", required=True, help="model folder (diffusers format or converted) or 'tiny-random'")
    generate.add_argument("--transformer", help="transformer folder to use instead of the model's (e.g. written by "
                          "`helios-jax merge-lora` from a training run)")
    generate.add_argument("--prompt", help="text prompt (not needed with --prompts-csv)")
    generate.add_argument("--out", required=True, help="output .mp4 path")
    generate.add_argument("--variant", choices=VARIANTS, help="base, mid or distilled (default: read from the model folder; "
                          "tiny-random: distilled)")
    generate.add_argument("--num-frames", type=int, help="frames wanted; rounded up to whole 33-frame chunks, then the "
                          "video is trimmed to 4m+1 frames (default: the variant's script setting)")
    generate.add_argument("--height", type=int, help="pixels, multiple of 16 (64 for Mid/Distilled); default 384 (tiny-random: 64)")
    generate.add_argument("--width", type=int, help="pixels, multiple of 16 (64 for Mid/Distilled); default 640 (tiny-random: 64)")
    generate.add_argument("--seed", type=int, default=42)
    generate.add_argument("--image", help="image file for image-to-video")
    generate.add_argument("--video", help="video file for video-to-video")
    generate.add_argument("--prompts-csv", help="interactive mode: CSV of id,prompt_index,prompt[,refined_prompt]; "
                          "the prompts of one id switch every --interpolate-time chunks")
    generate.add_argument("--prompts-id", help="which id of --prompts-csv to generate (default: the first)")
    generate.add_argument("--interpolate-time", type=int, default=7, help="chunks per prompt in interactive mode")
    generate.add_argument("--interpolation-steps", type=int, default=3, help="chunks blending one prompt into the next")
    generate.add_argument("--negative-prompt", help="negative prompt (used when guidance scale > 1)")
    generate.add_argument("--fps", type=int, default=24, help="frame rate of the mp4 (the reference always writes 24)")
    generate.add_argument("--guidance-scale", type=float, help="CFG scale (default: 5 for Base and Mid, 1 for Distilled)")
    generate.add_argument("--steps", type=int, help="Base: denoising steps per chunk (default 50)")
    generate.add_argument("--pyramid-steps", type=steps_list, help="Mid/Distilled: steps per pyramid stage, e.g. 2,2,2")
    amplify = generate.add_mutually_exclusive_group()
    amplify.add_argument("--amplify-first-chunk", dest="amplify", action="store_true", default=None,
                         help="Distilled: twice the steps on the first chunk (default on for Distilled)")
    amplify.add_argument("--no-amplify-first-chunk", dest="amplify", action="store_false")
    generate.add_argument("--dtype", choices=("float32", "bfloat16"), help="transformer and text encoder dtype")
    add_device_arguments(generate)
    generate.set_defaults(run=run_generate)


def check_arguments(args) -> None:
    """Reject bad arguments with one line naming the flag or file, before anything is built."""
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value <= 0 or value % 16):
            raise ValueError(f"{flag} must be a positive multiple of 16; got {value}")
    if args.num_frames is not None and args.num_frames < 1:
        raise ValueError(f"--num-frames must be positive; got {args.num_frames}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive; got {args.steps}")
    if args.fps < 1:
        raise ValueError(f"--fps must be positive; got {args.fps}")
    if args.image and args.video:
        raise ValueError("--image and --video cannot be given together")
    for flag, path in (("--image", args.image), ("--video", args.video), ("--prompts-csv", args.prompts_csv)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.model != "tiny-random" and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder")
    if args.transformer is not None and not (Path(args.transformer) / "config.json").is_file():
        raise FileNotFoundError(f"--transformer {args.transformer}: not a transformer folder (no config.json)")
    if (args.prompt is None) == (args.prompts_csv is None):
        raise ValueError("give exactly one of --prompt and --prompts-csv")
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {args.out}: the output must be an .mp4 file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: folder {out.parent} does not exist")
    check_device_arguments(args)


def _interactive_prompts(args) -> list[str]:
    from helios_jax.sampling.interactive import read_prompt_csv

    videos = read_prompt_csv(args.prompts_csv)
    if args.prompts_id is None:
        return videos[0][1]
    for video_id, prompts in videos:
        if str(video_id) == args.prompts_id:
            return prompts
    raise ValueError(f"--prompts-id {args.prompts_id}: not in {args.prompts_csv}")


def _scheduler_stages(args) -> int:
    """Read before any weights: the pyramid's stage count fixes which sizes are valid."""
    from helios_jax.sampling.schedule_tables import from_config_json, from_folder
    from helios_jax.sampling.variants import SCHEDULER_CONFIGS

    if args.model == "tiny-random":
        return from_config_json(SCHEDULER_CONFIGS[args.variant or "distilled"]).stages
    return from_folder(str(Path(args.model) / "scheduler")).stages


def _load_pipeline(args, height: int, width: int):
    from helios_jax.sampling.pipeline import HeliosPipeline

    placement = device_options(args, height, width, log)
    if args.model == "tiny-random":
        return HeliosPipeline.tiny_random(args.variant or "distilled", seed=args.seed, transformer=args.transformer,
                                          **placement)
    pipe = HeliosPipeline.from_pretrained(args.model, dtype=args.dtype, transformer=args.transformer, **placement)
    if args.variant and args.variant != pipe.variant:
        raise ValueError(f"--variant {args.variant}: the model folder {args.model} holds the {pipe.variant} variant")
    if pipe.text_encoder is None:
        raise ValueError(f"--model {args.model}: no text_encoder/ and tokenizer/ folders to encode the prompt")
    return pipe


def run_generate(args, overrides=()) -> None:
    if overrides:
        raise ValueError(f"{overrides[0]}: generate takes no --config overrides")
    check_arguments(args)
    prompts = _interactive_prompts(args) if args.prompts_csv else None
    if prompts is not None and args.interpolate_time <= args.interpolation_steps:
        raise ValueError(f"--interpolate-time must exceed --interpolation-steps ({args.interpolation_steps}); "
                         f"got {args.interpolate_time}")
    tiny = args.model == "tiny-random"
    height = args.height or (64 if tiny else 384)
    width = args.width or (64 if tiny else 640)

    from helios_jax.media.video_writer import Mp4Writer
    from helios_jax.sampling.pipeline import check_size

    check_size(height, width, _scheduler_stages(args))
    pipe = _load_pipeline(args, height, width)
    log(f"devices: {_describe_placement(pipe)}")
    if args.pyramid_steps and pipe.variant == "base":
        raise ValueError("--pyramid-steps applies to Mid and Distilled; Base takes --steps")
    if args.steps and pipe.variant != "base":
        raise ValueError("--steps applies to Base; Mid and Distilled take --pyramid-steps")
    num_frames = args.num_frames or pipe.defaults()["num_frames"]
    plan = pipe.frame_plan(num_frames)
    task = "image-to-video" if args.image else "video-to-video" if args.video else "text-to-video"
    log(f"{pipe.variant} {task}, {width}x{height}: num_frames {num_frames} -> {plan.num_chunks} chunk(s) of "
          f"{plan.frames_per_chunk} frames -> {plan.frames_returned} frames (4m+1) at {args.fps} fps")

    kwargs = dict(
        height=height, width=width, num_frames=num_frames, seed=args.seed, image=args.image, video=args.video,
        negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
        pyramid_num_inference_steps_list=args.pyramid_steps, is_amplify_first_chunk=args.amplify,
    )
    if prompts is not None:
        kwargs.update(prompt=prompts, use_interpolate_prompt=True,
                      interpolate_time_list=[args.interpolate_time] * len(prompts),
                      interpolation_steps=args.interpolation_steps)
    else:
        kwargs.update(prompt=args.prompt)

    started = time.perf_counter()
    frames_done = 0
    with Mp4Writer(args.out, fps=args.fps) as writer:
        for chunk in pipe.iter_chunks(**kwargs):
            writer.append(chunk.frames[0])
            frames_done += chunk.frames.shape[1]
            elapsed = time.perf_counter() - started
            left = chunk.num_chunks - chunk.index - 1
            eta = elapsed / (chunk.index + 1) * left
            log(f"chunk {chunk.index + 1}/{chunk.num_chunks}: {chunk.num_steps} steps in {chunk.seconds:.1f} s "
                  f"({chunk.num_steps / chunk.seconds:.2f} steps/s), {frames_done} frames, "
                  f"{frames_done / elapsed:.2f} frames/s, ETA {_clock(eta)}")
    total = time.perf_counter() - started
    log(f"wrote {args.out}: {frames_done} frames in {total:.1f} s ({frames_done / total:.2f} frames/s)")


def _describe_placement(pipe) -> str:
    import jax

    from helios_jax.parallel import describe_sizes

    mesh = "one device" if pipe.mesh is None else f"mesh {describe_sizes(dict(pipe.mesh.shape))}"
    return f"{mesh} of {jax.device_count()} x {jax.devices()[0].device_kind}, memory plan {pipe.memory_plan}"


def _clock(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

