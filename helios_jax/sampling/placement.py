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
import numpy as np
from flax import nnx

from helios_jax import parallel
from helios_jax.sampling import memory_plan as memory_plan_lib
from helios_jax.sampling import mesh_choice
from helios_jax.sampling.abstract_chunk import chunk_arguments
from helios_jax.sampling.rollout import make_chunk_program


@dataclass
class Placement:
    mesh: object  # jax Mesh, or None for one device
    memory_plan: str
    candidates: list = field(default_factory=list)  # mesh_choice.Candidate per compiled layout (auto only)


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
                   devices=None, progress: Callable[[str], None] = lambda message: None) -> Placement:
    """The mesh (`mesh`: None, a Mesh, "auto", "AXIS=SIZE,..." or a sizes dict) and the memory plan
    ("auto" or one of memory_plan.PLANS) for these components at this chunk size."""
    memory_plan_lib.check_plan(memory_plan, "memory_plan")
    # Each component is built abstractly once, when first needed, then placed on every candidate mesh.
    abstract = functools.cache(lambda build: None if build is None else nnx.eval_shape(build))
    transformer = abstract(build_transformer)
    graphdef_config = transformer.config
    guided = settings.guidance != "none"

    def others(m):
        return (abstract_bytes_per_device(abstract(build_vae), m)
                + abstract_bytes_per_device(abstract(build_text_encoder), m))

    def compile_chunk(m):
        graphdef, state = parallel.place_abstract(transformer, m)
        spec, inputs, tables = chunk_arguments(graphdef_config, scheduler, settings, m, latent_height=latent_height,
                                               latent_width=latent_width)
        # Under the mesh: the model's activation constraints apply, as when it runs. The abstract
        # parameters are built outside it (their logical axes are not mesh axes).
        with parallel.use_mesh(m):
            return make_chunk_program(graphdef).lower(spec, state, inputs, tables).compile()

    candidates = []

    def choose(devices_):
        chosen, results = mesh_choice.choose_mesh(
            devices_, heads=int(graphdef_config.num_attention_heads), batch=2 if guided else 1,
            compile_chunk=compile_chunk, resident_bytes=others, progress=progress)
        candidates.extend(results)
        return chosen

    resolved = mesh_choice.resolve_mesh(mesh, choose=choose, devices=devices)
    if memory_plan == "auto":
        devices_ = list(resolved.devices.flat) if resolved is not None else list(jax.devices() if devices is None else devices)[:1]
        best = [c for c in candidates if resolved is not None and c.sizes == _nontrivial(dict(resolved.shape))]
        transformer_bytes = abstract_bytes_per_device(transformer, resolved)
        temporaries = (best[0].peak_bytes - others(resolved) - transformer_bytes) if best and best[0].peak_bytes else 0.0
        memory_plan = memory_plan_lib.choose_plan(
            mesh_choice.memory_limit(devices_[0]), transformer_bytes=transformer_bytes,
            vae_bytes=abstract_bytes_per_device(abstract(build_vae), resolved),
            text_bytes=abstract_bytes_per_device(abstract(build_text_encoder), resolved), chunk_temporaries=max(temporaries, 0.0))
    return Placement(resolved, memory_plan, candidates)


def _nontrivial(sizes: dict) -> dict:
    return {axis: size for axis, size in sizes.items() if size > 1}
