"""The three convertible components: how each is recognised, configured, built and named on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

from flax import nnx

from checkpoints_convert import text_encoder_keys, transformer_keys, vae_keys
from checkpoints_convert.safetensors_folder import CheckpointError


class Component(NamedTuple):
    kind: str  # the folder name in a diffusers model folder
    key_map: object  # a checkpoints_convert key-map module
    config_of: Callable  # (config_json, **overrides) -> our config
    module_class: Callable
    file_prefix: str  # diffusers: diffusion_pytorch_model; transformers: model
    torch_key: Callable  # (source key, Target) -> the current torch name, written back on export
    wrap_reader: Callable = lambda reader: reader
    # Top-level modules the checkpoint may lack, filled by `derive(module)` after loading (Wan2.1 only).
    derived_when_absent: tuple = ()
    derive: Callable | None = None


def _transformer() -> Component:
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.models.transformer_config import from_diffusers_json
    return Component("transformer", transformer_keys, from_diffusers_json, HeliosTransformer3DModel,
                     "diffusion_pytorch_model", lambda key, target: transformer_keys.canonical_key(key))


def _wan_transformer() -> Component:
    """A Wan2.1 T2V transformer as the start of Helios training: our Helios model with the training
    flags, its history patchers derived from patch_embedding (the Wan checkpoint has none)."""
    from helios_jax.models.history_patches import HISTORY_PATCHERS, derive_history_patches
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.models.transformer_config import from_wan_json
    return Component("transformer", transformer_keys, from_wan_json, HeliosTransformer3DModel,
                     "diffusion_pytorch_model", lambda key, target: transformer_keys.canonical_key(key),
                     derived_when_absent=HISTORY_PATCHERS, derive=derive_history_patches)


def _vae() -> Component:
    from helios_jax.models.vae import AutoencoderKLWan
    from helios_jax.models.vae_config import from_diffusers_json
    return Component("vae", vae_keys, from_diffusers_json, AutoencoderKLWan,
                     "diffusion_pytorch_model", lambda key, target: key)


def _text_encoder() -> Component:
    from helios_jax.models.text_encoder import UMT5EncoderModel
    from helios_jax.models.text_encoder_config import from_transformers_json
    return Component("text_encoder", text_encoder_keys, from_transformers_json, UMT5EncoderModel, "model",
                     lambda key, target: text_encoder_keys.torch_key_of(target.path, target.layer),
                     text_encoder_keys.UsedTokenTable)


CLASS_NAMES = {"HeliosTransformer3DModel": _transformer, "WanTransformer3DModel": _wan_transformer,
               "AutoencoderKLWan": _vae}
ARCHITECTURES = {"UMT5EncoderModel": _text_encoder}
BY_KIND = {"transformer": _transformer, "vae": _vae, "text_encoder": _text_encoder}
KINDS = tuple(BY_KIND)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a component folder, e.g. transformer/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None


def component_of(folder: Path, config_json: dict, expected_kind: str | None = None) -> Component:
    """The component a config describes; with `expected_kind`, it must be that one."""
    class_name = config_json.get("_class_name")
    if class_name in CLASS_NAMES:
        component = CLASS_NAMES[class_name]()
    else:
        known = [a for a in config_json.get("architectures") or () if a in ARCHITECTURES]
        if not known:
            raise CheckpointError(f"{Path(folder) / 'config.json'}: unsupported component class {class_name!r}")
        component = ARCHITECTURES[known[0]]()
    if expected_kind and component.kind != expected_kind:
        found = class_name or known[0]
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {found} is not a {expected_kind} class")
    return component


def build_abstract(component: Component, folder: Path, config_json: dict, dtype: str | None):
    """(config, graphdef, state, {leaf name: nnx variable}) of the abstract module for a config and dtype."""
    try:
        config = component.config_of(config_json, **({"dtype": dtype} if dtype else {}))
    except ValueError as error:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {error}") from None
    abstract = nnx.eval_shape(lambda: component.module_class(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    return config, graphdef, state, leaves


def logical_axes(var) -> tuple:
    return tuple(var.get_metadata().get("out_sharding") or ())


def is_stacked(var) -> bool:
    axes = logical_axes(var)
    return bool(axes) and axes[0] == "layers"
