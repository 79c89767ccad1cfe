"""Stored datasets: TFDS datasets (ArrayRecord shards of serialized tensors; no TensorFlow needed).

The latent dataset (`helios-jax prepare-data`, name "helios_latents") has one record per clip:
  vae_latent   float32 [N, z, 9, h, w]  N independently encoded 33-frame chunks, normalized latents
  prompt_embed float32 [512, text_dim]  UMT5 last hidden state, exact zeros after the true length
  caption      str
  id           str                      "{video stem}_{cut0}-{cut1}"
Other datasets (the Stage-3a ODE pairs, training/stage3_ode_data.py) name their own features with
`write_records` / `RecordDataset`: fixed-shape tensors (None for a dimension that varies) and text.

A dataset folder is the TFDS version folder itself (dataset_info.json, features.json and the
`*.array_record-*` shards), so it can be moved or copied as one directory.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

DATASET_NAME = "helios_latents"
VERSION = "1.0.0"


def _tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # prepare-data prints its own progress, one line per video
    return tfds


TEXT = "text"  # a feature spec: a str field; any other spec is (shape, numpy dtype) of a tensor
EXTRAS_FILE = "extras.safetensors"  # dataset-wide arrays, e.g. the negative prompt's embedding


def write_dataset(out: str | Path, examples: Iterable[dict], extras: dict[str, np.ndarray] | None = None) -> Path:
    """Write the latent dataset `examples` (dicts with the keys above) to the folder `out`, all or
    nothing. Shapes come from the first example; later ones must match except for N. `extras`:
    dataset-wide arrays stored beside the shards (read_extra)."""
    examples = iter(examples)
    first = next(examples, None)
    if first is None:
        raise ValueError(f"{out}: no examples to write")
    features = dict(vae_latent=((None, *first["vae_latent"].shape[1:]), np.float32),
                    prompt_embed=(first["prompt_embed"].shape, np.float32), caption=TEXT, id=TEXT)
    return write_records(out, itertools.chain([first], examples), features, name=DATASET_NAME, extras=extras)


def write_records(out: str | Path, examples: Iterable[dict], features: dict, *, name: str,
                  extras: dict[str, np.ndarray] | None = None) -> Path:
    """Write `examples` (dicts with the keys of `features`, and an "id" text field that keys them)
    as the TFDS dataset `name` to the folder `out`, all or nothing.

    The shards are written under a temporary folder beside `out` and renamed into place at the end,
    so a failure (an exception raised by the `examples` iterator included) leaves nothing at `out`.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (choose a new --out folder)")
    if "id" not in features:
        raise ValueError("a stored dataset needs an 'id' text feature (the record key)")
    examples = iter(examples)
    first = next(examples, None)
    if first is None:
        raise ValueError(f"{out}: no examples to write")
    raised = []  # TFDS may wrap what the generator raises: keep the original to re-raise it

    def checked():
        try:
            yield from itertools.chain([first], examples)
        except BaseException as error:
            raised.append(error)
            raise

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tfds = _tfds()
        builder = _builder_class(tfds, name)(data_dir=str(staging), file_format="array_record",
                                             features=features, examples=checked())
        try:
            builder.download_and_prepare()
        except BaseException:
            if raised:
                raise raised[0] from None
            raise
        if extras:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in extras.items()}, str(staging / name / VERSION / EXTRAS_FILE))
        os.replace(staging / name / VERSION, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@functools.cache  # TFDS registers builder classes by name: define each once per process
def _builder_class(tfds, dataset_name: str):
    """The builder of dataset `dataset_name`, defined on first use so that importing this module
    does not import TFDS."""

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = dataset_name  # TFDS registers the class under this name as it is created
        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, features: dict, examples: Iterable[dict], **kwargs):
            self._features = features
            self._examples = examples
            super().__init__(**kwargs)

        def _info(self):
            def feature(spec):
                if spec == TEXT:
                    return tfds.features.Text()
                shape, dtype = spec
                return tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype).type)

            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {key: feature(spec) for key, spec in self._features.items()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[str, dict]]:
            for example in self._examples:
                yield example["id"], example

        # TFDS prints "downloading and preparing ... to <staging folder>": not the folder the user
        # named, and the commands report their own progress, so those two messages are silenced.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

    return Builder


class RecordDataset:
    """Random access to a stored dataset named `name`: `len(ds)`, `ds[i]` -> dict of numpy arrays
    (as stored) and str.

    Opening checks the folder, its metadata and that every shard is present and readable, so a
    broken dataset fails here with the file named, not later inside a training step.
    """

    name = DATASET_NAME
    writer = "helios-jax prepare-data"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such dataset folder (write one with `{self.writer}`)")
        for name in ("dataset_info.json", "features.json"):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name}: missing (not a `{self.writer}` dataset folder)")
        self._check_shards()
        tfds = _tfds()
        try:
            self._source = tfds.builder_from_directory(str(self.path)).as_data_source(split="train")
            self._length = len(self._source)
        except Exception as error:  # TFDS and array_record raise many types; the file is what matters
            raise OSError(f"{self.path}: cannot open the dataset ({_first_line(error)})") from None

    def _check_shards(self) -> None:
        try:
            info = json.loads((self.path / "dataset_info.json").read_text())
            split = next(s for s in info["splits"] if s["name"] == "train")
            lengths = [int(n) for n in split["shardLengths"]]
        except (ValueError, KeyError, StopIteration) as error:
            raise OSError(f"{self.path / 'dataset_info.json'}: unreadable or has no train split ({error})") from None
        if info.get("name", self.name) != self.name:
            raise OSError(f"{self.path}: holds a {info['name']!r} dataset, not {self.name!r} "
                          f"(write one with `{self.writer}`)")
        from array_record.python.array_record_module import ArrayRecordReader

        count = len(lengths)
        for index, expected in enumerate(lengths):
            shard = self.path / f"{self.name}-train.array_record-{index:05d}-of-{count:05d}"
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: missing shard ({count} expected)")
            try:
                reader = ArrayRecordReader(str(shard))
                found = reader.num_records()
                if found:
                    reader.read([0, found - 1])  # the first and last record decode: not truncated
                reader.close()
            except Exception as error:
                raise OSError(f"{shard}: corrupt shard ({_first_line(error)})") from None
            if found != expected:
                raise OSError(f"{shard}: {found} records, dataset_info.json says {expected}")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        return {key: _text(value) if isinstance(value, (bytes, str)) else np.asarray(value)
                for key, value in record.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} records)"


class LatentDataset(RecordDataset):
    """The `helios-jax prepare-data` dataset: `ds[i]` -> vae_latent, prompt_embed (float32), caption, id."""

    def __getitem__(self, index: int) -> dict:
        record = super().__getitem__(index)
        return {
            "vae_latent": np.asarray(record["vae_latent"], np.float32),
            "prompt_embed": np.asarray(record["prompt_embed"], np.float32),
            "caption": record["caption"],
            "id": record["id"],
        }

    def __repr__(self) -> str:
        return f"LatentDataset({str(self.path)!r}, {len(self)} clips)"


# The extras entry prepare-data stores the training negative prompt's embedding under (Stage 3's real score).
NEGATIVE_PROMPT_EMBED = "negative_prompt_embed"


def read_extra(path: str | Path, name: str) -> np.ndarray:
    """A dataset-wide array `write_dataset(..., extras=)` stored; a clear error when it is absent."""
    file = Path(path) / EXTRAS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; {name} is written by `helios-jax prepare-data` (re-run it)")
    from safetensors.numpy import load_file

    arrays = load_file(str(file))
    if name not in arrays:
        raise KeyError(f"{file}: has no {name} (re-run `helios-jax prepare-data`)")
    return arrays[name]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
