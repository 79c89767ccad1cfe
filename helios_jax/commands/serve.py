"""`helios-jax serve`: the Gradio web demo (needs the `demo` extra: pip install 'helios-jax[demo]').

The model is loaded and compiled once at start-up; then the page streams each request's chunks as
they are decoded. Arguments are checked before anything is built."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from helios_jax.distributed import log
from helios_jax.commands.arguments import (add_device_arguments, check_device_arguments, device_options, steps_list,
                                          variant_list)


def add_command(commands) -> None:
    serve = commands.add_parser(
        "serve", help="web demo: watch the video grow chunk by chunk and steer it with new prompts",
        description="Start a Gradio web demo. The model is loaded and compiled once; each request's chunks "
        "appear in the page as they are decoded, and a new prompt typed while it runs steers the next chunks.")
    serve.add_argument("--model", required=True, help="model folder (diffusers format or converted) or 'tiny-random'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    serve.add_argument("--variant", type=variant_list, help="tiny-random: variants to offer, e.g. distilled,base "
                       "(default distilled); a model folder offers its own variant")
    serve.add_argument("--height", type=int, help="default height, compiled at start-up (384; tiny-random 64)")
    serve.add_argument("--width", type=int, help="default width, compiled at start-up (640; tiny-random 64)")
    serve.add_argument("--max-frames", type=int, default=1452, help="most frames one request may ask for "
                       "(default 1452: 44 chunks, about a minute at 24 fps)")
    serve.add_argument("--default-frames", type=int, help="the page's initial frame count (default: the variant's)")
    serve.add_argument("--steps", type=int, help="Base: denoising steps per chunk for every request (default 50)")
    serve.add_argument("--pyramid-steps", type=steps_list, help="Mid/Distilled: steps per pyramid stage, e.g. 2,2,2")
    serve.add_argument("--no-amplify-first-chunk", dest="amplify", action="store_false", default=None,
                       help="Distilled: no doubled steps on the first chunk")
    serve.add_argument("--transition-chunks", type=int, default=1, help="interactive mode: chunks over which a new "
                       "prompt blends in (1: the next chunk follows it fully)")
    serve.add_argument("--fps", type=int, default=24)
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), help="transformer and text encoder dtype")
    add_device_arguments(serve)
    serve.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                       help="skip compiling at start-up (the first request compiles instead)")
    serve.set_defaults(run=run_serve)


def check_arguments(args) -> None:
    if args.model != "tiny-random" and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder")
    if args.variant and args.model != "tiny-random" and len(args.variant) > 1:
        raise ValueError("--variant: a model folder holds one variant; give at most one")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be 0 to 65535; got {args.port}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value <= 0 or value % 16):
            raise ValueError(f"{flag} must be a positive multiple of 16; got {value}")
    for flag, value in (("--max-frames", args.max_frames), ("--transition-chunks", args.transition_chunks),
                        ("--fps", args.fps), ("--steps", args.steps), ("--default-frames", args.default_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive; got {value}")
    if args.default_frames and args.default_frames > args.max_frames:
        raise ValueError(f"--default-frames {args.default_frames} exceeds --max-frames {args.max_frames}")
    check_device_arguments(args)


@dataclass
class Server:
    url: str
    worker: object  # helios_jax.serve.worker.Worker
    app: object  # gradio.Blocks

    def close(self) -> None:
        self.app.close()
        self.app.request_folders.remove_all()  # every request's growing video goes with the server


def _load_pipelines(args, height: int, width: int) -> dict:
    from helios_jax.sampling.pipeline import HeliosPipeline

    placement = device_options(args, height, width, log)
    if args.model == "tiny-random":
        return {v: HeliosPipeline.tiny_random(v, **placement) for v in (args.variant or ("distilled",))}
    pipe = HeliosPipeline.from_pretrained(args.model, dtype=args.dtype, **placement)
    if args.variant and args.variant[0] != pipe.variant:
        raise ValueError(f"--variant {args.variant[0]}: the model folder {args.model} holds the {pipe.variant} variant")
    if pipe.text_encoder is None:
        raise ValueError(f"--model {args.model}: no text_encoder/ and tokenizer/ folders to encode prompts")
    return {pipe.variant: pipe}


def start_server(args) -> Server:
    """Loads and compiles the model, then serves the page in background threads; returns once it is up."""
    check_arguments(args)
    # Before gradio is imported: the demo never calls home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OSError("helios-jax serve needs gradio: pip install 'helios-jax[demo]'") from None
    from helios_jax.sampling.pipeline import check_size
    from helios_jax.serve.app import build_app
    from helios_jax.serve.validation import Limits
    from helios_jax.serve.worker import Worker

    tiny = args.model == "tiny-random"
    height, width = args.height or (64 if tiny else 384), args.width or (64 if tiny else 640)
    started = time.perf_counter()
    pipelines = _load_pipelines(args, height, width)
    stages = {v: p.scheduler.config.stages for v, p in pipelines.items()}
    for variant, count in stages.items():
        check_size(height, width, count)
    # Each variant takes its own kind of step count; refuse one that no loaded variant would use.
    if args.pyramid_steps and set(pipelines) == {"base"}:
        raise ValueError("--pyramid-steps applies to Mid and Distilled; Base takes --steps")
    if args.steps and "base" not in pipelines:
        raise ValueError("--steps applies to Base; Mid and Distilled take --pyramid-steps")
    sampling = dict(num_inference_steps=args.steps, pyramid_num_inference_steps_list=args.pyramid_steps,
                    is_amplify_first_chunk=args.amplify)
    worker = Worker(pipelines, height=height, width=width, sampling=sampling, fps=args.fps,
                    transition_chunks=args.transition_chunks)
    log(f"serve: loaded {', '.join(pipelines)} from {args.model} in {time.perf_counter() - started:.1f} s")
    if args.warm_up:
        worker.warm_up()
    first = next(iter(pipelines.values()))
    default_frames = args.default_frames or min(first.defaults()["num_frames"], args.max_frames)
    app = build_app(worker, Limits(tuple(pipelines), stages, args.max_frames), default_frames=default_frames)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=args.host, server_port=args.port or _free_port(args.host), prevent_thread_lock=True,
                           share=False, inbrowser=False, quiet=True, ssr_mode=False, footer_links=[],
                           show_error=True)
    log(f"serve: ready at {url}")
    return Server(url, worker, app)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def run_serve(args, overrides=()) -> None:
    if overrides:
        raise ValueError(f"{overrides[0]}: serve takes no --config overrides")
    server = start_server(args)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
