"""The transformer a training run starts from: config.model.config names its shape (a preset, a
config .py file, or a folder with config.json), config.model.init its weights ("" = random init
from config.seed, else a converted or diffusers Helios transformer folder, or a diffusers
Wan2.1 T2V transformer folder whose history patchers are then derived), placed on the mesh."""
from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx

from helios_jax import parallel
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import PRESETS, preset


def model_config_of(config) -> ml_collections.ConfigDict:
    name = config.model.config
    execution = dict(dtype=config.model.dtype, remat_policy=config.model.remat_policy)
    if name in PRESETS:
        return preset(name, **execution)
    path = Path(name)
    if path.suffix == ".py":
        from helios_jax.config_flags import load_config
        model_config = load_config(name)
        model_config.update(execution)
        return model_config
    if (path / "config.json").is_file():  # a Helios or Wan2.1 transformer folder (Wan: + Helios training flags)
        from checkpoints_convert import components
        config_json = components.read_config(path)
        return components.component_of(path, config_json, "transformer").config_of(config_json, **execution)
    raise ValueError(f"config.model.config: {name!r} is not a preset ({', '.join(PRESETS)}), "
                     "a config .py file or a folder with config.json")


def build_student(config, mesh) -> HeliosTransformer3DModel:
    """The model a training run trains: `build_model` with the LoRA of `config.lora` attached (its
    factors drawn from config.seed + 1) and placed on `mesh`. Stage 3b's generator too."""
    from helios_jax.training.lora import add_lora

    model = build_model(config, mesh)
    add_lora(model, rank=int(config.lora.rank), alpha=float(config.lora.alpha),
             patch_embedding=config.lora.patch_embedding, history_patches=config.lora.history_patches,
             rngs=nnx.Rngs(int(config.seed) + 1))
    parallel.shard_state(model, mesh)  # the new adapters (and fp32 patchers) by their logical axes
    return model


def build_model(config, mesh) -> HeliosTransformer3DModel:
    """The model, every parameter already placed on `mesh` by its logical axes."""
    if config.model.init:
        from helios_jax.loading import load
        model = load(config.model.init, dtype=config.model.dtype, mesh=mesh)
        # The folder's config.json sets the shape; the run's remat policy is an execution choice.
        model.config = ml_collections.FrozenConfigDict({**model.config.to_dict(),
                                                        "remat_policy": config.model.remat_policy})
        return model
    model_config = model_config_of(config)
    seed = int(config.seed)
    return parallel.init_sharded(lambda: HeliosTransformer3DModel(model_config, rngs=nnx.Rngs(seed)), mesh)
