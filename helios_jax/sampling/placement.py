"""Before any weight is read: the mesh the pipeline runs on and where each component lives.

`plan_placement` takes the components as builders (`build()` makes the module; only ever called
under `nnx.eval_shape` here), so the choice costs compiles of abstract programs, never memory.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import parallel
from helios_jax.sampling import memory_plan as memory_plan_lib
from helios_jax.sampling import mesh_choice, parameter_layouts
from helios_jax.sampling.abstract_chunk import chunk_arguments, replicated
from helios_jax.sampling.chunk_plan import LATENT_FRAMES_PER_CHUNK


# The Wan VAE decode's temporaries per output pixel (3.9 GiB at 384x640, compiled for TPU v5e): the
# decode is compiled to check it fits beside the transformer only when the margin is under twice this.
DECODE_BYTES_PER_PIXEL = 17e3


@dataclass
class Placement:
    mesh: object  # jax Mesh, or None for one device
    memory_plan: str
    candidates: list = field(default_factory=list)  # mesh_choice.Candidate per compiled layout (auto only)
    # The transformer's parameters' Formats in the chunk program's own layouts (TPU), else None.
    transformer_formats: object = None


def abstract_bytes_per_device(abstract: nnx.Module | None, mesh) -> float:
    """Parameter bytes one device holds for an abstract module placed by its logical axes on `mesh`."""
    if abstract is None:
        return 0.0
    if mesh is None:
        return float(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(abstract))))
    _, state = parallel.place_abstract(abstract, mesh)
    return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(state)))


def plan_placement(*, mesh, memory_plan: str, build_transformer: Callable, build_vae: Callable | None,
                   build_text_encoder: Callable | None, scheduler, settings, latent_height: int, latent_width: int,
                   devices=None, quantize: str | None = None,
                   progress: Callable[[str], None] = lambda message: None) -> Placement:
    """The mesh (`mesh`: None, a Mesh, "auto", "AXIS=SIZE,..." or a sizes dict) and the memory plan
    ("auto" or one of memory_plan.PLANS) for these components at this chunk size. `quantize`: the
    weights' quantization (the builders already quantize; it decides the parameter layouts)."""
    memory_plan_lib.check_plan(memory_plan, "memory_plan")
    # Each component is built abstractly once, when first needed, then placed on every candidate mesh.
    abstract = functools.cache(lambda build: None if build is None else nnx.eval_shape(build))
    transformer = abstract(build_transformer)
    graphdef_config = transformer.config
    guided = settings.guidance != "none"

    def others(m):
        return (abstract_bytes_per_device(abstract(build_vae), m)
                + abstract_bytes_per_device(abstract(build_text_encoder), m))

    first_device = list(jax.devices() if devices is None else devices)[0]
    compiled_layouts = parameter_layouts.wants_compiled_layouts(first_device, quantize)
    compiled_chunks = {}  # mesh layout -> its compiled chunk program

    def compile_chunk(m):
        arguments = chunk_arguments(graphdef_config, scheduler, settings, m, latent_height=latent_height,
                                    latent_width=latent_width)
        # The abstract parameters are built outside the mesh (their logical axes are not mesh axes).
        graphdef, state = parallel.place_abstract(transformer, m)
        compiled_chunks[_key(m)] = parameter_layouts.compile_chunk_program(graphdef, state, arguments, m,
                                                                           auto_layouts=compiled_layouts)
        return compiled_chunks[_key(m)]

    candidates = []

    def choose(devices_):
        chosen, results = mesh_choice.choose_mesh(
            devices_, heads=int(graphdef_config.num_attention_heads), batch=2 if guided else 1,
            compile_chunk=compile_chunk, resident_bytes=others, progress=progress)
        candidates.extend(results)
        return chosen

    resolved = mesh_choice.resolve_mesh(mesh, choose=choose, devices=devices)
    layout_mesh = parameter_layouts.layout_mesh(resolved, first_device)
    transformer_formats = None
    if compiled_layouts:
        if _key(layout_mesh) not in compiled_chunks:
            progress("compiling the chunk program once for its parameter layouts")
            compile_chunk(layout_mesh)
        transformer_formats = parameter_layouts.parameter_formats(compiled_chunks[_key(layout_mesh)])
    if memory_plan == "auto":
        limit = mesh_choice.memory_limit(next(iter(layout_mesh.devices.flat)))
        sizes = dict(transformer=abstract_bytes_per_device(transformer, resolved),
                     vae=abstract_bytes_per_device(abstract(build_vae), resolved),
                     text=abstract_bytes_per_device(abstract(build_text_encoder), resolved))
        compiled = compiled_chunks.get(_key(layout_mesh))
        chunk_temporaries = max(mesh_choice.peak_bytes(compiled) - sizes["transformer"], 0.0) if compiled else 0.0
        decode_temporaries = 0.0
        pixels = latent_height * latent_width * 64
        if (limit is not None and build_vae is not None and memory_plan_lib.HEADROOM * limit
                - sizes["transformer"] - sizes["vae"] - chunk_temporaries < 2 * DECODE_BYTES_PER_PIXEL * pixels):
            progress("compiling the VAE decode to see whether it fits beside the transformer")
            decode = compile_vae_decode(abstract(build_vae), layout_mesh, graphdef_config.out_channels,
                                        (LATENT_FRAMES_PER_CHUNK, latent_height, latent_width))
            decode_temporaries = max(mesh_choice.peak_bytes(decode) - sizes["vae"], 0.0)
        memory_plan = memory_plan_lib.choose_plan(limit, transformer_bytes=sizes["transformer"], vae_bytes=sizes["vae"],
                                                  text_bytes=sizes["text"], chunk_temporaries=chunk_temporaries,
                                                  decode_temporaries=decode_temporaries)
    return Placement(resolved, memory_plan, candidates, transformer_formats)


def compile_vae_decode(abstract_vae: nnx.Module, mesh, channels: int, latent_size: tuple):
    """The VAE decode of one chunk's latents [1, channels, frames, h, w], compiled with abstract
    parameters on `mesh` (what `HeliosPipeline.decode_chunk` runs)."""
    graphdef, state = parallel.place_abstract(abstract_vae, mesh)

    def decode(state, latents):
        vae = nnx.merge(graphdef, state)
        return vae.decode(vae.denormalize_latents(latents))

    latents = replicated((1, channels, *latent_size), jnp.float32, mesh)
    with parallel.use_mesh(mesh):
        return jax.jit(decode).lower(state, latents).compile()


def _key(mesh) -> tuple:
    return tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat)


def _nontrivial(sizes: dict) -> dict:
    return {axis: size for axis, size in sizes.items() if size > 1}
