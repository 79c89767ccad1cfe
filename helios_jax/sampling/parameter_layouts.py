"""The layouts the chunk program wants its parameters in, so the weights are placed in them once.

On TPU the compiler tiles weights for its matmuls. A parameter handed over in the default layout
is copied into the tiled one inside the program, and for the stacked layers' weights that copy is
the size of the stack: for the int8 14B on one v5e chip it is the margin the 16 GiB chip lacks.
Compiling the chunk program once with `Layout.AUTO` for the parameters lets the compiler choose;
weights `device_put` in those layouts make every later jit of the chunk program take them as they
are (jax passes a committed array's layout through to the compile), so no copy is made.

HELIOS_PARAMETER_LAYOUTS=compiled|default overrides the choice (compiled for int8 weights on TPU,
default otherwise).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh

from helios_jax import parallel
from helios_jax.sampling.rollout import denoise_chunk, make_chunk_program

FORCE_VARIABLE = "HELIOS_PARAMETER_LAYOUTS"
CHOICES = ("compiled", "default")


def wants_compiled_layouts(device, quantize: str | None) -> bool:
    """Compiled layouts for int8 weights on TPU (their default layout costs a copy of the stack;
    bf16's default is already the tiled one: 28.05 vs 28.04 GiB for the 14B chunk program on
    v6e, so bf16 keeps the direct sharded load), unless HELIOS_PARAMETER_LAYOUTS says otherwise."""
    forced = os.environ.get(FORCE_VARIABLE, "")
    if forced and forced not in CHOICES:
        raise ValueError(f"{FORCE_VARIABLE}={forced!r}: must be one of {', '.join(CHOICES)}")
    if forced:
        return forced == "compiled"
    return quantize is not None and getattr(device, "platform", "") == "tpu"


def layout_mesh(mesh: Mesh | None, device=None) -> Mesh:
    """`mesh`, or for one device a one-device mesh over it (the abstract arguments need a mesh)."""
    if mesh is not None:
        return mesh
    return Mesh(np.array([device if device is not None else jax.devices()[0]]), ("fsdp",))


def compile_chunk_program(graphdef, state, arguments, mesh: Mesh, *, auto_layouts: bool):
    """The chunk program compiled for abstract parameters `state` (ShapeDtypeStructs with
    shardings) and `arguments` = (spec, inputs, tables) from abstract_chunk.chunk_arguments, under
    `mesh` (the model's activation constraints apply, as when it runs). `auto_layouts`: the
    parameters' layouts left to the compiler (`parameter_formats` reads them back)."""
    spec, inputs, tables = arguments
    with parallel.use_mesh(mesh):
        if not auto_layouts:
            return make_chunk_program(graphdef).lower(spec, state, inputs, tables).compile()

        def program(spec, state, inputs, tables):
            return denoise_chunk(nnx.merge(graphdef, state), spec, inputs, tables)

        auto = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), state)
        given = jax.tree.map(lambda x: x.sharding, inputs)
        jitted = jax.jit(program, static_argnums=0, in_shardings=(auto, given, None))
        return jitted.lower(spec, state, inputs, tables).compile()


def parameter_formats(compiled):
    """The state's Formats (layout + sharding), a tree like the state, of a chunk program compiled
    by `compile_chunk_program`."""
    positional, _ = compiled.input_formats
    return positional[0]


def place_in_formats(module: nnx.Module, formats) -> nnx.Module:
    """Every parameter of `module` (in host memory, or anywhere) moved into its Format; one
    parameter at a time, so the device never holds two copies of the weights."""
    flat_formats = dict(nnx.to_flat_state(formats))
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        if path not in flat_formats:
            raise ValueError(f"parameter {'.'.join(map(str, path))}: not in the compiled program's layouts")
        target = flat_formats[path]
        target = target.get_value() if isinstance(target, nnx.Variable) else target
        variable.set_value(jax.device_put(variable.get_value(), target))
    return module
