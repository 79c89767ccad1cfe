"""Device meshes and logical-axis shardings: the helpers every other module uses.

`make_mesh(fsdp=8)` builds a mesh over the axes `data`, `fsdp`, `tensor`, `seq`; parameters carry
logical axis names (`layers.param`), and `sharding_for(shape, logical_axes, mesh)` maps them
through the rules of helios_jax/parallel_rules.py (configs/sharding.py). With no mesh, or a
mesh of one device, everything runs unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
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


def parse_mesh_sizes(text: str, flag: str = "--mesh") -> dict:
    """`fsdp=4,tensor=2` -> {"fsdp": 4, "tensor": 2} (one size may be -1); a bad part is a
    ValueError naming `flag`. Checked before any device is touched."""
    sizes = {}
    for part in text.split(","):
        axis, sep, value = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in AXES:
            raise ValueError(f"{flag} must be auto or AXIS=SIZE,... with AXIS one of {', '.join(AXES)}; got {part!r}")
        if axis in sizes:
            raise ValueError(f"{flag} names {axis} twice")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise ValueError(f"{flag} {axis} size must be an integer (or -1); got {value!r}") from None
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise ValueError(f"{flag} {axis} size must be positive (or -1); got {sizes[axis]}")
    return sizes


def mesh_over_all(sizes: dict, devices, flag: str = "--mesh") -> Mesh:
    """`make_mesh(**sizes)` that must use every device: a mesh that leaves some idle or does not
    divide them is a ValueError naming `flag`."""
    devices = list(devices)
    try:
        mesh = make_mesh(**sizes, devices=devices)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    if mesh.size != len(devices):
        raise ValueError(f"{flag} uses {mesh.size} of the {len(devices)} devices; use them all (or -1)")
    return mesh


def describe_sizes(sizes: dict) -> str:
    """{"fsdp": 4, "tensor": 2, "seq": 1} -> "fsdp=4,tensor=2" (axes of size 1 left out)."""
    return ",".join(f"{axis}={size}" for axis, size in dict(sizes).items() if size > 1) or "single device"


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


# ------------------------------------------------------------------------------------------------
# The active mesh and activation constraints


def use_mesh(mesh: Mesh | None):
    """Context in which `constrain` and jitted programs see `mesh` (a no-op context for None)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def active_mesh():
    """The mesh set by `use_mesh` / `jax.set_mesh` (abstract inside jit), or None when there is none
    or it has a single device (then constraints would only cost compile time)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the sharding ACTIVATION_RULES give its logical axes on the active mesh;
    unchanged without one, so models run as they are on one device."""
    mesh = active_mesh()
    if mesh is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match activation shape {x.shape}")
    spec = partition_spec(x.shape, logical_axes, mesh, ACTIVATION_RULES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ------------------------------------------------------------------------------------------------
# Parameters on a mesh


def logical_axes_of(variable) -> tuple:
    """The logical axis names a parameter was created with (`layers.param`); () when untagged."""
    return tuple(variable.get_metadata().get("out_sharding") or ())


def parameter_sharding(variable, mesh: Mesh) -> NamedSharding:
    axes = logical_axes_of(variable)
    return sharding_for(variable.shape, axes or (None,) * len(variable.shape), mesh)


def shard_state(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of `module` by its logical axes on `mesh` (in place; returns `module`).
    For a model already in memory; to build or load one without a full copy anywhere, use
    `init_sharded` or `helios_jax.load(path, mesh=mesh)`."""
    for _, variable in nnx.to_flat_state(nnx.state(module)):
        variable.set_value(jax.device_put(variable.get_value(), parameter_sharding(variable, mesh)))
    return module


def place_state(module: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """`shard_state(module, mesh)`, or with no mesh every variable on the default device (e.g. a
    module built or quantized in host memory, moved to the accelerator)."""
    if mesh is not None:
        return shard_state(module, mesh)
    device = jax.devices()[0]
    for _, variable in nnx.to_flat_state(nnx.state(module)):
        variable.set_value(jax.device_put(variable.get_value(), device))
    return module


def init_sharded(build_fn, mesh: Mesh) -> nnx.Module:
    """`build_fn()` (a module constructor call) initialised straight into its shardings: shapes come
    from nnx.eval_shape, then one jit with out_shardings, so each device only computes and holds
    its own shard (random init is partitionable) and no full parameter exists anywhere."""
    abstract = nnx.eval_shape(build_fn)
    graphdef, state = nnx.split(abstract)
    variables = [variable for _, variable in nnx.to_flat_state(state)]
    shardings = [parameter_sharding(variable, mesh) for variable in variables]

    @functools.partial(jax.jit, out_shardings=shardings)
    def build():
        fresh = nnx.state(build_fn())
        return [variable.get_value() for _, variable in nnx.to_flat_state(fresh)]

    with use_mesh(mesh):
        values = build()
    for variable, value in zip(variables, values):
        variable.set_value(value)
    return nnx.merge(graphdef, state)


def abstract_sharded(build_fn, mesh: Mesh):
    """(graphdef, state) of `build_fn()` with every parameter a ShapeDtypeStruct placed by its
    logical axes on `mesh` (which may be abstract devices): nothing is allocated. For compiling
    ahead of time (helios-jax aot, the automatic mesh choice)."""
    return place_abstract(nnx.eval_shape(build_fn), mesh)


def place_abstract(abstract: nnx.Module, mesh: Mesh):
    """`abstract_sharded` of a module already built by `nnx.eval_shape`: one abstract build can be
    placed on several candidate meshes."""
    graphdef, state = nnx.split(abstract)

    def place(variable):
        value = variable.get_value()
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                     sharding=parameter_sharding(variable, mesh)))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mesh_of(module: nnx.Module) -> Mesh | None:
    """The multi-device mesh `module`'s parameters are placed on, or None (one device / unplaced)."""
    for _, variable in nnx.to_flat_state(nnx.state(module)):
        sharding = getattr(variable.get_value(), "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None
