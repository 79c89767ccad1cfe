"""Pixels in and out: reading images and videos as the pipeline expects them, and writing mp4s."""
from helios_jax.media.frames import chunk_count, to_uint8, trim_frame_count
from helios_jax.media.readers import load_image, load_video
from helios_jax.media.video_writer import Mp4Writer

__all__ = ["Mp4Writer", "chunk_count", "load_image", "load_video", "to_uint8", "trim_frame_count"]
