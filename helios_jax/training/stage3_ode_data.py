"""Stage 3a ODE-pair data (spec training.md §6.1, §8.2): one record per prompt, written by
`helios-jax prepare-ode`, read by the Stage-3a loader.

Record (N chunks, stage i at latent h_i x w_i, K_max = 4 student steps):
  stage{i}_states     float32 [N, K_max + 1, C, 9, h_i, w_i]  x(t_j) for j < num_steps[k], zeros after,
                                                            and the stage's end state at index K_max
  stage{i}_timesteps  float32 [N, K_max]                    t_j, zeros after num_steps[k]
  num_steps           int32   [N]                           4 for the amplified chunk 0, 2 otherwise
  prompt_embed        float32 [L, D]                        the prompt's text embedding
  caption, id         str                                   the prompt line and "{file stem}_{line:05d}"
The loader yields batches of these arrays (caption and id dropped, prompt_embed -> prompt_embeds).
"""
from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from helios_jax.data.storage import TEXT, RecordDataset, write_records
from helios_jax.training.data import epoch_loader
from helios_jax.training.stage3_ode_teacher import MAX_STUDENT_STEPS, NUM_STAGES, StageTrajectory

DATASET_NAME = "helios_ode_pairs"
END = MAX_STUDENT_STEPS  # index of the stage end state in stage{i}_states


class OdeDataset(RecordDataset):
    name = DATASET_NAME
    writer = "helios-jax prepare-ode"


def record_arrays(trajectories: list[list[StageTrajectory]]) -> dict[str, np.ndarray]:
    """A TeacherRollout result for one prompt (batch 1) -> the record's fixed-shape arrays."""
    out = {"num_steps": np.asarray([len(chunk[0].timesteps) for chunk in trajectories], np.int32)}
    for i in range(NUM_STAGES):
        stage = [chunk[i] for chunk in trajectories]
        _, batch, *shape = stage[0].states.shape
        if batch != 1:
            raise ValueError(f"ODE records hold one prompt each; got a batch of {batch}")
        states = np.zeros((len(stage), MAX_STUDENT_STEPS + 1, *shape), np.float32)
        timesteps = np.zeros((len(stage), MAX_STUDENT_STEPS), np.float32)
        for k, trajectory in enumerate(stage):
            steps = len(trajectory.timesteps)
            states[k, :steps] = trajectory.states[:steps, 0]
            states[k, END] = trajectory.states[-1, 0]
            timesteps[k, :steps] = trajectory.timesteps
        out[f"stage{i}_states"], out[f"stage{i}_timesteps"] = states, timesteps
    return out


def features_of(example: dict) -> dict:
    """The storage feature specs of records shaped like `example` (record_arrays + prompt_embed)."""
    specs = {key: (value.shape, value.dtype) for key, value in example.items() if isinstance(value, np.ndarray)}
    return {**specs, "caption": TEXT, "id": TEXT}


def write_ode_dataset(out: str | Path, examples) -> Path:
    """Write ODE records (dicts of record_arrays + prompt_embed + caption + id), all or nothing."""
    examples = iter(examples)
    first = next(examples, None)
    if first is None:
        raise ValueError(f"{out}: no prompts to write")

    def chained():
        yield first
        yield from examples

    return write_records(out, chained(), features_of(first), name=DATASET_NAME)


class _TrainingArrays(grain.transforms.Map):
    """A stored record -> what the loss reads: the arrays, prompt_embed renamed prompt_embeds."""

    def map(self, record: dict) -> dict:
        out = {k: v for k, v in record.items() if isinstance(v, np.ndarray) and k != "prompt_embed"}
        out["prompt_embeds"] = np.asarray(record["prompt_embed"], np.float32)
        return out


def make_ode_loader(path: str | Path, *, batch_size: int, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, worker_count: int = 0,
                    shard_options: grain.sharding.ShardOptions | None = None):
    """An iterator of batches of ODE records ([B, ...] arrays, B = batch_size / number of shards;
    the spec trains with 1), shuffled per (seed, epoch) and sharded over hosts like training/data.py's
    loader; it has get_state() / set_state()."""
    return epoch_loader(OdeDataset(path), _TrainingArrays(), batch_size=batch_size, seed=seed, shuffle=shuffle,
                        num_epochs=num_epochs, worker_count=worker_count, shard_options=shard_options, items="prompts")


def synthetic_ode_records(model_config, *, count: int = 4, num_chunks: int = 3, latent_hw=(16, 16),
                          text_tokens: int = 8, seed: int = 0) -> list[dict]:
    """`count` random records in the loader's layout for `data_dir = "synthetic"` (trying the
    Stage-3a loop without a teacher run): smooth random end states, states = a noisy mix of them
    at each stored timestep. Not a teacher's trajectory; enough for the loss to have something to fit."""
    from helios_jax.training import stage3_distill_schedules as distill_schedules
    from helios_jax.training import stage3_ode_schedules as ode_schedules
    from helios_jax.training.stage3_ode_teacher import stage_sizes

    rng = np.random.default_rng(seed)
    channels = model_config.in_channels
    sizes = stage_sizes(*latent_hw)
    records = []
    for _ in range(count):
        record = {"num_steps": np.asarray([MAX_STUDENT_STEPS] + [MAX_STUDENT_STEPS // 2] * (num_chunks - 1), np.int32),
                  "prompt_embeds": rng.standard_normal((text_tokens, model_config.text_dim)).astype(np.float32)}
        for i, (h, w) in enumerate(sizes):
            states = np.zeros((num_chunks, MAX_STUDENT_STEPS + 1, channels, 9, h, w), np.float32)
            timesteps = np.zeros((num_chunks, MAX_STUDENT_STEPS), np.float32)
            for k in range(num_chunks):
                coarse = rng.standard_normal((channels, 9, 2, 2)).astype(np.float32)
                end = np.repeat(np.repeat(coarse, h // 2, axis=2), w // 2, axis=3)
                steps = int(record["num_steps"][k])
                t = ode_schedules.student_ode_timesteps(i, h, w, teacher_steps=2, amplified=k == 0)
                table_t, table_sigma = distill_schedules.stage_sigma_table(i, h, w)
                for j in range(steps):
                    sigma = table_sigma[np.argmin(np.abs(table_t - t[j]))]
                    states[k, j] = (1 - sigma) * end + sigma * rng.standard_normal(end.shape)
                states[k, END], timesteps[k, :steps] = end, t
            record[f"stage{i}_states"], record[f"stage{i}_timesteps"] = states, timesteps
        records.append(record)
    return records


def synthetic_ode_iterator(model_config, *, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1):
    """Endless shuffled batches of `synthetic_ode_records` (a grain DatasetIterator with get_state / set_state)."""
    dataset = (grain.MapDataset.source(synthetic_ode_records(model_config, seed=seed))
               .shuffle(seed=seed)
               .repeat()
               [shard_index::shard_count]
               .batch(batch_size, drop_remainder=True))
    return iter(dataset.to_iter_dataset())
