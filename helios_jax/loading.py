"""`helios_jax.load`: a component folder -> its Flax NNX module, with weights read one tensor at a time."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert import transformer_keys
from checkpoints_convert.safetensors_folder import CheckpointError, SafetensorsFolder
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import from_diffusers_json

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def load(path, *, dtype=None, mesh=None):
    """The NNX module of one component folder (diffusers format; config.json + safetensors).

    dtype: a jnp dtype or its name; sets parameter and compute dtype (fp32 islands stay fp32).
    None keeps the component's default (bf16 for the transformer).
    """
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a component folder, e.g. transformer/)")
    try:
        config_json = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: invalid JSON ({error})") from None
    if mesh is not None:
        raise NotImplementedError("loading onto a mesh is not available yet (sharded loading is pending)")
    class_name = config_json.get("_class_name")
    if class_name == "HeliosTransformer3DModel":
        return load_transformer(folder, config_json, dtype=dtype_name(dtype))
    raise CheckpointError(f"{config_path}: unsupported component class {class_name!r}")


def dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    return name


def load_transformer(folder: Path, config_json: dict, *, dtype: str | None = None) -> HeliosTransformer3DModel:
    overrides = {"dtype": dtype} if dtype else {}
    try:
        config = from_diffusers_json(config_json, **overrides)
    except ValueError as error:
        raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
    return transformer_from_state_dict(config, SafetensorsFolder(folder))


def transformer_from_state_dict(config, tensors) -> HeliosTransformer3DModel:
    """Build the transformer and fill it from `tensors` (`.keys()` and `.read(key)`, diffusers names).

    Every parameter must be given exactly once; unknown keys are an error, so a wrong checkpoint is
    never half loaded.
    """
    abstract = nnx.eval_shape(lambda: HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    buffers = {name: np.empty(var.shape, var.dtype) for name, var in flat.items()}
    num_layers = config.num_layers
    filled: dict[str, set] = {name: set() for name in flat}
    where = getattr(tensors, "file_of", lambda key: "checkpoint")
    for key in tensors.keys():
        canonical = transformer_keys.canonical_key(key)
        if transformer_keys.is_ignored(canonical):
            continue
        target = transformer_keys.target_of(canonical)
        if target is None or target.path not in buffers:
            raise CheckpointError(f"{where(key)}: tensor {key} has no place in HeliosTransformer3DModel")
        array = transformer_keys.to_our_layout(np.asarray(tensors.read(key)), target.transform)
        buffer = buffers[target.path]
        slot = buffer if target.layer is None else buffer[target.layer] if target.layer < num_layers else None
        if slot is None:
            raise CheckpointError(f"{where(key)}: tensor {key} is beyond num_layers={num_layers}")
        if array.shape != slot.shape:
            raise CheckpointError(
                f"{where(key)}: tensor {key} has shape {array.shape} in our layout, expected {slot.shape}"
            )
        layer = target.layer if target.layer is not None else -1
        if layer in filled[target.path]:
            raise CheckpointError(f"{where(key)}: tensor {key} given twice (directly and as a legacy alias?)")
        filled[target.path].add(layer)
        slot[...] = array.astype(buffer.dtype)
    missing = [name for name, var in flat.items() if len(filled[name]) != (num_layers if _stacked(var) else 1)]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}")
    for name, var in flat.items():
        var.set_value(jnp.asarray(buffers.pop(name)))
    return nnx.merge(graphdef, state)


def _stacked(var) -> bool:
    sharding = var.get_metadata().get("out_sharding") or ()
    return bool(sharding) and sharding[0] == "layers"
