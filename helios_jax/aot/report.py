"""Compile one step for a TPU slice and read the compiler's memory plan and cost: `compile_report`
and the lines `helios-jax aot` prints (`format_report`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import numpy as np

from helios_jax.aot import TASKS
from helios_jax.aot.steps import (LATENT_SIZE, STEPS, TRAINING_TASKS, AotError, abstract_state, build_mesh,
                                  model_config, parse_mesh)
from helios_jax.parallel import describe_sizes, use_mesh
from helios_jax.tpu_topology import hbm_gib, topology_devices

GIB = 1024**3

# HBM per chip (GiB), by the topology name's generation prefix.


@dataclass
class Report:
    topology: str
    task: str
    model: str
    mesh: dict
    devices: int
    device_kind: str
    parameters: int
    parameter_bytes_per_device: float
    argument_bytes: float
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    code_bytes: float
    flops_per_device: float
    model_flops: float
    compile_seconds: float
    hbm_gib: float | None
    attention: str = "xla"

    @property
    def peak_bytes(self) -> float:
        # What the compiled program holds at once on one device: its buffers (outputs that alias
        # donated arguments counted once), the temporaries' high-water mark and the code.
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_gib is None else self.peak_bytes <= self.hbm_gib * GIB


def compile_report(topology: str, *, model: str = "helios_14b", task: str = "forward", mesh_text: str | None = None,
                   batch: int | None = None, attention: str = "xla", progress=lambda message: None) -> Report:
    if task not in TASKS:
        raise AotError(f"--task must be one of {', '.join(TASKS)}; got {task!r}")
    sizes = parse_mesh(mesh_text)  # a typo in --mesh is reported before libtpu is loaded
    devices = topology_devices(topology)
    mesh = build_mesh(devices, sizes)
    config = model_config(model, task, attention)
    if batch is None:
        # Training fills every data-parallel rank with one sample; sampling makes one video.
        batch = mesh.shape["data"] * mesh.shape["fsdp"] if task in TRAINING_TASKS else 1
    if batch < 1:
        raise AotError(f"--batch must be positive; got {batch}")
    graphdef, state = abstract_state(config, mesh)
    parameters = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
    per_device = sum(shard_bytes(x) for x in jax.tree.leaves(state))
    function, args, model_flops = STEPS[task](graphdef, state, config, mesh, batch)
    progress(f"compiling {task} of {model} for {topology} ({len(devices)} x {devices[0].device_kind}), "
             f"mesh {describe_mesh(dict(mesh.shape))}, batch {batch}, attention {attention}")
    start = time.perf_counter()
    try:
        # Under the mesh: the model's activation constraints apply, and a Pallas TPU kernel (which the
        # compiler cannot partition) shards itself with a shard_map over the mesh's axes.
        with use_mesh(mesh):
            compiled = function.lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        # The TPU compiler refuses a program whose buffers exceed HBM: that is an answer, say it in one line.
        message = str(error).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        raise AotError(f"--topology {topology}: {task} of {model} (mesh {describe_mesh(dict(mesh.shape))}, batch {batch}) "
                       f"does NOT fit: {message}") from None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per module
    return Report(
        topology=topology, task=task, model=model, mesh=dict(mesh.shape), devices=len(devices),
        device_kind=devices[0].device_kind, parameters=parameters, parameter_bytes_per_device=per_device,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, flops_per_device=float(cost.get("flops", float("nan"))),
        model_flops=model_flops,
        compile_seconds=seconds, hbm_gib=hbm_gib(topology), attention=attention,
    )


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shard = x.sharding.shard_shape(x.shape)
    return math.prod(shard) * np.dtype(x.dtype).itemsize


describe_mesh = describe_sizes


def format_report(report: Report) -> list[str]:
    gib = lambda b: f"{b / GIB:8.3f} GiB"  # noqa: E731
    fits = {None: "unknown HBM size for this generation", True: "fits", False: "does NOT fit"}[report.fits]
    hbm = f"{report.hbm_gib:g} GiB HBM per chip" if report.hbm_gib else "HBM unknown"
    return [
        f"topology:     {report.topology} ({report.devices} x {report.device_kind})",
        f"mesh:         {describe_mesh(report.mesh)}",
        f"task:         {report.task} of {report.model} at 384x640 (latent {'x'.join(map(str, LATENT_SIZE))}), "
        f"attention {report.attention}",
        f"parameters:   {report.parameters:,} ({report.parameter_bytes_per_device / GIB:.3f} GiB per device)",
        "memory per device:",
        f"  arguments   {gib(report.argument_bytes)}",
        f"  outputs     {gib(report.output_bytes)}",
        f"  aliased     {gib(report.alias_bytes)}",
        f"  temporaries {gib(report.temp_bytes)}",
        f"  code        {gib(report.code_bytes)}",
        f"  peak        {gib(report.peak_bytes)}  ({fits}: {hbm})",
        # XLA's cost analysis counts the body of a loop once: the 40 scanned blocks count as one.
        f"FLOPs:        {report.flops_per_device:.4g} per device by XLA's cost analysis (a loop body counted once)",
        f"model FLOPs:  {report.model_flops:.4g} per step, {report.model_flops / report.devices:.4g} per device "
        f"(matmuls, helios_jax.models.flops)",
        f"compile time: {report.compile_seconds:.1f} s",
    ]

