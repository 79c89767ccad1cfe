"""`helios-jax prepare-data`: videos + captions (toy_filter.json format) -> a latent dataset for training.

Per clip (spec training.md 8.1-8.2): a window of the clip's length bucket inside its cut, cropped and
resized to --height x --width, cut into 33-frame chunks that are VAE-encoded one by one (posterior
sample, normalized), plus the caption's UMT5 embedding. Written as ArrayRecord shards through TFDS;
on any error nothing is left at --out.
"""
from __future__ import annotations

from pathlib import Path

from helios_jax.data.negative_prompt import TRAINING_NEGATIVE_PROMPT

SPATIAL_MULTIPLE = 16  # 8x VAE downsampling, then the transformer's 2x2 patches


def add_command(commands) -> None:
    prepare = commands.add_parser(
        "prepare-data", help="encode videos + captions into a latent dataset for training",
        description="Read the clips listed in a toy_filter.json-format file, encode each 33-frame chunk with "
        "the VAE and each caption with the text encoder, and write ArrayRecord shards to --out (a new folder). "
        "--videos FILE.json takes the clips' paths relative to the file's folder; --videos DIR --metadata FILE.json "
        "relative to DIR.")
    prepare.add_argument("--videos", required=True, help="the clips' JSON list (path, cut, crop, fps, num_frames, "
                         "resolution, cap), or the folder their paths are relative to (then give --metadata)")
    prepare.add_argument("--metadata", help="the clips' JSON list when --videos is a folder")
    prepare.add_argument("--model", required=True, help="Helios model folder (vae/, text_encoder/, tokenizer/) or 'tiny-random'")
    prepare.add_argument("--out", required=True, help="dataset folder to create (must not exist)")
    prepare.add_argument("--height", type=int, default=384, help="pixel height of the stored clips")
    prepare.add_argument("--width", type=int, default=640, help="pixel width of the stored clips")
    prepare.add_argument("--min-frames", type=int, default=121, help="clips whose cut is shorter are skipped")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the window draws and the posterior samples")
    prepare.set_defaults(run=run)


def run(args, overrides) -> None:
    import warnings

    import numpy as np

    from helios_jax.data import clips as clips_lib
    from helios_jax.data.encoding import encode_caption, encode_chunks, load_components
    from helios_jax.data.metadata import read_clips
    from helios_jax.data.storage import NEGATIVE_PROMPT_EMBED, write_dataset
    from helios_jax.distributed import log

    if overrides:
        raise ValueError(f"{overrides[0]}: prepare-data takes no --config overrides")
    # Videos are decoded by an ffmpeg child process (fork + exec, safe with JAX's threads); JAX's
    # warning about os.fork would otherwise be printed once per video.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % SPATIAL_MULTIPLE:
            raise ValueError(f"{flag}={value}: must be a positive multiple of {SPATIAL_MULTIPLE}")
    if args.seed < 0:
        raise ValueError(f"--seed={args.seed}: must be >= 0")
    out, videos = Path(args.out), Path(args.videos)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (choose a new --out folder)")
    if videos.is_file() and args.metadata is None:  # --videos FILE.json: paths relative to its folder
        args.metadata, videos = str(videos), videos.parent
    if not videos.is_dir():
        raise FileNotFoundError(f"{videos}: no such videos folder or clips JSON file")
    if args.metadata is None:
        raise ValueError(f"--videos {videos} is a folder: give the clips' JSON list with --metadata")
    clips = read_clips(args.metadata)
    _check_unique_ids(args.metadata, clips)
    for clip in clips:  # a clip that cannot hold one chunk is bad input, not a filtered-out clip
        if clips_lib.chunks_in(clip) < 1:
            raise ValueError(f"{args.metadata}: {clip.path} cut {list(clip.cut)} has {clip.length} frames, "
                             f"too short for one {clips_lib.FRAMES_PER_CHUNK}-frame chunk")
    selected = [(index, clip) for index, clip in enumerate(clips) if clip.length >= args.min_frames]
    if not selected:
        raise ValueError(f"{args.metadata}: no clip has --min-frames={args.min_frames} frames or more")
    for _, clip in selected:
        clips_lib.probe(videos / clip.path)
    for clip in clips:
        if clip.length < args.min_frames:
            log(f"skip {clip.id}: {clip.length} frames < --min-frames={args.min_frames}")

    vae, text_encoder = load_components(args.model)

    def examples():
        for done, (index, clip) in enumerate(selected, 1):
            rng = np.random.default_rng([args.seed, index])
            pixels, start = clips_lib.clip_pixels(clip, videos, height=args.height, width=args.width, rng=rng)
            latents = encode_chunks(vae, pixels, seed=args.seed, clip_index=index)
            log(f"[{done}/{len(selected)}] {clip.id}: frames [{start}, {start + pixels.shape[0] * pixels.shape[2]})"
                f" -> {latents.shape[0]} chunks {tuple(latents.shape[1:])}")
            yield {"vae_latent": latents, "prompt_embed": encode_caption(text_encoder, clip.caption),
                   "caption": clip.caption, "id": clip.id}

    # The training negative prompt's embedding: Stage 3b's real score runs classifier-free guidance.
    negative = np.asarray(text_encoder.encode([TRAINING_NEGATIVE_PROMPT])[0], np.float32)
    write_dataset(out, examples(), extras={NEGATIVE_PROMPT_EMBED: negative})
    log(f"wrote {len(selected)} clips to {out}")


def _check_unique_ids(metadata, clips) -> None:
    seen = {}
    for index, clip in enumerate(clips):
        if clip.id in seen:
            raise ValueError(f"{metadata}: records {seen[clip.id]} and {index} are the same clip ({clip.id})")
        seen[clip.id] = index
