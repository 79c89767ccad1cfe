"""Media I/O: the frame arithmetic of spec 2.1, the uint8 export mapping, the streaming mp4 writer, and
image/video preprocessing against diffusers' VideoProcessor and load_video."""
import imageio_ffmpeg
import numpy as np
import PIL.Image
import pytest

from helios_jax.media import Mp4Writer, chunk_count, load_image, load_video, to_uint8, trim_frame_count

CAR = "/work/shared/data/car.mp4"


@pytest.mark.parametrize("requested, chunks, returned", [
    (33, 1, 33), (99, 3, 97), (132, 4, 129), (231, 7, 229), (240, 8, 261), (1452, 44, 1449), (1, 1, 33), (0, 1, 33),
])
def test_chunk_and_frame_counts_follow_the_spec_table(requested, chunks, returned):
    assert chunk_count(requested) == chunks
    assert trim_frame_count(33 * chunks) == returned


def test_to_uint8_truncates_like_export_to_video():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.3, 1.3, (1, 3, 5, 4, 6)).astype(np.float32)
    x[0, 0, 0, 0, :3] = [-1.0, 1.0, 0.999]
    expected = ((np.clip(x[0] / 2 + 0.5, 0, 1)).transpose(1, 2, 3, 0) * 255).astype(np.uint8)  # diffusers' order
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 6, 3)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(to_uint8(x[0]), out)
    assert out[0, 0, :3, 0].tolist() == [0, 255, 254]  # truncation, not rounding
    with pytest.raises(ValueError, match="batch of 2"):
        to_uint8(np.zeros((2, 3, 1, 4, 4), np.float32))


def read_back(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return meta, sum(1 for _ in reader)


def test_writer_streams_appends_and_renames_on_close(tmp_path):
    path = tmp_path / "out.mp4"
    frames = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    with Mp4Writer(path, fps=24) as writer:
        writer.append(frames)
        assert not path.exists()  # only the temporary file exists while encoding
        writer.append(frames[::-1])
    assert writer.frames_written == 18
    meta, count = read_back(path)
    assert count == 18 and meta["size"] == (64, 64) and meta["fps"] == 24
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_writer_leaves_nothing_after_an_exception(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path) as writer:
            writer.append(np.zeros((3, 32, 32, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        Mp4Writer(tmp_path / "missing" / "out.mp4")
    with pytest.raises(ValueError, match="uint8"):
        with Mp4Writer(tmp_path / "out.mp4") as writer:
            writer.append(np.zeros((3, 32, 32, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def video_processor():
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=8)  # as HeliosPipeline builds it


def test_image_matches_video_processor():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    processor = video_processor()
    # The pipeline's own resize (lanczos) ...
    expected = processor.preprocess(image, height=24, width=40).numpy()
    np.testing.assert_array_equal(load_image(image, 24, 40, resample="lanczos"), expected)
    # ... and infer_helios.py's PIL-default resize first, after which the pipeline's resize is a no-op.
    expected = processor.preprocess(image.resize((40, 24)), height=24, width=40).numpy()
    actual = load_image(image, 24, 40)
    assert actual.shape == (1, 3, 24, 40) and actual.dtype == np.float32
    np.testing.assert_array_equal(actual, expected)


def test_video_matches_diffusers_load_video_and_preprocess():
    from diffusers.utils import load_video as diffusers_load_video

    frames = diffusers_load_video(CAR)
    actual = load_video(CAR, 48, 80)  # decoded by us, resized with lanczos frame by frame
    assert actual.shape == (1, 3, len(frames), 48, 80) and actual.dtype == np.float32
    # Every 10th frame is enough to show the same decode and the same resize as diffusers.
    expected = video_processor().preprocess_video(frames[::10], height=48, width=80).numpy()
    np.testing.assert_array_equal(actual[:, :, ::10], expected)
    np.testing.assert_array_equal(load_video(frames[:3], 48, 80), actual[:, :, :3])  # PIL frames in


def test_readers_name_the_bad_input(tmp_path):
    with pytest.raises(OSError, match="missing.mp4: no such video file"):
        load_video(tmp_path / "missing.mp4", 64, 64)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(OSError, match="garbage.mp4: cannot read as a video"):
        load_video(garbage, 64, 64)
    with pytest.raises(OSError, match="garbage.mp4: cannot read as an image"):
        load_image(garbage, 64, 64)
    with pytest.raises(ValueError, match="height=30"):
        load_image(np.zeros((8, 8, 3), np.uint8), 30, 64)
