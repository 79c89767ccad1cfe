"""A trained run as the next stage's (or the release's) transformer folder (spec training.md §2, §10).

The reference fuses the stage's (EMA) LoRA into the previous stage's weights and saves the result
(`tools/merge_lora_for_helios.py`). Here the folder is a converted transformer folder, the format
`helios-jax convert` writes: `helios_jax.load`, `helios-jax generate` (as a model folder's
transformer/) and `config.model.init` of the next stage read it, and `helios-jax export` turns it
into diffusers safetensors. Beside it, for PyTorch users, the unmerged adapters as diffusers writes
them (`pytorch_lora_weights.safetensors`, PEFT names and LoRA config in the metadata) and, when the
run trained whole modules, those modules (`transformer_partial.safetensors`).

Every kernel is merged layer by layer on the host, W + scale * A @ B in fp32 rounded once to the
stored dtype, so memory stays at about one layer of one leaf beyond the model itself.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from checkpoints_convert import transformer_keys
from checkpoints_convert.components import is_stacked
from checkpoints_convert.convert import CONVERSION_JSON, clean_stale_temporaries, publish
from checkpoints_convert.param_store import ParamWriter
from checkpoints_convert.safetensors_stream import write_file
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import to_diffusers_json
from helios_jax.training.lora import HISTORY_PATCHES, LoRA, LoRAParam, lora_layers, peft_lora_state_dict
from helios_jax.training.run_weights import TrainedModel

LORA_FILE = "pytorch_lora_weights.safetensors"
PARTIAL_FILE = "transformer_partial.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key (loaders.lora_base)


def write_release_folder(trained: TrainedModel, dst, *, workdir, overwrite: bool = False,
                         progress: bool = True) -> Path:
    """Write `trained` (its LoRA merged) to DST atomically; returns DST."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (use --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        stored = _write_merged_params(trained.model, tmp / "params", progress)
        (tmp / "config.json").write_text(json.dumps(to_diffusers_json(trained.model.config), indent=2) + "\n")
        _write_adapters(trained, tmp)
        counts = {}
        for leaf in stored.values():
            counts[leaf["dtype"]] = counts.get(leaf["dtype"], 0) + 1
        (tmp / CONVERSION_JSON).write_text(json.dumps({
            "component": "transformer", "dtype": trained.model.config.dtype, "stored_dtypes": counts,
            "tensors": sum(len(leaf["torch_keys"]) for leaf in stored.values()),
            "merged_from": {"workdir": str(Path(workdir).resolve()), "step": trained.step,
                            "weights": trained.weights, "stage": trained.config.train.stage,
                            "init": trained.config.model.init or f"random ({trained.config.model.config})"},
        }, indent=1))
        os.sync()
        publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_merged_params(model: nnx.Module, folder: Path, progress: bool) -> dict:
    """Every base parameter of `model` (adapters fused into their kernels) in the dtype the plain
    model stores it in, with its diffusers keys recorded for `helios-jax export`."""
    plain = nnx.eval_shape(lambda: HeliosTransformer3DModel(model.config, rngs=nnx.Rngs(0)))
    stored_dtypes = {_name(path): np.dtype(var.dtype) for path, var in nnx.to_flat_state(nnx.state(plain))}
    adapters = {_name(path): layer.lora for path, layer in lora_layers(model)}
    variables = {_name(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam)))}
    if set(variables) != set(stored_dtypes):
        raise AssertionError(f"trained model and plain model differ in {sorted(set(variables) ^ set(stored_dtypes))}")
    writer = ParamWriter(folder)
    bar = tqdm(total=len(variables), unit="leaf", desc="merge", disable=not progress)
    for name, var in variables.items():
        stacked = is_stacked(var)
        layers = var.shape[0] if stacked else None
        module, param = name.rsplit(".", 1)
        lora = adapters.get(module) if param == "kernel" else None
        keys = [transformer_keys.torch_key_of(name, layer) for layer in (range(layers) if stacked else [None])]
        dtype = stored_dtypes[name]
        writer.create(name, tuple(var.shape), dtype, stacked=stacked, transform=keys[0][1],
                      source_keys=[k for k, _ in keys], torch_keys=[k for k, _ in keys])
        value = var.get_value()
        for layer in range(layers) if stacked else [None]:
            index = () if layer is None else (layer,)
            weight = np.asarray(jax.device_get(value[index]), np.float32)
            if lora is not None:
                weight = weight + _delta(lora, index)
            writer.write(name, layer, np.ascontiguousarray(weight.astype(dtype)))
        bar.update()
    bar.close()
    return writer.finish()


def _delta(lora: LoRA, index: tuple) -> np.ndarray:
    """scale * A @ B of one layer, in the kernel's layout, fp32."""
    down = np.asarray(jax.device_get(lora.down.get_value()[index]), np.float32)
    up = np.asarray(jax.device_get(lora.up.get_value()[index]), np.float32)
    delta = down.reshape(-1, down.shape[-1]) @ up
    return lora.scale * delta.reshape(*down.shape[:-1], up.shape[-1])


def _write_adapters(trained: TrainedModel, folder: Path) -> None:
    """The unmerged LoRA as diffusers saves it, and the whole-trained modules in diffusers names."""
    tensors, lora_config = peft_lora_state_dict(trained.model)
    if tensors:
        metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(
            {f"transformer.{k}": v for k, v in lora_config.items()}, indent=2, sort_keys=True)}
        write_file(folder / LORA_FILE, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                   metadata=metadata)
    if trained.config.lora.history_patches == "full":
        partial = {}
        for path, var in nnx.to_flat_state(nnx.state(trained.model, nnx.Not(LoRAParam))):
            name = _name(path)
            if name.split(".")[0] in HISTORY_PATCHES:
                key, transform = transformer_keys.torch_key_of(name, None)
                partial[key] = np.ascontiguousarray(
                    transformer_keys.to_torch_layout(np.asarray(jax.device_get(var.get_value()), np.float32), transform))
        write_file(folder / PARTIAL_FILE, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in partial.items()],
                   metadata={"format": "pt"})


def _name(path) -> str:
    return ".".join(str(p) for p in path)
