"""Restore a converted component folder into its NNX module, optionally sharded onto a mesh.

With a mesh, each parameter becomes a `jax.Array` built shard by shard from the on-disk array
(`jax.make_array_from_callback`), so a host reads only the slices its devices hold. Until the
project's sharding rules exist (issue 7), a parameter's logical axes are mapped by `DEFAULT_RULES`.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from checkpoints_convert import components as comp
from checkpoints_convert.convert import CONVERSION_JSON
from checkpoints_convert.param_store import ParamReader
from checkpoints_convert.safetensors_folder import CheckpointError

# Logical axis -> mesh axis, tried in order; an axis is used once per parameter and only where it
# divides the dimension. Everything else is replicated.
DEFAULT_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
                 ("mlp", "fsdp"), ("heads", "fsdp"))


def is_converted(folder) -> bool:
    folder = Path(folder)
    return (folder / CONVERSION_JSON).is_file() and (folder / "params").is_dir()


def sharding_of(var, mesh, rules=DEFAULT_RULES) -> NamedSharding:
    names = set(mesh.axis_names)
    if not names & {mesh_axis for _, mesh_axis in rules}:  # a mesh with other names: shard embed on its first axis
        rules = (("embed", mesh.axis_names[0]),)
    spec, used = [], set()
    for size, axis in zip(var.shape, comp.logical_axes(var) or (None,) * len(var.shape)):
        choice = next((m for logical, m in rules if logical == axis and m in names and m not in used
                       and size % mesh.shape[m] == 0), None)
        used.add(choice)
        spec.append(choice)
    return NamedSharding(mesh, PartitionSpec(*spec))


def restore(folder, *, dtype: str | None = None, mesh=None) -> nnx.Module:
    folder = Path(folder)
    metadata = json.loads((folder / CONVERSION_JSON).read_text())
    config_json = comp.read_config(folder)
    component = comp.component_of(folder, config_json)
    _, graphdef, state, variables = comp.build_abstract(component, folder, config_json, dtype or metadata["dtype"])
    params = ParamReader(folder / "params")
    for name in sorted(set(params.leaves) ^ set(variables)):
        where = "not in the model" if name in params.leaves else "missing"
        raise CheckpointError(f"{folder / 'params'}: parameter {name} {where}")
    for name, var in variables.items():
        if tuple(params.leaves[name]["shape"]) != tuple(var.shape):
            raise CheckpointError(f"{folder / 'params'}: parameter {name} has shape {params.leaves[name]['shape']}, "
                                  f"expected {list(var.shape)}")
        target = jnp.dtype(var.dtype)
        if mesh is None:
            value = jnp.asarray(params.read(name).astype(target, copy=False))
        else:
            value = jax.make_array_from_callback(
                tuple(var.shape), sharding_of(var, mesh),
                lambda index, name=name: params.read(name, index).astype(target, copy=False))
        var.set_value(value)
    return nnx.merge(graphdef, state)
