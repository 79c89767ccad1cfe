"""`helios-jax export`: a converted folder -> diffusers/transformers-format safetensors.

Each torch tensor is produced from one leaf (one layer slice of a stacked leaf), put back in the
torch layout and appended to the current shard, so memory stays at about one tensor. Shards and the
index json are named as diffusers (`diffusion_pytorch_model-00001-of-00003.safetensors`) and
transformers (`model-...`) name them, so their `from_pretrained` loads the folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints_convert import components as comp
from checkpoints_convert.convert import CONVERSION_JSON, clean_stale_temporaries, publish
from checkpoints_convert.param_store import ParamReader, numpy_dtype
from checkpoints_convert.safetensors_folder import CheckpointError
from checkpoints_convert.safetensors_stream import write_file

DEFAULT_SHARD_BYTES = 5 * 1024**3


def _entries(folder: Path, key_map):
    """(torch key, torch shape, dtype, produce) for every tensor of a converted component."""
    params = ParamReader(folder / "params")
    entries = []
    for name, leaf in params.leaves.items():
        dtype, transform = numpy_dtype(leaf["dtype"]), leaf["transform"]
        slice_shape = leaf["shape"][1:] if leaf["stacked"] else leaf["shape"]
        torch_shape = key_map.to_torch_layout(np.broadcast_to(np.zeros((), dtype), slice_shape), transform).shape
        for layer, key in enumerate(leaf["torch_keys"]):
            index = layer if leaf["stacked"] else ()
            produce = (lambda name=name, index=index, transform=transform:
                       key_map.to_torch_layout(params.read(name, index), transform))
            entries.append((key, torch_shape, dtype, produce))
    return entries


def export_component(folder: Path, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, bar=None) -> None:
    config_json = comp.read_config(folder)
    component = comp.component_of(folder, config_json)
    entries = _entries(folder, component.key_map)
    shards, size = [[]], 0
    for entry in entries:
        nbytes = int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    out.mkdir(parents=True)
    prefix, weight_map, total = component.file_prefix, {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"{prefix}.safetensors" if len(shards) == 1 else f"{prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
        counted = [(key, shape, dtype, _counting(produce, bar)) for key, shape, dtype, produce in shard]
        write_file(out / name, counted, metadata={"format": "pt"})
        for key, shape, dtype, _ in shard:
            weight_map[key] = name
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.copy2(folder / "config.json", out / "config.json")


def _counting(produce, bar):
    def run():
        array = produce()
        if bar is not None:
            bar.update(array.nbytes)
        return array
    return run


def export(src, dst, *, overwrite=False, max_shard_bytes=DEFAULT_SHARD_BYTES, progress=True) -> Path:
    """Export SRC (a converted model folder or component folder) to diffusers format at DST."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such folder")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists (use --overwrite)")
    model_folder = (src / "model_index.json").is_file()
    if model_folder:
        parts = sorted(p.name for p in src.iterdir() if p.is_dir())
        converted = [name for name in parts if (src / name / CONVERSION_JSON).is_file()]
    elif (src / CONVERSION_JSON).is_file():
        parts, converted = ["."], ["."]
    else:
        raise CheckpointError(f"{src}: not a converted folder (no {CONVERSION_JSON} or model_index.json)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    total = sum(_stored_bytes(src / name) for name in converted)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress)
    try:
        if model_folder:
            tmp.mkdir()
            shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        for name in parts:
            if name in converted:
                export_component(src / name, tmp / name if model_folder else tmp, max_shard_bytes, bar)
            else:
                shutil.copytree(src / name, tmp / name)
        bar.close()
        publish(tmp, dst, overwrite)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _stored_bytes(folder: Path) -> int:
    leaves = ParamReader(folder / "params").leaves
    return sum(int(np.prod(leaf["shape"], dtype=np.int64)) * numpy_dtype(leaf["dtype"]).itemsize
               for leaf in leaves.values())
