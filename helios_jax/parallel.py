"""Device meshes and logical-axis shardings: the helpers every other module uses.

`make_mesh(fsdp=8)` builds a mesh over the axes `data`, `fsdp`, `tensor`, `seq`; parameters carry
logical axis names (`layers.param`), and `sharding_for(shape, logical_axes, mesh)` maps them
through the rules of helios_jax/parallel_rules.py (configs/sharding.py). With no mesh, or a
mesh of one device, everything runs unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from helios_jax.parallel_rules import ACTIVATION_RULES, PARAMETER_RULES

AXES = ("data", "fsdp", "tensor", "seq")


def make_mesh(*, data: int = 1, fsdp: int = 1, tensor: int = 1, seq: int = 1, devices=None) -> Mesh:
    """A mesh over AXES; an axis left out has size 1 and one axis may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "seq": seq}
    for name, size in sizes.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise ValueError(f"mesh axis {name} must be a positive size or -1; got {size!r}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1; got {', '.join(rest)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into the fixed axes' {known}")
        sizes[rest[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total > len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices; {len(devices)} available")
    grid = np.asarray(devices[:total], dtype=object).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def partition_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   rules=PARAMETER_RULES) -> PartitionSpec:
    """Each dimension gets the first mesh axis of its rule that is unused, larger than 1 and divides it."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, logical_axes or (None,) * len(shape)):
        choice = None
        for mesh_axis in table.get(name, ()):
            width = mesh.shape.get(mesh_axis, 1)
            if mesh_axis not in used and width > 1 and size % width == 0:
                choice = mesh_axis
                break
        if choice is not None:
            used.add(choice)
        spec.append(choice)
    return PartitionSpec(*spec)


def sharding_for(shape, logical_axes, mesh: Mesh, rules=PARAMETER_RULES) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(shape, logical_axes, mesh, rules))


def activation_sharding(shape, logical_axes, mesh: Mesh) -> NamedSharding:
    return sharding_for(shape, logical_axes, mesh, ACTIVATION_RULES)


# --- The active mesh (read by sequence-parallel attention) -------------------------------------

def current_mesh():
    """The mesh set by `jax.set_mesh(...)` (an AbstractMesh inside jit), or None when none is set.

    Models read it instead of taking a mesh argument, so one set of weights runs unsharded or
    sharded without changes (e.g. helios_jax.kernels.self_attention goes sequence-parallel when
    its `seq` axis is larger than 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh
