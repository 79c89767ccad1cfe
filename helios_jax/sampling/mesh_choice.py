"""`--mesh auto`: the mesh generate and serve run on, picked by the compiled chunk program.

Every device of the host (every host's, multi-host) is used. Each candidate layout (FSDP over
all devices; tensor parallel x FSDP where the heads divide; data x FSDP when guidance doubles
the batch) is compiled for the real chunk shapes with abstract parameters: nothing is loaded or
allocated. The compiler's memory plan says whether it fits next to the other resident components,
and its cost analysis (FLOPs and HBM bytes of the program, bytes its collectives move) gives a
time estimate against the chip's peak numbers; the fastest candidate that fits wins. With one
device there is nothing to choose and nothing is compiled.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import jax
from jax.sharding import Mesh

from helios_jax import parallel

AUTO = "auto"
GIB = 1024**3

# Peak dense bf16 FLOP/s, HBM bytes/s, interconnect bytes/s per chip, by device kind (datasheets).
# Only ratios between candidates matter, so rough numbers suffice; unknown kinds use the last row.
DEVICE_SPEEDS = (
    ("v5 lite", 197e12, 819e9, 200e9), ("v5e", 197e12, 819e9, 200e9), ("v6", 918e12, 1640e9, 448e9),
    ("v5p", 459e12, 2765e9, 600e9), ("v5", 459e12, 2765e9, 600e9), ("v4", 275e12, 1200e9, 300e9),
    ("h200", 989e12, 4800e9, 450e9), ("h100", 989e12, 3350e9, 450e9), ("a100", 312e12, 2039e9, 300e9),
    ("", 1e12, 100e9, 10e9),
)
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclass
class Candidate:
    sizes: dict
    peak_bytes: float | None = None  # the chunk program's buffers + temporaries + other residents, per device
    seconds: float | None = None  # estimated time of one chunk program
    fits: bool | None = None  # None: the device reports no memory limit
    error: str | None = None  # compile failed

    def describe(self) -> str:
        name = parallel.describe_sizes(self.sizes)
        if self.error:
            return f"{name}: not compiled ({self.error})"
        fit = {True: "fits", False: "does NOT fit", None: "no memory limit known"}[self.fits]
        return f"{name}: peak {self.peak_bytes / GIB:.2f} GiB per device ({fit}), ~{self.seconds * 1e3:.1f} ms"


def check_mesh_flag(text: str | None, device_count: int, flag: str = "--mesh") -> None:
    """Reject a bad --mesh before anything is built: unknown axis, bad size, not all devices."""
    if text is None or text == AUTO:
        return
    sizes = parallel.parse_mesh_sizes(text, flag)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if (-1 in sizes.values() and device_count % fixed) or (-1 not in sizes.values() and fixed != device_count):
        raise ValueError(f"{flag} {text}: a mesh of {fixed} devices does not match the {device_count} devices here "
                         "(the axes' product must be the device count; one size may be -1)")


def resolve_mesh(mesh, *, choose: Callable[[list], Mesh | None], devices=None, flag: str = "--mesh") -> Mesh | None:
    """A Mesh, None (one device), "auto" (`choose(devices)`), "AXIS=SIZE,..." or a sizes dict -> the
    mesh to place the components on; None where the mesh has a single device."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh if mesh is None or mesh.size > 1 else None
    devices = list(jax.devices() if devices is None else devices)
    if mesh == AUTO:
        return choose(devices) if len(devices) > 1 else None
    sizes = parallel.parse_mesh_sizes(mesh, flag) if isinstance(mesh, str) else dict(mesh)
    built = parallel.mesh_over_all(sizes, devices, flag)
    return built if built.size > 1 else None


def candidate_sizes(devices: int, heads: int, batch: int) -> list[dict]:
    """FSDP over all devices first (no activation traffic but the weights' all-gathers), then
    tensor x FSDP for head-dividing tensor sizes up to 8, and data x FSDP when there are two
    samples (guidance)."""
    candidates = [{"fsdp": devices}]
    for tensor in (2, 4, 8):
        if tensor <= devices and devices % tensor == 0 and heads % tensor == 0:
            candidates.append({"tensor": tensor, "fsdp": devices // tensor} if devices > tensor else {"tensor": tensor})
    if batch % 2 == 0 and devices % 2 == 0 and devices > 2:
        candidates.append({"data": 2, "fsdp": devices // 2})
    return candidates


def device_speeds(device) -> tuple[float, float, float]:
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, flops, hbm, link in DEVICE_SPEEDS:
        if name in kind:
            return flops, hbm, link
    raise AssertionError("DEVICE_SPEEDS ends with a catch-all row")


def collective_bytes(hlo_text: str) -> int:
    """Bytes the program's collectives produce (their result shapes), a proxy for link traffic."""
    total = 0
    for match in _COLLECTIVE.finditer(hlo_text):
        for dtype, dims in _ARRAY.findall(match.group(1)):
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def estimate_seconds(compiled, device) -> float:
    """Roofline time of one run: matmul FLOPs at peak, HBM bytes at bandwidth, collectives over the
    links (XLA counts a loop body once, the same for every candidate: only ratios are meant)."""
    flops_peak, hbm, link = device_speeds(device)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return max(flops / flops_peak, accessed / hbm) + collective_bytes(compiled.as_text()) / link


def peak_bytes(compiled) -> float:
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)


def memory_limit(device) -> int | None:
    """Bytes a device can hold (None where it does not say: CPU, abstract TPU devices)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - abstract and some CPU devices have no stats
        return None
    return (stats or {}).get("bytes_limit")


def evaluate(sizes: dict, devices: list, compile_chunk: Callable[[Mesh], object],
             resident_bytes: Callable[[Mesh], float], limit: int | None) -> Candidate:
    """Compile the chunk program on one candidate mesh and read its memory plan and cost."""
    mesh = parallel.make_mesh(**sizes, devices=devices)
    try:
        compiled = compile_chunk(mesh)  # lowers under the mesh itself
    except Exception as error:  # noqa: BLE001 - a layout the compiler refuses (e.g. out of memory) is skipped
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return Candidate(sizes, error=f"{type(error).__name__}: {first[:200]}")
    peak = peak_bytes(compiled) + resident_bytes(mesh)
    return Candidate(sizes, peak, estimate_seconds(compiled, devices[0]), None if limit is None else peak <= limit)


def choose_mesh(devices: list, *, heads: int, batch: int, compile_chunk: Callable[[Mesh], object],
                resident_bytes: Callable[[Mesh], float] = lambda mesh: 0.0, limit: int | None = None,
                progress: Callable[[str], None] = lambda message: None) -> tuple[Mesh, list[Candidate]]:
    """The fastest candidate mesh over `devices` whose chunk program fits (with the other resident
    components, `resident_bytes(mesh)` per device) in `limit` bytes; every candidate's result."""
    limit = memory_limit(devices[0]) if limit is None else limit
    results = []
    for sizes in candidate_sizes(len(devices), heads, batch):
        results.append(evaluate(sizes, devices, compile_chunk, resident_bytes, limit))
        progress(f"mesh auto: {results[-1].describe()}")
    usable = [c for c in results if c.error is None and c.fits is not False]
    if not usable:
        compiled = [c for c in results if c.error is None]
        smallest = min(compiled, key=lambda c: c.peak_bytes) if compiled else None
        detail = (f"the smallest peak is {smallest.peak_bytes / GIB:.1f} GiB per device on "
                  f"{parallel.describe_sizes(smallest.sizes)}, over the {limit / GIB:.1f} GiB each device holds"
                  if smallest else "no candidate compiled: " + "; ".join(c.describe() for c in results))
        raise ValueError(f"--mesh auto: no mesh over the {len(devices)} devices fits: {detail} "
                         "(try --quantize int8 or more devices)")
    best = min(usable, key=lambda c: c.seconds)
    progress(f"mesh auto: chose {parallel.describe_sizes(best.sizes)}")
    return parallel.make_mesh(**best.sizes, devices=devices), results
