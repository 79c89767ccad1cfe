"""The grain training loader over a small stored dataset: determinism, per-epoch reshuffling, host
sharding, spec training.md 3.1 sample construction, exact resume (get/set_state and Orbax), and
one-line errors for broken datasets."""
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helios_jax.data.storage import LatentDataset, write_dataset
from helios_jax.training.data import build_sample, draw_chunk, make_loader, restore_args, save_args

CHUNKS = [1, 2, 3, 3, 2, 3]  # chunks per clip
Z, H, W, TEXT_DIM = 2, 2, 3, 4


def clip_latents(clip: int) -> np.ndarray:
    """Distinct values everywhere, so any slice identifies where it came from."""
    shape = (CHUNKS[clip], Z, 9, H, W)
    return (1000.0 * (clip + 1) + np.arange(np.prod(shape), dtype=np.float32)).reshape(shape)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    examples = ({"vae_latent": clip_latents(i), "prompt_embed": np.full((512, TEXT_DIM), i, np.float32),
                 "caption": f"clip {i}", "id": f"clip{i}"} for i in range(len(CHUNKS)))
    return write_dataset(tmp_path_factory.mktemp("latents") / "ds", examples)


@pytest.fixture(scope="module")
def record_index(dataset_dir):
    """clip number -> its index in the stored dataset (TFDS orders records by a hash of their key)."""
    dataset = LatentDataset(dataset_dir)
    return {int(dataset[i]["caption"].split()[1]): i for i in range(len(dataset))}


def clips_of(batch) -> list[int]:
    return [int(v) for v in batch["prompt_embeds"][:, 0, 0]]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def host(index, count=2):
    return grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)


def test_build_sample_slices_history_target_and_prefix():
    latents = clip_latents(2)  # 3 chunks, 27 latent frames
    video = np.concatenate(list(latents), axis=1)  # [Z, 27, H, W]
    for chunk in range(3):
        sample = build_sample(latents, chunk)
        np.testing.assert_array_equal(sample["target_latents"], latents[chunk])
        for slot in range(19):  # history slot j holds frame 9c - 19 + j, zero before the video start
            frame = 9 * chunk - 19 + slot
            expected = video[:, frame] if frame >= 0 else np.zeros((Z, H, W))
            np.testing.assert_array_equal(sample["history_latents"][:, slot], expected)
        expected_x0 = np.zeros((Z, 1, H, W)) if chunk == 0 else video[:, :1]
        np.testing.assert_array_equal(sample["x0_latents"], expected_x0)
    assert not build_sample(latents, 0)["history_latents"].any()
    history = build_sample(latents, 2)["history_latents"]  # frames -1 .. 17: one zero slot, then video
    assert not history[:, 0].any() and history[:, 1:].all()
    with pytest.raises(ValueError, match="chunk 3"):
        build_sample(latents, 3)


def test_batches_follow_the_spec_and_the_seeded_chunk_draw(dataset_dir, record_index):
    loader = make_loader(dataset_dir, batch_size=2, seed=7, num_epochs=2)
    batches = list(loader)
    assert len(batches) == 6  # 12 samples, 2 per batch
    shapes = {k: v.shape for k, v in batches[0].items()}
    assert shapes == {"x0_latents": (2, Z, 1, H, W), "history_latents": (2, Z, 19, H, W),
                      "target_latents": (2, Z, 9, H, W), "prompt_embeds": (2, 512, TEXT_DIM)}
    assert all(v.dtype == np.float32 for v in batches[0].values())
    drawn = []
    for position, (batch, row) in enumerate((b, r) for b in batches for r in range(2)):
        epoch, clip = position // 6, clips_of(batch)[row]
        chunk = draw_chunk(7, epoch, record_index[clip], CHUNKS[clip])
        expected = build_sample(clip_latents(clip), chunk)
        for key in expected:
            np.testing.assert_array_equal(batch[key][row], expected[key])
        assert batch["x0_latents"][row].any() == (chunk > 0)
        drawn.append(chunk)
    assert 0 in drawn and max(drawn) == 2  # both the T2V case and a late chunk occur


def test_same_seed_same_batches_and_epochs_reshuffle(dataset_dir):
    first = [clips_of(b) for b in take(make_loader(dataset_dir, batch_size=1, seed=3), 18)]
    again = [clips_of(b) for b in take(make_loader(dataset_dir, batch_size=1, seed=3), 18)]
    other = [clips_of(b) for b in take(make_loader(dataset_dir, batch_size=1, seed=4), 6)]
    assert first == again
    epochs = [sum(first[6 * e : 6 * e + 6], []) for e in range(3)]
    assert all(sorted(order) == list(range(6)) for order in epochs)  # every epoch sees every clip once
    assert len({tuple(order) for order in epochs}) == 3  # in a new order each epoch
    assert sum(other, []) != epochs[0]


def test_two_hosts_see_disjoint_halves_that_cover_the_data(dataset_dir):
    seen = [sum((clips_of(b) for b in make_loader(dataset_dir, batch_size=2, seed=5, num_epochs=1,
                                                   shard_options=host(i))), []) for i in range(2)]
    assert len(seen[0]) == len(seen[1]) == 3  # per-host batch 1 = global 2 / 2 hosts
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(6))


def test_state_restore_continues_exactly(dataset_dir, tmp_path):
    loader = make_loader(dataset_dir, batch_size=2, seed=9)
    take(loader, 4)  # into the second epoch
    state = loader.get_state()
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(4, args=ocp.args.Composite(data=save_args(loader)))
    manager.wait_until_finished()
    expected = take(loader, 5)

    resumed = make_loader(dataset_dir, batch_size=2, seed=9)
    resumed.set_state(state)
    restored = make_loader(dataset_dir, batch_size=2, seed=9)
    ocp.CheckpointManager(tmp_path / "ckpt").restore(4, args=ocp.args.Composite(data=restore_args(restored)))
    for iterator in (resumed, restored):
        for want, got in zip(expected, take(iterator, 5)):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_bad_batch_size_and_seed(dataset_dir):
    with pytest.raises(ValueError, match="batch_size=3"):
        make_loader(dataset_dir, batch_size=3, seed=0, shard_options=host(0))
    with pytest.raises(ValueError, match="seed=-1"):
        make_loader(dataset_dir, batch_size=1, seed=-1)


def test_missing_or_corrupt_dataset_names_the_file(dataset_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}: no such dataset folder"):
        make_loader(tmp_path / "nowhere", batch_size=1, seed=0)
    shard = "helios_latents-train.array_record-00000-of-00001"
    missing = tmp_path / "missing"
    shutil.copytree(dataset_dir, missing)
    (missing / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing / shard}: missing shard"):
        make_loader(missing, batch_size=1, seed=0)
    for name, damage in (("truncated", lambda data: data[: len(data) // 3]),
                         ("garbage", lambda data: bytes(len(data)))):
        broken = tmp_path / name
        shutil.copytree(dataset_dir, broken)
        (broken / shard).write_bytes(damage((broken / shard).read_bytes()))
        with pytest.raises(OSError, match=f"{broken / shard}: corrupt shard"):
            make_loader(broken, batch_size=1, seed=0)
    no_info = tmp_path / "no_info"
    shutil.copytree(dataset_dir, no_info)
    (no_info / "dataset_info.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_info.json: missing"):
        LatentDataset(no_info)
