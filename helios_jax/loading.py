"""`helios_jax.load`: a component folder -> its Flax NNX module, with weights read one tensor at a time."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert import components
from checkpoints_convert.key_rules import IGNORED_KEY
from checkpoints_convert.safetensors_folder import CheckpointError
from checkpoints_convert.safetensors_stream import StreamingFolder
from helios_jax import parallel

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def load(path, *, dtype=None, mesh=None):
    """The NNX module of one component folder: converted by `helios-jax convert` (restored, on `mesh`
    when given) or in diffusers format (config.json + safetensors, converted in memory).

    dtype: a jnp dtype or its name; sets parameter and compute dtype (fp32 islands stay fp32).
    None keeps the component's default (bf16 for the transformer and the text encoder, fp32 for the VAE).
    """
    folder = Path(path)
    from checkpoints_convert import restore  # imported here: it imports the model classes

    if restore.is_converted(folder):  # written by `helios-jax convert`
        return restore.restore(folder, dtype=dtype_name(dtype), mesh=mesh)
    config_json = components.read_config(folder)
    component = components.component_of(folder, config_json)
    overrides = {"dtype": dtype_name(dtype)} if dtype is not None else {}
    try:
        config = component.config_of(config_json, **overrides)
    except ValueError as error:
        raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
    return component_from_tensors(component, config, StreamingFolder(folder), mesh=mesh)


def module_builder(path, *, dtype=None):
    """(config, build_fn) of a component folder, reading only its config: `build_fn()` makes the
    module with random weights, meant for `nnx.eval_shape` (memory plans, ahead-of-time compiles)."""
    folder = Path(path)
    from checkpoints_convert import restore

    config_json = components.read_config(folder)
    component = components.component_of(folder, config_json)
    if dtype is None and restore.is_converted(folder):
        dtype = restore.stored_dtype(folder)
    overrides = {"dtype": dtype_name(dtype)} if dtype is not None else {}
    try:
        config = component.config_of(config_json, **overrides)
    except ValueError as error:
        raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
    return config, lambda: component.module_class(config, rngs=nnx.Rngs(0))


def dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    return name


def component_from_tensors(component: components.Component, config, tensors, *, mesh=None) -> nnx.Module:
    """Build `component` for `config` and fill it from `tensors` (the reference's state-dict names);
    with `mesh`, each parameter is read shard by shard straight onto its devices."""
    abstract = nnx.eval_shape(lambda: component.module_class(config, rngs=nnx.Rngs(0)))
    fill = module_from_tensors if mesh is None else functools.partial(sharded_module_from_tensors, mesh=mesh)
    tensors = component.wrap_reader(tensors)
    derived = _all_absent(component.derived_when_absent, tensors, component.key_map)
    module = fill(abstract, tensors, component.key_map, num_layers=config.get("num_layers", 0),
                  derived_when_absent=derived)
    return component.derive(module) if derived else module


def _all_absent(modules: tuple, tensors, key_map) -> tuple:
    """`modules` when the checkpoint has no tensor in any of them (they are then derived), else ()
    (then each is loaded, and a missing tensor is the usual error)."""
    targets = (key_map.locate(key) for key in tensors.keys())
    given = {t.path.split(".")[0] for t in targets if t is not None and t is not IGNORED_KEY}
    return () if given & set(modules) else tuple(modules)


def transformer_from_state_dict(config, tensors) -> nnx.Module:
    return component_from_tensors(components.BY_KIND["transformer"](), config, tensors)


def vae_from_state_dict(config, tensors) -> nnx.Module:
    return component_from_tensors(components.BY_KIND["vae"](), config, tensors)


def text_encoder_from_state_dict(config, tensors) -> nnx.Module:
    return component_from_tensors(components.BY_KIND["text_encoder"](), config, tensors)


def module_from_tensors(abstract: nnx.Module, tensors, key_map, *, num_layers: int = 0,
                        derived_when_absent: tuple = ()) -> nnx.Module:
    """Fill an `nnx.eval_shape`d module from `tensors` (`.keys()`, `.read(key)`, optional `.file_of(key)`).

    `key_map` is a module of `checkpoints_convert` with `locate(key) -> Target | None` and
    `to_our_layout(array, transform)`. Every parameter must be given exactly once and unknown keys
    are an error, so a wrong checkpoint is never half loaded. Leaves whose logical axes start with
    `layers` are stacked: a key fills one layer of them. Top-level modules named in
    `derived_when_absent` are not read: their leaves are filled with NaN for the caller to derive.
    """
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    sources = _index_tensors(type(abstract).__name__, flat, tensors, key_map, num_layers, derived_when_absent)
    for name, var in flat.items():
        if not sources[name]:
            var.set_value(_absent_placeholder(var, None))
            continue
        whole = (slice(None),) * len(var.shape)
        value = _read_slice(tensors, key_map, sources[name], components.is_stacked(var), var.dtype, whole)
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


# Which of our axes a checkpoint tensor's first (torch) axis becomes, per layout transform: a shard
# along that axis is a contiguous run of rows in the file and is read alone.
TORCH_ROWS_AXIS = {"linear": -1, "conv3d": -1, "conv2d": -1, "conv1x1": -1, "same": 0}


def sharded_module_from_tensors(abstract: nnx.Module, tensors, key_map, *, num_layers: int = 0, mesh,
                                derived_when_absent: tuple = ()) -> nnx.Module:
    """`module_from_tensors` onto `mesh`: every parameter becomes a jax.Array built by
    `jax.make_array_from_callback`, whose callback reads only the slice one device holds (for
    stacked parameters only the layers in its range), so no host or device holds the whole model.
    Checks (unknown, repeated, misshapen, missing tensors) happen on headers, before any read."""
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    sources = _index_tensors(type(abstract).__name__, flat, tensors, key_map, num_layers, derived_when_absent)
    for name, var in flat.items():
        sharding = parallel.parameter_sharding(var, mesh)
        if not sources[name]:
            var.set_value(_absent_placeholder(var, sharding))
            continue
        stacked = components.is_stacked(var)
        read = functools.partial(_read_slice, tensors, key_map, sources[name], stacked, var.dtype)
        var.set_value(jax.make_array_from_callback(tuple(var.shape), sharding, read))
    return nnx.merge(graphdef, state)


def _index_tensors(class_name: str, flat: dict, tensors, key_map, num_layers: int,
                   derived_when_absent: tuple = ()) -> dict:
    """{leaf name: {layer (-1 unstacked): (key, transform)}}, validated as module_from_tensors does;
    leaves of a `derived_when_absent` module that the checkpoint lacks entirely map to {}."""
    sources: dict[str, dict] = {name: {} for name in flat}
    where = getattr(tensors, "file_of", lambda key: "checkpoint")
    for key in tensors.keys():
        target = key_map.locate(key)
        if target is IGNORED_KEY:
            continue
        if target is None or target.path not in flat:
            raise CheckpointError(f"{where(key)}: tensor {key} has no place in {class_name}")
        var = flat[target.path]
        if target.layer is not None and target.layer >= num_layers:
            raise CheckpointError(f"{where(key)}: tensor {key} is beyond num_layers={num_layers}")
        expected = tuple(var.shape[1:]) if target.layer is not None else tuple(var.shape)
        shape = _our_shape(tensors, key_map, key, target.transform)
        if shape != expected:
            raise CheckpointError(f"{where(key)}: tensor {key} has shape {shape} in our layout, expected {expected}")
        layer = target.layer if target.layer is not None else -1
        if layer in sources[target.path]:
            raise CheckpointError(f"{where(key)}: tensor {key} given twice (directly and as a legacy alias?)")
        sources[target.path][layer] = (key, target.transform)
    missing = [name for name, var in flat.items() if name.split(".")[0] not in derived_when_absent
               and len(sources[name]) != (num_layers if components.is_stacked(var) else 1)]
    if missing:
        source = getattr(tensors, "folder", "checkpoint")
        raise CheckpointError(f"{source}: checkpoint is missing {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}")
    return sources


# Fills a parameter left for `Component.derive`: NaN, so one never derived cannot pass unnoticed.
_ABSENT = float("nan")


def _absent_placeholder(var, sharding):
    if sharding is None:
        return jnp.full(var.shape, _ABSENT, var.dtype)
    return jax.jit(lambda: jnp.full(var.shape, _ABSENT, var.dtype), out_shardings=sharding)()


def _our_shape(tensors, key_map, key: str, transform: str) -> tuple:
    """A tensor's shape in our layout from its header alone (a zero-stride view costs no memory)."""
    if not hasattr(tensors, "info"):
        return tuple(key_map.to_our_layout(np.asarray(tensors.read(key)), transform).shape)
    view = np.broadcast_to(np.zeros((), np.float32), tensors.info(key).shape)
    return tuple(key_map.to_our_layout(view, transform).shape)


def _read_slice(tensors, key_map, layer_sources: dict, stacked: bool, dtype, index: tuple) -> np.ndarray:
    """The part `index` (one slice per axis) of one parameter, read from the checkpoint."""
    if not stacked:
        key, transform = layer_sources[-1]
        return _read_part(tensors, key_map, key, transform, index).astype(dtype)
    layers = range(*index[0].indices(len(layer_sources)))
    parts = [_read_part(tensors, key_map, *layer_sources[layer], index[1:]) for layer in layers]
    return np.stack(parts).astype(dtype)


def _read_part(tensors, key_map, key: str, transform: str, index: tuple) -> np.ndarray:
    """tensor[index] in our layout; only the file rows that the slice needs are read when the
    reader can read rows and the transform keeps torch's first axis as one of ours."""
    axis = TORCH_ROWS_AXIS.get(transform)
    if axis is None or not hasattr(tensors, "read_rows") or not index:
        return key_map.to_our_layout(np.asarray(tensors.read(key)), transform)[index]
    axis %= len(index)
    start, stop, step = index[axis].indices(tensors.info(key).shape[0])
    rows = tensors.read_rows(key, start, stop)
    local = list(index)
    local[axis] = slice(0, stop - start, step)
    return key_map.to_our_layout(rows, transform)[tuple(local)]
