"""`helios-jax generate --model tiny-random` on 8 CPU devices with several --mesh values, run as a
script by tests/test_generate_mesh.py (the device count must be set before jax starts).

argv: an output folder. Each run's frames (as written to the mp4) are compared with the run on a
single device; prints one `ok MESH max_diff=D chose=...` line per mesh.
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from helios_jax import cli  # noqa: E402
from helios_jax.media import video_writer  # noqa: E402

MESHES = ("auto", "fsdp=8", "tensor=4,fsdp=2")


def generate(out_dir: str, mesh: str, devices=None) -> tuple[np.ndarray, str]:
    """The frames one `helios-jax generate` run appends to its mp4, and its placement log line."""
    frames, lines = [], []
    append = video_writer.Mp4Writer.append
    video_writer.Mp4Writer.append = lambda self, chunk: (frames.append(np.asarray(chunk)), append(self, chunk))[1]
    original_log = cli.distributed.log
    try:
        import helios_jax.commands.generate as generate_command

        generate_command.log = lambda message: (lines.append(message), original_log(message))
        args = ["generate", "--model", "tiny-random", "--prompt", "a red car on a coastal road", "--num-frames", "66",
                "--pyramid-steps", "1,1,1", "--no-amplify-first-chunk", "--out", os.path.join(out_dir, f"{mesh.replace(',', '_')}.mp4"),
                "--mesh", mesh]
        code = cli.main(args)
        assert code == 0, (mesh, code)
    finally:
        video_writer.Mp4Writer.append = append
        generate_command.log = original_log
    placement = next(line for line in lines if line.startswith("devices:"))
    return np.concatenate(frames, axis=0), placement


def single_device_frames() -> np.ndarray:
    """What `generate` computes on one device: the same pipeline and arguments, no mesh."""
    from helios_jax.sampling.pipeline import HeliosPipeline

    pipe = HeliosPipeline.tiny_random("distilled", seed=42)
    assert pipe.mesh is None
    return pipe("a red car on a coastal road", num_frames=66, pyramid_num_inference_steps_list=(1, 1, 1), seed=42,
                is_amplify_first_chunk=False,
                height=64, width=64)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    out_dir = sys.argv[1]
    single = single_device_frames()
    for mesh in MESHES:
        frames, placement = generate(out_dir, mesh)
        assert frames.shape == single.shape, (mesh, frames.shape, single.shape)
        diff = int(np.abs(frames.astype(int) - single.astype(int)).max())
        assert diff <= 2, (mesh, diff)
        assert "mesh " in placement and "of 8 x" in placement, placement
        print(f"ok {mesh} max_diff={diff} {placement}", flush=True)
    print("all ok")
