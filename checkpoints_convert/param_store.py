"""A converted component's parameters on disk: one tensorstore zarr array per leaf of our tree,
laid out as an Orbax PyTree checkpoint (non-OCDBT, zarr v2) of the flat {leaf name: array} dict.

Each leaf is created at its full shape before any data is written, and a stacked (scanned) leaf is
chunked one layer per chunk, so the converter writes it layer by layer as the torch tensors arrive
and the restorer can read any slice, e.g. only a device's shard. Uncompressed: weights do not
compress and the converter should run at disk speed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

MANIFEST = "manifest.json"
_ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}
# No cache: written chunks go straight to disk and are not kept in memory. No fsync per chunk (it
# halves the write rate); the converter syncs once before it publishes DST.
# Alignment of buffer addresses and lengths for O_DIRECT writes (the page size covers every disk).
DIRECT_ALIGN = 4096
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False})


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _spec(folder: Path, name: str) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder / name)}}


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # one write call moves at most ~2 GiB
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def write_file_direct(path: Path, data: memoryview) -> None:
    """Write `data` as the file `path`, the page-aligned part with O_DIRECT: straight from our buffer
    to the disk, so the kernel neither copies it nor fills the page cache with it (on small VMs,
    allocating page cache for GBs of fresh writes cost more CPU than the whole conversion else).
    The unaligned tail, an unaligned buffer, or a file system without O_DIRECT take plain writes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        head = len(data) - len(data) % DIRECT_ALIGN
        if head and np.frombuffer(data, np.uint8).ctypes.data % DIRECT_ALIGN == 0 and hasattr(os, "O_DIRECT"):
            try:
                direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                head = 0
            else:
                try:
                    _write_all(direct, data[:head], 0)
                except OSError:  # some file systems accept the flag but refuse the writes
                    head = 0
                finally:
                    os.close(direct)
        else:
            head = 0
        _write_all(fd, data[head:], head)
    finally:
        os.close(fd)


class ParamWriter:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._leaves: dict[str, dict] = {}

    def create(self, name: str, shape: tuple, dtype: np.dtype, *, stacked: bool, **record) -> None:
        chunks = [1, *shape[1:]] if stacked else list(shape)
        spec = _spec(self.folder, name) | {
            "metadata": {"shape": list(shape), "chunks": [max(c, 1) for c in chunks],
                         "dtype": _ZARR_DTYPES[np.dtype(dtype).name], "compressor": None},
            "create": True,
        }
        ts.open(spec, context=_CONTEXT).result()  # writes the array's .zarray; chunks come from `write`
        self._leaves[name] = {"shape": list(shape), "dtype": np.dtype(dtype).name, "stacked": stacked, **record}

    def write(self, name: str, layer: int | None, array: np.ndarray) -> None:
        """Write `array` (C-contiguous, the leaf's dtype) as the whole leaf, or as layer `layer` of
        a stacked leaf. Each is exactly one chunk, and an uncompressed zarr v2 chunk is the array's
        raw little-endian C-order bytes in a file named by its chunk indices, so it is written with
        plain writes: no copy into tensorstore's buffers, no layout pass (tensorstore reads it)."""
        leaf = self._leaves[name]
        expected = leaf["shape"][1:] if layer is not None else leaf["shape"]
        if list(array.shape) != expected or array.dtype.name != leaf["dtype"] or not array.flags.c_contiguous:
            raise ValueError(f"{name}: got a {array.dtype.name} {list(array.shape)} array, expected a C-contiguous "
                             f"{leaf['dtype']} {expected}")
        indices = ([layer] if layer is not None else []) + [0] * len(expected)
        write_file_direct(self.folder / name / (".".join(map(str, indices)) or "0"),
                          memoryview(array.reshape(-1).view(np.uint8)))

    def finish(self) -> dict[str, dict]:
        (self.folder / MANIFEST).write_text(json.dumps(self._leaves, indent=1))
        (self.folder / "_METADATA").write_text(json.dumps(orbax_metadata(self._leaves)))
        return self._leaves


def orbax_metadata(leaves: dict[str, dict]) -> dict:
    """Orbax's PyTree metadata for these arrays: a flat dict keyed by leaf name, each a zarr v2
    array in the folder named after it (Orbax's non-OCDBT layout), so that
    `orbax.checkpoint.PyTreeCheckpointer().restore(folder)` reads the folder as a checkpoint."""
    tree = {
        str((name,)): {"key_metadata": [{"key": name, "key_type": 2}],
                       "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                          "write_shape": leaf["shape"]}}
        for name, leaf in leaves.items()
    }
    return {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


class ParamReader:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.leaves: dict[str, dict] = json.loads((self.folder / MANIFEST).read_text())
        self._arrays: dict[str, ts.TensorStore] = {}

    def array(self, name: str) -> ts.TensorStore:
        if name not in self._arrays:
            self._arrays[name] = ts.open(_spec(self.folder, name), context=_CONTEXT).result()
        return self._arrays[name]

    def read(self, name: str, index=()) -> np.ndarray:
        return np.asarray(self.array(name)[index].read().result())
