"""Safetensors files read and written one tensor at a time, for the streaming converter.

Reading parses the header and checks it against the file size first, so a truncated file or a
corrupted header is reported before anything is converted. Tensor bytes are then read with
positioned reads into a fresh buffer: pages of a long-lived memory map count towards the resident
set until unmapped, which would make peak memory grow with the checkpoint; a read of one tensor
keeps it at the size of that tensor.

Writing streams too: the header is computed from shapes alone, then each tensor is appended.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from checkpoints_convert.safetensors_folder import CheckpointError

# Floating dtypes a Helios checkpoint may hold; anything else is refused.
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
CODE_OF = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo:
    __slots__ = ("key", "path", "dtype", "shape", "offset", "nbytes")

    def __init__(self, key, path, dtype, shape, offset, nbytes):
        self.key, self.path, self.dtype, self.shape, self.offset, self.nbytes = key, path, dtype, shape, offset, nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, validated against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupted safetensors header (length {length} for a {size}-byte file)")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: corrupted safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    start = 8 + length
    tensors, end = {}, 0
    for key, entry in header.items():
        try:
            code, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted safetensors header entry for {key}") from None
        if code not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {code} (expected F32, BF16 or F16)")
        dtype = DTYPES[code]
        if stop - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupted safetensors header (tensor {key} size does not match its shape)")
        tensors[key] = TensorInfo(key, path, dtype, shape, start + begin, stop - begin)
        end = max(end, stop)
    if start + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header needs {start + end})")
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    array = np.empty(info.shape, info.dtype)
    view = memoryview(array.reshape(-1).view(np.uint8))
    with open(info.path, "rb", buffering=0) as file:
        file.seek(info.offset)
        done = 0
        while done < info.nbytes:
            count = file.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{info.path}: truncated while reading tensor {info.key}")
            done += count
    return array


class StreamingFolder:
    """A component folder's tensors (single file, several files, or sharded with an index json),
    headers read up front, data read one tensor at a time. The reader interface of the loaders
    (`keys`, `read`, `file_of`) plus `info(key)`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._info: dict[str, TensorInfo] = {}
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{self.folder}: more than one *.safetensors.index.json")
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{indexes[0]}: not a safetensors index ({error})") from None
            for name in sorted(set(weight_map.values())):
                if not (self.folder / name).is_file():
                    raise CheckpointError(f"{indexes[0]}: shard {name} is missing")
            headers = {name: read_header(self.folder / name) for name in sorted(set(weight_map.values()))}
            for key, name in weight_map.items():
                if key not in headers[name]:
                    raise CheckpointError(f"{self.folder / name}: tensor {key} listed in the index is not in the file")
                self._info[key] = headers[name][key]
            self.files = [self.folder / name for name in headers]
        else:
            self.files = sorted(self.folder.glob("*.safetensors"))
            if not self.files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files")
            for path in self.files:
                for key, info in read_header(path).items():
                    if key in self._info:
                        raise CheckpointError(f"{path}: tensor {key} also in {self._info[key].path}")
                    self._info[key] = info

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def file_of(self, key: str) -> Path:
        return self._info[key].path

    def read(self, key: str) -> np.ndarray:
        return read_tensor(self._info[key])

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis only (contiguous in the file): what
        sharded loading reads for one device."""
        info = self._info[key]
        if not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"rows {start}:{stop} out of range for tensor {key} of shape {info.shape}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        part = TensorInfo(key, info.path, info.dtype, (stop - start, *info.shape[1:]),
                          info.offset + start * row_bytes, (stop - start) * row_bytes)
        return read_tensor(part)


def write_file(path: Path, entries, metadata: dict | None = None) -> None:
    """Write a safetensors file from `entries`: (key, shape, dtype, produce) with `produce()` giving
    the array; tensors are produced and written one at a time, in order."""
    entries = list(entries)
    header, offset = {}, 0
    for key, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": CODE_OF[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": metadata, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {key} produced shape {array.shape}, header says {tuple(shape)}")
            file.write(memoryview(array.reshape(-1).view(np.uint8)))
        file.flush()
        os.fsync(file.fileno())
