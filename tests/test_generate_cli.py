"""`helios-jax generate` as a user runs it: a real mp4 from tiny random components, and one-line
errors for bad arguments before anything is built."""
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image


def run(*args):
    return subprocess.run([sys.executable, "-m", "helios_jax", "generate", *args], capture_output=True, text=True,
                          timeout=600)


def frame_count(path) -> int:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    count = sum(1 for _ in reader)
    assert tuple(meta["size"]) == (64, 64)
    return count


def test_image_to_video_writes_an_mp4_chunk_by_chunk(tmp_path):
    image = tmp_path / "still.png"
    Image.fromarray((np.random.RandomState(0).rand(80, 96, 3) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "video.mp4"
    result = run("--model", "tiny-random", "--prompt", "a red car", "--image", str(image), "--num-frames", "40",
                 "--pyramid-steps", "1,1,1", "--no-amplify-first-chunk", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "num_frames 40 -> 2 chunk(s) of 33 frames -> 65 frames" in result.stdout
    assert "chunk 1/2" in result.stdout and "chunk 2/2" in result.stdout and "ETA" in result.stdout
    assert frame_count(out) == 65
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


@pytest.mark.parametrize("args,culprit", [
    (("--height", "100"), "--height"),
    (("--num-frames", "0"), "--num-frames"),
    (("--image", "absent.png"), "absent.png"),
    (("--variant", "large"), "--variant"),
    (("--model", "no-such-folder"), "no-such-folder"),
    (("--pyramid-steps", "2,x"), "--pyramid-steps"),
    (("--transformer", "no-such-transformer"), "--transformer"),
    (("--height", "96"), "multiples of 64"),  # a pyramid variant needs multiples of 64
])
def test_bad_arguments_exit_non_zero_with_one_line(tmp_path, args, culprit):
    out = tmp_path / "out.mp4"
    defaults = {"--model": "tiny-random", "--prompt": "a car", "--out": str(out)}
    given = dict(zip(args[::2], args[1::2]))
    result = run(*[x for item in {**defaults, **given}.items() for x in item])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr
    assert not out.exists()


def test_unreadable_prompts_csv_is_named(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("name,text\nx,y\n")
    result = run("--model", "tiny-random", "--prompts-csv", str(csv), "--out", str(tmp_path / "o.mp4"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "prompts.csv" in lines[0], result.stderr
