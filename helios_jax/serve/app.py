"""The page: request fields, the video as it grows, progress, the finished mp4, and the interactive
prompt box. Handlers turn every problem into a message in the page; the server keeps running."""
from __future__ import annotations

import tempfile
import threading
import traceback
from contextlib import closing
from pathlib import Path

import gradio as gr

from helios_jax.distributed import log
from helios_jax.serve.growing_video import RequestFolders
from helios_jax.serve.live_prompt import LivePrompt
from helios_jax.serve.validation import InputError, Limits, validate_request
from helios_jax.serve.worker import Progress, Worker

INTRO = ("# Helios video generation\nEach 33-frame chunk appears as soon as it is decoded. While a video is being "
         "made, type a new prompt under **Change prompt**: the next chunk follows it.")


class Sessions:
    """The running request's live prompt of each browser session (the page's 'change prompt' posts to it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, LivePrompt] = {}

    def start(self, session: str, live: LivePrompt) -> None:
        with self._lock:
            self._running[session] = live

    def end(self, session: str, live: LivePrompt) -> None:
        with self._lock:
            if self._running.get(session) is live:
                del self._running[session]

    def get(self, session: str) -> LivePrompt | None:
        with self._lock:
            return self._running.get(session)


def status_line(progress: Progress) -> str:
    state = "done" if progress.finished else "generating"
    return (f"**{state}**: chunk {progress.chunks_done}/{progress.num_chunks}, {progress.frames_done} frames in "
            f"{progress.seconds:.1f} s ({progress.frames_per_second:.1f} frames/s); prompt: {progress.prompt}")


def build_app(worker: Worker, limits: Limits, *, default_frames: int, work_dir: str | Path | None = None) -> gr.Blocks:
    sessions = Sessions()
    folders = RequestFolders(work_dir or tempfile.mkdtemp(prefix="helios-serve-"), remove_work_dir=work_dir is None)
    # Served in place: gradio would otherwise copy every update of the growing video into its cache,
    # bytes growing with the square of the video's length. RequestFolders deletes them instead.
    gr.set_static_paths([folders.work_dir])

    def generate(prompt, negative_prompt, variant, frames, seed, height, width, image, video, request: gr.Request):
        try:
            job = validate_request(limits, prompt=prompt, negative_prompt=negative_prompt, variant=variant,
                                   num_frames=frames, seed=seed, height=height, width=width, image=image, video=video)
        except InputError as error:
            yield None, f"**Error**: {error}", None
            return
        session = request.session_hash or "anonymous"
        live = folder = None
        try:
            yield None, f"**waiting for the device**: {job.task}, {job.width}x{job.height}, {job.num_frames} frames", None
            live = worker.live_prompt(job)
            sessions.start(session, live)
            folder = folders.open(session)  # the session's previous video is no longer shown: it goes
            # closing: a stopped request's worker cleans its folder now, not when garbage collected.
            with closing(worker.generate(job, live, folder)) as updates:
                for progress in updates:
                    yield str(progress.video_so_far), status_line(progress), \
                        str(progress.finished) if progress.finished else gr.skip()
        except Exception as error:  # a failed request is reported; the server stays up for the next
            log(f"serve: request failed: {traceback.format_exc()}")
            yield gr.skip(), f"**Error**: generation failed: {error}", None
        finally:
            if live is not None:
                sessions.end(session, live)
            if folder is not None:
                folders.request_ended(folder)

    def end_session(request: gr.Request):
        folders.end_session(request.session_hash or "anonymous")

    def change_prompt(new_prompt, request: gr.Request):
        live = sessions.get(request.session_hash or "anonymous")
        if live is None:
            return "**Error**: no video is being generated; press Generate first"
        try:
            live.post(new_prompt or "")
        except ValueError as error:
            return f"**Error**: {error}"
        return f"**prompt changed**: the next chunk follows: {new_prompt.strip()}"

    with gr.Blocks(title="Helios", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt (used when guidance > 1)", elem_id="negative")
                with gr.Row():
                    variant = gr.Dropdown(list(limits.variants), value=limits.variants[0], label="Variant",
                                          elem_id="variant")
                    frames = gr.Number(default_frames, label=f"Frames (1 to {limits.max_frames})", elem_id="frames")
                    seed = gr.Number(42, label="Seed", elem_id="seed")
                with gr.Row():
                    height = gr.Number(worker.height, label="Height", elem_id="height")
                    width = gr.Number(worker.width, label="Width", elem_id="width")
                with gr.Row():
                    image = gr.File(label="Image (image-to-video, optional)", type="filepath", elem_id="image")
                    video = gr.File(label="Video (video-to-video, optional)", type="filepath", elem_id="video")
                with gr.Row():
                    start = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
                new_prompt = gr.Textbox(label="New prompt for the next chunks (interactive mode)", elem_id="new_prompt")
                change = gr.Button("Change prompt", elem_id="change_prompt")
            with gr.Column():
                growing = gr.Video(label="Video so far", autoplay=True, loop=True, interactive=False, height=360,
                                   elem_id="live_video")
                status = gr.Markdown("Ready.", elem_id="status")
                prompt_status = gr.Markdown("", elem_id="prompt_status")
                download = gr.File(label="Finished mp4", interactive=False, elem_id="download")
        # One request at a time on the device; the others wait in gradio's queue. "multiple": a click while a
        # stopped request's last chunk is still finishing is queued, not dropped.
        running = start.click(generate, [prompt, negative_prompt, variant, frames, seed, height, width, image, video],
                              [growing, status, download], concurrency_limit=1, concurrency_id="device",
                              trigger_mode="multiple")
        stop.click(lambda: "**stopped**", None, status, cancels=[running], queue=False)
        # Not queued: a new prompt must reach the running request, which holds the device queue.
        change.click(change_prompt, new_prompt, prompt_status, queue=False)
        app.unload(end_session)  # the tab is closed: its video is shown nowhere
    app.request_folders = folders  # for tests and for whoever wants to clean up before exit
    return app
