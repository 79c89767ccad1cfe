"""`helios-jax aot --task generate`: every program a Distilled generate runs, compiled for a TPU
slice with the placement generate gives it, and the device memory of the whole run per chip.

The programs: the text encoder on one prompt (UMT5-XXL, 512 tokens), the chunk program (3 pyramid
stages x 2 DMD steps at 384x640) and the VAE decode of one chunk (9 latents -> 33 frames). Each
is compiled on the same mesh (`--mesh auto` compiles the chunk program on every candidate layout
first, as generate does). The run's peak per chip is the largest phase of the memory plan
(sampling/memory_plan.py): encoding (the text encoder's program with whatever else stays on the
device), denoising (the chunk program beside the resident VAE and, if kept, the text encoder) and
decoding (the VAE's program beside the transformer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax import parallel
from helios_jax.aot.report import shard_bytes
from helios_jax.aot.steps import LATENT_SIZE, build_mesh, distilled_sampling, model_config, parse_mesh
from helios_jax.sampling import memory_plan as memory_plan_lib
from helios_jax.sampling import parameter_layouts
from helios_jax.sampling.abstract_chunk import batch_sharded, chunk_arguments
from helios_jax.sampling.mesh_choice import GIB, choose_mesh, peak_bytes
from helios_jax.sampling import placement as placement_lib
from helios_jax.sampling.placement import abstract_bytes_per_device
from helios_jax.tpu_topology import hbm_gib, topology_devices

TEXT_TOKENS = 512


@dataclass
class ProgramMemory:
    name: str
    peak_bytes: float  # the compiled program alone: its arguments (parameters included), outputs, temporaries
    parameter_bytes: float  # its component's parameters per device
    compile_seconds: float


@dataclass
class GenerateReport:
    topology: str
    mesh: dict
    devices: int
    device_kind: str
    quantize: str | None
    attention: str
    programs: dict  # name -> ProgramMemory ("text_encoder", "chunk", "vae_decode")
    plans: dict  # memory plan -> peak bytes per chip
    plan: str  # the plan generate would take (the first that fits; the least peak when none does)
    hbm_gib: float | None
    size: tuple = (384, 640)  # height, width in pixels

    @property
    def peak_bytes(self) -> float:
        return self.plans[self.plan]


def component_builders(model: str, attention: str, quantize: str | None) -> dict:
    """Constructors of the 14B (or tiny) transformer, the Wan VAE and UMT5-XXL, quantized as asked."""
    from helios_jax.models import text_encoder_config, vae_config
    from helios_jax.models.text_encoder import UMT5EncoderModel
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.models.vae import AutoencoderKLWan
    from helios_jax.sampling.pipeline import quantized_builder

    config = model_config(model, "rollout", attention)
    tiny = model == "tiny"
    text = text_encoder_config.preset("tiny" if tiny else "umt5_xxl")
    if tiny:
        config.text_dim = text.d_model
    vae = vae_config.preset("tiny" if tiny else "wan2.1")
    return dict(
        transformer=quantized_builder(lambda: HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)), quantize),
        vae=lambda: AutoencoderKLWan(vae, rngs=nnx.Rngs(0)),
        text_encoder=quantized_builder(lambda: UMT5EncoderModel(text, rngs=nnx.Rngs(0)), quantize),
    ), config


def _compile(jitted, args, mesh) -> tuple[object, float]:
    start = time.perf_counter()
    with parallel.use_mesh(mesh):  # the models' activation constraints apply, as when generate runs
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _parameter_bytes(state) -> float:
    return float(sum(shard_bytes(x) for x in jax.tree.leaves(state)))


def compile_chunk(build, config, mesh, latent_size=LATENT_SIZE, quantize=None) -> tuple[ProgramMemory, object]:
    """The chunk program with its parameters in the layouts generate places them in on TPU: the
    compiler's pick for int8 weights, the default ones for bf16 (sampling/parameter_layouts.py)."""
    scheduler, settings = distilled_sampling()
    _, h, w = latent_size
    graphdef, state = parallel.abstract_sharded(build, mesh)
    spec, inputs, tables = chunk_arguments(config, scheduler, settings, mesh, latent_height=h, latent_width=w)
    auto_layouts = parameter_layouts.wants_compiled_layouts(next(iter(mesh.devices.flat)), quantize)
    start = time.perf_counter()
    compiled = parameter_layouts.compile_chunk_program(graphdef, state, (spec, inputs, tables), mesh,
                                                       auto_layouts=auto_layouts)
    seconds = time.perf_counter() - start
    return ProgramMemory("chunk", peak_bytes(compiled), _parameter_bytes(state), seconds), compiled


def compile_text_encoder(build, mesh) -> ProgramMemory:
    from helios_jax.text.prompt_embeddings import trim_and_zero_pad

    graphdef, state = parallel.abstract_sharded(build, mesh)

    def encode(state, input_ids, attention_mask):
        return trim_and_zero_pad(nnx.merge(graphdef, state)(input_ids, attention_mask), attention_mask)

    ids = batch_sharded((1, TEXT_TOKENS), jnp.int32, mesh)
    compiled, seconds = _compile(jax.jit(encode), (state, ids, ids), mesh)
    return ProgramMemory("text_encoder", peak_bytes(compiled), _parameter_bytes(state), seconds)


def compile_vae_decode(build, config, mesh, latent_size=LATENT_SIZE) -> ProgramMemory:
    abstract = nnx.eval_shape(build)
    start = time.perf_counter()
    compiled = placement_lib.compile_vae_decode(abstract, mesh, config.out_channels, latent_size)
    seconds = time.perf_counter() - start
    return ProgramMemory("vae_decode", peak_bytes(compiled), abstract_bytes_per_device(abstract, mesh), seconds)


def plan_peaks(programs: dict) -> dict:
    """Peak bytes per chip of each memory plan: its largest phase."""
    text, chunk, vae = programs["text_encoder"], programs["chunk"], programs["vae_decode"]
    peaks = {}
    for plan in memory_plan_lib.PLANS[1:]:
        if plan == "one_at_a_time":  # each program alone with its own parameters
            peaks[plan] = max(text.peak_bytes, chunk.peak_bytes, vae.peak_bytes)
            continue
        kept_text = text.parameter_bytes if plan == "resident" else 0.0
        beside_encoder = 0.0 if plan == "sequential" else chunk.parameter_bytes + vae.parameter_bytes
        peaks[plan] = max(text.peak_bytes + beside_encoder,
                          chunk.peak_bytes + vae.parameter_bytes + kept_text,
                          vae.peak_bytes + chunk.parameter_bytes + kept_text)
    return peaks


def generate_report(topology: str, *, model: str = "helios_14b", mesh_text: str | None = "auto",
                    quantize: str | None = None, attention: str = "xla", memory_plan: str = "auto",
                    height: int = 384, width: int = 640, progress=lambda message: None) -> GenerateReport:
    """The report of one generate on `topology` at height x width (pixels; multiples of 64)."""
    from helios_jax.sampling.pipeline import check_quantize

    check_quantize(quantize, "--quantize")
    memory_plan_lib.check_plan(memory_plan)
    mesh_text = mesh_text or "auto"
    sizes = None if mesh_text == "auto" else parse_mesh(mesh_text)
    from helios_jax.sampling.pipeline import check_size

    check_size(height, width, stages=3)
    latent_size = (LATENT_SIZE[0], height // 8, width // 8)
    devices = topology_devices(topology)
    builds, config = component_builders(model, attention, quantize)
    hbm = hbm_gib(topology)
    chunks = {}  # chunk programs compiled so far, by mesh layout

    def chunk_on(mesh):
        chunks[tuple(mesh.shape.items())] = compile_chunk(builds["transformer"], config, mesh, latent_size, quantize)
        return chunks[tuple(mesh.shape.items())][1]

    if sizes is None and len(devices) > 1:
        vae = nnx.eval_shape(builds["vae"])
        vae_bytes = lambda mesh: abstract_bytes_per_device(vae, mesh)  # noqa: E731 - resident beside it
        mesh, _ = choose_mesh(devices, heads=int(config.num_attention_heads), batch=1, compile_chunk=chunk_on,
                              resident_bytes=vae_bytes, limit=hbm * GIB if hbm else None, progress=progress)
    else:
        mesh = build_mesh(devices, sizes or {"fsdp": -1})
    progress(f"compiling generate's programs for {topology} on mesh {parallel.describe_sizes(dict(mesh.shape))}")
    if tuple(mesh.shape.items()) not in chunks:
        chunk_on(mesh)
    programs = {"text_encoder": compile_text_encoder(builds["text_encoder"], mesh),
                "chunk": chunks[tuple(mesh.shape.items())][0],
                "vae_decode": compile_vae_decode(builds["vae"], config, mesh, latent_size)}
    for program in programs.values():
        progress(f"  {program.name}: peak {program.peak_bytes / GIB:.2f} GiB per chip "
                 f"({program.compile_seconds:.0f} s to compile)")
    peaks = plan_peaks(programs)
    if memory_plan == "auto":
        fitting = [p for p in peaks if hbm is None or peaks[p] <= memory_plan_lib.HEADROOM * hbm * GIB]
        memory_plan = fitting[0] if fitting else min(peaks, key=peaks.get)
    return GenerateReport(topology, dict(mesh.shape), len(devices), devices[0].device_kind, quantize, attention,
                          programs, peaks, memory_plan, hbm, (height, width))


def format_generate_report(report: GenerateReport) -> list[str]:
    gib = lambda b: f"{b / GIB:8.3f} GiB"  # noqa: E731
    hbm = f"{report.hbm_gib:g} GiB HBM per chip" if report.hbm_gib else "HBM unknown"
    lines = [
        f"topology:     {report.topology} ({report.devices} x {report.device_kind})",
        f"mesh:         {parallel.describe_sizes(report.mesh)}",
        f"task:         generate (Distilled, {report.size[1]}x{report.size[0]}), weights {report.quantize or 'bf16'}, attention {report.attention}",
        "programs (peak per chip of each alone; parameters per chip):",
    ]
    for program in report.programs.values():
        lines.append(f"  {program.name:12s} {gib(program.peak_bytes)}   parameters {gib(program.parameter_bytes)}")
    lines.append("memory plans (the whole generate's peak per chip):")
    for plan, peak in report.plans.items():
        fits = "" if report.hbm_gib is None else ("  fits" if peak <= report.hbm_gib * GIB else "  does NOT fit")
        chosen = "  <- generate takes this" if plan == report.plan else ""
        lines.append(f"  {plan:20s} {gib(peak)}{fits}{chosen}")
    lines.append(f"peak:         {gib(report.peak_bytes)} ({hbm})")
    return lines
