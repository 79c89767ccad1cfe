"""Restore a converted component folder into its NNX module, optionally sharded onto a mesh.

`params/` is an Orbax checkpoint; Orbax restores each parameter straight into its sharding, so
with a mesh a host reads only the slices its devices hold. Shardings come from the project's rules
(helios_jax.parallel, configs/sharding.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, SingleDeviceSharding

from checkpoints_convert import components as comp
from checkpoints_convert.convert import CONVERSION_JSON
from checkpoints_convert.param_store import ParamReader
from checkpoints_convert.safetensors_folder import CheckpointError
from helios_jax import parallel


def is_converted(folder) -> bool:
    folder = Path(folder)
    return (folder / CONVERSION_JSON).is_file() and (folder / "params").is_dir()


def sharding_of(var, mesh) -> NamedSharding:
    return parallel.parameter_sharding(var, mesh)


def stored_dtype(folder) -> str:
    """The parameter dtype a converted folder was written in."""
    return json.loads((Path(folder) / CONVERSION_JSON).read_text())["dtype"]


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
    restore_args = {}
    for name, var in variables.items():
        if tuple(params.leaves[name]["shape"]) != tuple(var.shape):
            raise CheckpointError(f"{folder / 'params'}: parameter {name} has shape {params.leaves[name]['shape']}, "
                                  f"expected {list(var.shape)}")
        sharding = sharding_of(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        restore_args[name] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=jnp.dtype(var.dtype))
    # Orbax reads each array's shards straight into their devices (only the slices each one holds).
    values = ocp.PyTreeCheckpointer().restore((folder / "params").resolve(),
                                              args=ocp.args.PyTreeRestore(restore_args=restore_args))
    for name, var in variables.items():
        var.set_value(values.pop(name))
    return nnx.merge(graphdef, state)
