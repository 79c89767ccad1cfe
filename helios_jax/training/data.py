"""The training loader: stored clips -> batches of spec training.md 3.1 steps 1-3, through grain.

Per sample: concatenate the clip's N chunks along time, left-pad 19 zero frames, draw a chunk c
uniformly with a generator seeded by (seed, epoch, record index), and cut
  history_latents = the 19 latent frames before chunk c (zeros before the video start),
  target_latents  = chunk c,
  x0_latents      = the first latent frame of chunk 0, or zeros when c == 0 (a pure T2V sample),
  prompt_embeds   = the stored caption embedding.
The random history drop, corruption, timesteps and noise happen inside the jitted train step.

Order: grain's IndexSampler shuffles by (seed, epoch) and shards records across hosts
(jax.process_index / process_count by default, equal shards so every host takes the same number of
steps); each host batches global_batch / process_count samples. The iterator is checkpointable:
`get_state()` / `set_state()`, and `save_args` / `restore_args` put it in an Orbax CheckpointManager
next to the model state (grain's own handler, one JSON file per process).
"""
from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from helios_jax.data.storage import LatentDataset

HISTORY_FRAMES = 19  # long 16 + mid 2 + short 1


def draw_chunk(seed: int, epoch: int, record_index: int, num_chunks: int) -> int:
    """The chunk a sample uses: uniform in [0, num_chunks), fixed by (seed, epoch, record index)."""
    return int(_sample_rng(seed, epoch, record_index).integers(num_chunks))


def _sample_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, record_index])


def build_sample(vae_latent: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    """vae_latent [N, z, 9, h, w] and a chunk index -> x0 [z,1,h,w], history [z,19,h,w], target [z,9,h,w]."""
    num_chunks, channels, frames, height, width = vae_latent.shape
    if not 0 <= chunk < num_chunks:
        raise ValueError(f"chunk {chunk} is outside the clip's {num_chunks} chunks")
    video = vae_latent.transpose(1, 0, 2, 3, 4).reshape(channels, num_chunks * frames, height, width)
    padded = np.concatenate([np.zeros((channels, HISTORY_FRAMES, height, width), video.dtype), video], axis=1)
    start = chunk * frames
    x0 = video[:, :1] if chunk > 0 else np.zeros((channels, 1, height, width), video.dtype)
    return {
        "x0_latents": np.array(x0, np.float32),
        "history_latents": np.array(padded[:, start : start + HISTORY_FRAMES], np.float32),
        "target_latents": np.array(padded[:, start + HISTORY_FRAMES : start + HISTORY_FRAMES + frames], np.float32),
    }


def shard_length(num_records: int, options: grain.sharding.ShardOptions) -> int:
    """Records in this host's shard, as grain splits them (the remainder goes to the first shards, or nowhere)."""
    per_shard, remainder = divmod(num_records, options.shard_count)
    if options.drop_remainder:
        return per_shard
    return per_shard + (options.shard_index < remainder)


class EpochSampler:
    """grain's IndexSampler (shuffle per (seed, epoch), shards), with each record's generator seeded by
    (seed, epoch, record index) instead of its position in the stream, as the reference loader does."""

    def __init__(self, num_records: int, shard_options: grain.sharding.ShardOptions, *, shuffle: bool,
                 num_epochs: int | None, seed: int):
        self._sampler = grain.samplers.IndexSampler(num_records, shard_options=shard_options, shuffle=shuffle,
                                                    num_epochs=num_epochs, seed=seed)
        self._shard_options = shard_options  # read by grain's DataLoader
        self._seed = seed
        self._records_per_shard = shard_length(num_records, shard_options)

    def __len__(self) -> int:
        return len(self._sampler)

    def __repr__(self) -> str:  # grain checks a restored state against the sampler's repr
        return f"EpochSampler({self._sampler!r})"

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        metadata = self._sampler[index]
        epoch = index // self._shard_options.shard_count // self._records_per_shard
        return grain.RecordMetadata(index=metadata.index, record_key=metadata.record_key,
                                    rng=_sample_rng(self._seed, epoch, metadata.record_key))


class _ChunkSample(grain.transforms.RandomMap):
    """A stored clip -> one training sample (the rng is the sampler's (seed, epoch, record) generator).
    `paired`: also a second, independently drawn chunk of the same clip under keys ending in `_2`
    (Stage 3b: sample A drives the generator, sample B the critic, spec §8.3)."""

    def __init__(self, paired: bool = False):
        self.paired = paired

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        chunks = record["vae_latent"].shape[0]
        sample = {**build_sample(record["vae_latent"], int(rng.integers(chunks))), "prompt_embeds": record["prompt_embed"]}
        if self.paired:
            second = build_sample(record["vae_latent"], int(rng.integers(chunks)))
            sample.update({f"{k}_2": v for k, v in second.items()}, prompt_embeds_2=record["prompt_embed"])
        return sample


def make_loader(path: str | Path, *, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                worker_count: int = 0, shard_options: grain.sharding.ShardOptions | None = None,
                paired: bool = False):
    """An iterator of batches {x0_latents [B,z,1,h,w], history_latents [B,z,19,h,w], target_latents
    [B,z,9,h,w], prompt_embeds [B,512,D]} (numpy float32), B = batch_size / number of shards.

    `paired` adds a second chunk of each clip (x0_latents_2, history_latents_2, target_latents_2,
    prompt_embeds_2) for Stage 3b. `batch_size` is global. `shard_options` defaults to one shard per
    JAX process (equal shards: a remainder of records is left out so every host takes the same
    number of steps). num_epochs=None
    repeats forever; a partial last batch is dropped. The iterator has get_state() / set_state().
    """
    return epoch_loader(LatentDataset(path), _ChunkSample(paired), batch_size=batch_size, seed=seed, shuffle=shuffle,
                        num_epochs=num_epochs, worker_count=worker_count, shard_options=shard_options, items="clips")


def epoch_loader(dataset, transform, *, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, worker_count: int = 0,
                 shard_options: grain.sharding.ShardOptions | None = None, items: str = "records"):
    """grain batches of `transform`ed records of `dataset` (a random-access source with `.path`):
    shuffled per (seed, epoch), sharded over hosts (equal shards), checkpointable. `items` names
    the records in errors."""
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    shards = shard_options.shard_count
    if batch_size < 1 or batch_size % shards:
        raise ValueError(f"batch_size={batch_size}: must be a positive multiple of the {shards} data shard(s) (hosts)")
    if shard_length(len(dataset), shard_options) < 1:
        raise ValueError(f"{dataset.path}: {len(dataset)} {items} cannot be split over {shards} hosts")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: must be in [0, 2**32)")
    if worker_count:
        _use_default_grain_flags()
    sampler = EpochSampler(len(dataset), shard_options, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    loader = grain.DataLoader(
        data_source=dataset,
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(batch_size // shards, drop_remainder=True)],
        worker_count=worker_count,
        shard_options=shard_options,
    )
    return iter(loader)


def _use_default_grain_flags() -> None:
    """grain's worker processes read absl flags, which only an absl app parses: take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def save_args(iterator):
    """Orbax args that save the loader state, e.g. ocp.args.Composite(state=..., data=save_args(it))."""
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator):
    """Orbax args that restore the state saved by `save_args` into `iterator` (built with the same arguments)."""
    return grain.checkpoint.CheckpointRestore(iterator)


CheckpointHandler = grain.checkpoint.CheckpointHandler  # the Orbax handler the args above are registered with
