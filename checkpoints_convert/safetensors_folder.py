"""Read tensors one at a time from a diffusers/transformers component folder.

A folder holds either one or more `*.safetensors` files, or shards listed by a
`*.safetensors.index.json` (`weight_map`: key -> file). Files are memory-mapped; a tensor is only
read when asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message names it."""


class SafetensorsFolder:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{self.folder}: more than one *.safetensors.index.json")
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{indexes[0]}: not a safetensors index ({error})") from None
            for key, name in weight_map.items():
                path = self.folder / name
                if not path.is_file():
                    raise CheckpointError(f"{indexes[0]}: shard {name} listed for {key} is missing")
                self._file_of[key] = path
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files")
            for path in files:
                for key in self._open(path).keys():
                    if key in self._file_of:
                        raise CheckpointError(f"{path}: tensor {key} also in {self._file_of[key]}")
                    self._file_of[key] = path

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as error:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot read as safetensors ({error})") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def read(self, key: str) -> np.ndarray:
        path = self._file_of[key]
        try:
            return self._open(path).get_tensor(key)
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({error})") from None
