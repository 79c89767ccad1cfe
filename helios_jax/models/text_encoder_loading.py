"""Build the UMT5 encoder from a transformers `UMT5EncoderModel` folder (config.json + safetensors)."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert import text_encoder_keys as keys
from checkpoints_convert.safetensors_folder import CheckpointError, SafetensorsFolder
from helios_jax.models.text_encoder import UMT5EncoderModel
from helios_jax.models.text_encoder_config import from_transformers_json


def is_text_encoder_config(config_json: dict) -> bool:
    """True for a config.json written by transformers for a UMT5 encoder."""
    return "UMT5EncoderModel" in (config_json.get("architectures") or ())


def load_text_encoder(folder: Path, config_json: dict, *, dtype: str | None = None) -> UMT5EncoderModel:
    overrides = {"dtype": dtype} if dtype else {}
    try:
        config = from_transformers_json(config_json, **overrides)
    except ValueError as error:
        raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
    return text_encoder_from_state_dict(config, SafetensorsFolder(folder))


def text_encoder_from_state_dict(config, tensors) -> UMT5EncoderModel:
    """Build the encoder and fill it from `tensors` (`.keys()` and `.read(key)`, transformers names).

    Every parameter must be given exactly once; an unknown key is an error, so a wrong checkpoint is
    never half loaded. The tied `encoder.embed_tokens.weight` is used only when `shared.weight` is absent.
    """
    abstract = nnx.eval_shape(lambda: UMT5EncoderModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    num_layers = config.num_layers
    buffers = {name: np.empty(var.shape, var.dtype) for name, var in flat.items()}
    filled: dict[str, set] = {name: set() for name in flat}
    where = getattr(tensors, "file_of", lambda key: "checkpoint")
    names = list(tensors.keys())
    for key in names:
        if key == keys.TOKEN_TABLE_ALIAS and keys.TOKEN_TABLE in names:
            continue  # tied to shared.weight, which transformers keeps
        target = keys.target_of(key)
        if target is None or target.path not in buffers:
            raise CheckpointError(f"{where(key)}: tensor {key} has no place in UMT5EncoderModel")
        if target.layer is not None and target.layer >= num_layers:
            raise CheckpointError(f"{where(key)}: tensor {key} is beyond num_layers={num_layers}")
        buffer = buffers[target.path]
        slot = buffer if target.layer is None else buffer[target.layer]
        array = keys.to_our_layout(np.asarray(tensors.read(key)), target.transform)
        if array.shape != slot.shape:
            raise CheckpointError(f"{where(key)}: tensor {key} has shape {array.shape} in our layout, expected {slot.shape}")
        if target.layer in filled[target.path]:
            raise CheckpointError(f"{where(key)}: tensor {key} given twice")
        filled[target.path].add(target.layer)
        slot[...] = array.astype(buffer.dtype)  # fp32 -> bf16 rounds to nearest even, as torch .to(bf16)
    missing = [keys.torch_key_of(name, layer) for name in flat for layer in _layers(flat[name], num_layers)
               if layer not in filled[name]]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    for name, var in flat.items():
        var.set_value(jnp.asarray(buffers.pop(name)))
    return nnx.merge(graphdef, state)


def _layers(var, num_layers: int):
    """The layer slots a leaf holds: 0..num_layers-1 when stacked, else the single slot None."""
    sharding = var.get_metadata().get("out_sharding") or ()
    return range(num_layers) if sharding and sharding[0] == "layers" else (None,)
