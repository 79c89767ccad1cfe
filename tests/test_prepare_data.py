"""`helios-jax prepare-data` on the real toy videos with tiny random components: what the shards hold
equals encoding the same frames directly, and bad input is one line, exit 2, nothing at --out."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax.cli import main
from helios_jax.data import clips as clips_lib
from helios_jax.data.encoding import chunk_key, tiny_random_components
from helios_jax.data.metadata import read_clips
from helios_jax.data.storage import LatentDataset, read_extra
from helios_jax.data.negative_prompt import TRAINING_NEGATIVE_PROMPT
from helios_jax.data.storage import NEGATIVE_PROMPT_EMBED

TOY = Path("/work/shared/data/toy_data")
METADATA = TOY / "toy_filter.json"
HEIGHT, WIDTH, SEED = 32, 48, 3


def prepare(out, *extra, metadata=METADATA, videos=TOY, model="tiny-random"):
    return main(["prepare-data", "--metadata", str(metadata), "--videos", str(videos), "--model", str(model),
                 "--out", str(out), "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", str(SEED), *extra])


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "toy"
    assert prepare(out, "--min-frames", "33") == 0
    return out


def test_default_min_frames_keeps_only_the_long_clip(tmp_path, capsys):
    # Only the 129-frame clip passes the reference's 121-frame filter; the 81-frame one is skipped.
    # Components are cached per process, so this costs one clip's encoding.
    assert prepare(tmp_path / "long") == 0
    dataset = LatentDataset(tmp_path / "long")
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["239_120_ori129_0-129"]
    assert "skip 2_240_ori81_0-81" in capsys.readouterr().out


def test_shards_hold_the_direct_encoding_of_each_clip(dataset_dir):
    files = sorted(p.name for p in dataset_dir.iterdir())
    assert files == ["dataset_info.json", "extras.safetensors", "features.json",
                     "helios_latents-train.array_record-00000-of-00001"]
    assert [p.name for p in dataset_dir.parent.iterdir()] == ["toy"]  # no partial folder left beside it
    dataset = LatentDataset(dataset_dir)
    stored = {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}
    clips = read_clips(METADATA)
    assert sorted(stored) == sorted(clip.id for clip in clips)
    vae, text_encoder = tiny_random_components()
    mean = np.asarray(vae.config.latents_mean, np.float32)[:, None, None, None]
    std = np.asarray(vae.config.latents_std, np.float32)[:, None, None, None]
    expected_chunks = {"2_240_ori81_0-81": 2, "239_120_ori129_0-129": 3}  # buckets 81 and 121 frames
    for index, clip in enumerate(clips):
        record = stored[clip.id]
        pixels, start = clips_lib.clip_pixels(clip, TOY, height=HEIGHT, width=WIDTH,
                                              rng=np.random.default_rng([SEED, index]))
        assert clip.cut[0] <= start and start + pixels.shape[0] * 33 <= clip.cut[1]
        assert pixels.shape == (expected_chunks[clip.id], 3, 33, HEIGHT, WIDTH)
        assert record["vae_latent"].shape == (expected_chunks[clip.id], 4, 9, HEIGHT // 8, WIDTH // 8)
        for c, chunk in enumerate(pixels):
            posterior = vae.encode_posterior(jnp.asarray(chunk[None]))
            noise = jax.random.normal(chunk_key(SEED, index, c), posterior.mean.shape)
            sample = np.asarray(posterior.mean + posterior.std * noise)[0]
            np.testing.assert_allclose(record["vae_latent"][c], (sample - mean) / std, rtol=1e-5, atol=1e-5)
            # A posterior sample, not the mean: the stored latents carry the drawn noise.
            assert np.abs(record["vae_latent"][c] - np.asarray(posterior.mean)[0]).max() > 1e-3
        embed = np.asarray(text_encoder.encode([clip.caption])[0], np.float32)
        assert record["prompt_embed"].shape == (512, embed.shape[-1])
        np.testing.assert_array_equal(record["prompt_embed"], embed)
        length = int(np.asarray(text_encoder.tokenize([clip.caption])[1]).sum())
        assert 1 < length < 512 and not record["prompt_embed"][length:].any() and record["prompt_embed"][length - 1].any()
        assert record["caption"] == clip.caption
    # The training negative prompt's embedding for Stage 3b's guided real score.
    negative = read_extra(dataset_dir, NEGATIVE_PROMPT_EMBED)
    np.testing.assert_array_equal(negative, np.asarray(text_encoder.encode([TRAINING_NEGATIVE_PROMPT])[0], np.float32))


def test_crop_box_then_center_crop_to_the_target_aspect():
    # Pixel value = column index; crop box x 20..100 (80 wide, 40 high) -> centered square = columns 40..80.
    frames = np.broadcast_to(np.arange(120, dtype=np.uint8)[None, None, :, None], (2, 50, 120, 3)).copy()
    pixels = clips_lib.crop_and_resize(frames, (20, 100, 5, 45), 16, 16)
    assert pixels.shape == (3, 2, 16, 16) and pixels.dtype == np.float32
    columns = (pixels[0, 0, 0] + 1) / 2 * 255
    assert 40 <= columns.min() < 43 and 77 < columns.max() <= 80 and np.all(np.diff(columns) > 0)
    with pytest.raises(ValueError, match=r"crop \[0, 130, 0, 40\] is outside the 120x50 frames"):
        clips_lib.crop_and_resize(frames, (0, 130, 0, 40), 16, 16)


def test_length_buckets_follow_the_reference():
    assert [clips_lib.length_bucket(n) for n in (20, 21, 40, 81, 129, 192, 193, 220, 221, 600)] == \
        [None, 21, 21, 81, 121, 181, 193, 193, 221, 501]


def _metadata(tmp_path, keep_first=False, **changes):
    """The toy metadata with the 129-frame clip's record changed; with keep_first the valid 81-frame
    clip comes before it, so the failure happens in the middle of writing."""
    records = json.loads(METADATA.read_text())[0 if keep_first else 1 :]
    records[-1].update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del records[-1][key]
    path = tmp_path / "clips.json"
    path.write_text(json.dumps(records))
    return path


def _videos_with_broken_file(tmp_path):
    videos = tmp_path / "videos_root"
    (videos / "videos").mkdir(parents=True)
    (videos / "videos" / "broken.mp4").write_bytes(b"this is not a video" * 100)
    return videos


@pytest.mark.parametrize("case", ["missing_field", "unreadable_video", "missing_video", "cut_too_short",
                                  "video_shorter_than_cut", "missing_metadata", "bad_height", "model_without_vae"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    metadata, videos, extra, culprit, model = None, TOY, [], None, "tiny-random"
    if case == "missing_field":
        metadata, culprit = _metadata(tmp_path, cut=None), "missing field(s) cut"
    elif case == "unreadable_video":
        metadata = _metadata(tmp_path, path="videos/broken.mp4")
        videos, culprit = _videos_with_broken_file(tmp_path), "broken.mp4: cannot read as a video"
    elif case == "missing_video":
        metadata, culprit = _metadata(tmp_path, path="videos/nowhere.mp4"), "nowhere.mp4: no such video file"
    elif case == "cut_too_short":
        metadata, culprit = _metadata(tmp_path, cut=[0, 30]), "too short for one 33-frame chunk"
    elif case == "video_shorter_than_cut":  # the metadata promises 300 frames, the file has 129
        metadata = _metadata(tmp_path, keep_first=True, cut=[0, 300])
        culprit = "239_120_ori129.mp4: has 129 frames"
        extra = ["--min-frames", "33"]
    elif case == "missing_metadata":
        metadata, culprit = tmp_path / "nothing.json", "nothing.json: no such metadata file"
    elif case == "bad_height":
        metadata, culprit, extra = METADATA, "--height=40", ["--height", "40"]
    elif case == "model_without_vae":  # a model folder must hold vae/, text_encoder/ and tokenizer/
        model = tmp_path / "model"
        (model / "text_encoder").mkdir(parents=True)
        metadata, culprit = METADATA, f"{model}: no vae/ folder"
    capsys.readouterr()
    assert prepare(out, *extra, metadata=metadata, videos=videos, model=model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("helios-jax prepare-data: error:") and culprit in err[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder either


def test_existing_out_folder_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert prepare(tmp_path / "out") == 2
    assert "already exists" in capsys.readouterr().err
