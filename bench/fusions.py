"""What XLA fuses in one Helios block on a TPU, read from the compiled program (no TPU needed).

Issue 8 asks for hand-written fusions (RMSNorm + RoPE on q/k, modulation + LayerNorm) where the
profile shows them worth it. This compiles the transformer with one block at the 384x640 chunk
shape (11,040 tokens with history) for one TPU chip through libtpu, walks the optimised HLO and
prints every memory-bound pass (a fusion with no matmul or kernel in it) with the Python code it
holds (the HLO's source metadata), its HBM bytes and its roofline time (bytes / HBM bandwidth),
against the roofline of the whole block (FLOPs / peak). It then says whether the q/k RMSNorm and
RoPE run as one pass, and whether the modulation and LayerNorm do: the most a hand fusion could
save is what the element-wise passes cost beyond one read and one write of their tensors.

    python bench/fusions.py                               # 14B block, v5p chip, Pallas kernels
    python bench/fusions.py --norm-rope xla               # q/k norm + RoPE as XLA's passes
    python bench/fusions.py --model tiny --topology v5e:1x1   # a quick run
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Per chip: bf16 peak FLOP/s and HBM bytes/s (public Cloud TPU figures).
CHIPS = {"v5p": (459e12, 2.765e12), "v5e": (197e12, 0.819e12), "v6e": (918e12, 1.64e12), "v4": (275e12, 1.2e12)}
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "s64": 8, "f64": 8}
MATMUL_OPS = ("convolution", "dot", "custom-call")
ARRAY = re.compile(r"\b(bf16|f16|f32|s32|u32|pred|s8|u8|s64|f64)\[([\d,]*)\]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="helios_14b", choices=("helios_14b", "tiny"))
    parser.add_argument("--topology", default="v5p:1x1x1", help="one TPU chip, e.g. v5p:1x1x1, v5e:1x1")
    parser.add_argument("--attention", default="pallas_tpu", choices=("xla", "pallas_tpu"))
    parser.add_argument("--norm-rope", default="pallas_tpu", choices=("xla", "pallas_tpu"),
                        help="q/k RMSNorm + RoPE: XLA's passes or the fused Pallas kernel")
    parser.add_argument("--top", type=int, default=25, help="memory-bound passes to list")
    args = parser.parse_args()

    import jax

    from helios_jax.aot import steps
    from helios_jax.models import transformer_config
    from helios_jax.parallel import use_mesh
    from helios_jax.tpu_topology import quiet_libtpu_environment, topology_devices

    quiet_libtpu_environment(args.topology)
    devices = topology_devices(args.topology)
    mesh = steps.build_mesh(devices, {"fsdp": -1})
    config = transformer_config.preset(args.model, num_layers=1, attention_impl=args.attention,
                                       norm_rope_impl=args.norm_rope)
    graphdef, state = steps.abstract_state(config, mesh)
    function, call_args, _ = steps.forward_step(graphdef, state, config, mesh, 1)
    print(f"compiling a 1-block {args.model} forward (384x640 chunk + history) for {args.topology} "
          f"({devices[0].device_kind}), attention {args.attention}, norm + RoPE {args.norm_rope} ...", flush=True)
    with use_mesh(mesh):
        compiled = function.lower(*call_args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak, bandwidth = CHIPS[args.topology.split(":")[0].lower()]
    report(compiled.as_text(), float(cost["flops"]), peak, bandwidth, args.top, jax.__version__)


def report(hlo: str, flops: float, peak: float, bandwidth: float, top: int, version: str) -> None:
    frames = StackFrames(hlo)
    computations = parse_computations(hlo)
    fused = {callee for body in computations.values() for op in body.values() for callee in op["calls"]
             if op["opcode"] == "fusion"}
    passes = []  # (bytes, name, opcode, functions) of the memory-bound top-level ops
    kernel_bytes = 0
    for name, body in computations.items():
        if name in fused:
            continue
        for op in body.values():
            if op["opcode"] in SKIPPED:
                continue
            operand_bytes = sum(body[o]["result_bytes"] for o in op["operands"] if o in body)
            # An async copy moves its operand once (read + write); its copy-done adds nothing.
            nbytes = 2 * operand_bytes if op["opcode"] == "copy-start" else operand_bytes + op["result_bytes"]
            inner = [o for callee in op["calls"] for o in computations.get(callee, {}).values()]
            functions = {frames.innermost(o["frame"]) for o in [op, *inner]} - {None}
            if op["opcode"] in MATMUL_OPS or any(o["opcode"] in MATMUL_OPS for o in inner):
                kernel_bytes += nbytes
                continue
            passes.append((nbytes, op["name"], op["opcode"], functions))
    passes.sort(key=lambda p: -p[0])
    moved = sum(p[0] for p in passes)
    compute_s, memory_s = flops / peak, moved / bandwidth
    print(f"jax {version}; block FLOPs {flops:.3e}: {compute_s * 1e3:.3f} ms at peak; {len(passes)} memory-bound "
          f"passes move {moved / 2**20:.1f} MiB: {memory_s * 1e3:.3f} ms at full HBM bandwidth "
          f"({memory_s / (compute_s + memory_s):.1%} of the block's roofline time); operands and results of "
          f"the matmuls and kernels: {kernel_bytes / 2**20:.1f} MiB")
    print(f"\n{'MiB':>8} {'ms':>7}  op  <- Helios code fused into it")
    for nbytes, name, opcode, functions in passes[:top]:
        print(f"{nbytes / 2**20:8.1f} {nbytes / bandwidth * 1e3:7.3f}  {opcode} {name}  <- "
              f"{', '.join(sorted(functions)) or '(layout change, no Helios code)'}")
    print()
    for a, b, label in (("rms_norm", "apply_rope", "q/k RMSNorm + RoPE"),
                        ("layer_norm", "modulated_norm.fn", "LayerNorm + modulation")):
        touching = [p for p in passes if a in p[3] or b in p[3]]
        both = [p for p in touching if a in p[3] and b in p[3]]
        nbytes = sum(p[0] for p in touching)
        print(f"{label}: {len(touching)} memory-bound pass(es) touch it, {len(both)} hold both; they move "
              f"{nbytes / 2**20:.1f} MiB ({nbytes / bandwidth * 1e3:.3f} ms, "
              f"{nbytes / bandwidth / (compute_s + memory_s):.1%} of the block)")


SKIPPED = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
           "after-all", "partition-id", "replica-id", "copy-done", "opt-barrier")


class StackFrames:
    """The HLO module's stack-frame tables: frame id -> the Helios functions on its stack."""

    def __init__(self, hlo: str):
        self.files, self.names, self.locations, self.parents = {}, {}, {}, {}
        section = None
        for line in hlo.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = line
                continue
            entry = re.match(r"^(\d+) (.*)$", line)
            if not entry or section is None:
                section = None if not line.strip() else section
                continue
            key, value = int(entry.group(1)), entry.group(2)
            if section == "FileNames":
                self.files[key] = value.strip('"')
            elif section == "FunctionNames":
                self.names[key] = value.strip('"')
            elif section == "FileLocations":
                fields = dict(re.findall(r"(\w+)=(\d+)", value))
                self.locations[key] = (int(fields["file_name_id"]), int(fields["function_name_id"]))
            else:
                fields = dict(re.findall(r"(\w+)=(\d+)", value))
                # The table prints a frame's parent as its id + 1 (0: none).
                self.parents[key] = (int(fields["file_location_id"]), int(fields.get("parent_frame_id", 0)) - 1)

    @lru_cache(maxsize=None)
    def innermost(self, frame: int | None) -> str | None:
        """The innermost Helios model or kernel function on the frame's stack, as `outer.inner`
        for a nested function (`modulated_norm.fn`), `Class.method` for a method."""
        seen = set()
        while frame and frame in self.parents and frame not in seen:
            seen.add(frame)
            location, parent = self.parents[frame]
            file_id, function_id = self.locations.get(location, (0, 0))
            if "helios_jax/models" in self.files.get(file_id, "") or "helios_jax/kernels" in self.files.get(file_id, ""):
                parts = self.names.get(function_id, "?").split(".<locals>.")
                return ".".join(parts[-2:]) if len(parts) > 1 else parts[0]
            frame = parent
        return None


def parse_computations(hlo: str) -> dict[str, dict[str, dict]]:
    """{computation: {instruction: {name, opcode, result_bytes, operands, calls, frame}}}."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            current = computations.setdefault(header.group(1), {})
            continue
        if line.startswith("}"):
            current = None
        if current is None or " = " not in line:
            continue
        op = parse_instruction(line)
        if op:
            current[op["name"]] = op
    return computations


def parse_instruction(line: str) -> dict | None:
    match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
    if not match:
        return None
    name, rest = match.groups()
    result_type, rest = _split_type(rest)
    opcode = re.match(r"([\w\-]+)\(", rest)
    if not opcode:
        return None
    operands, attributes = _split_call(rest[opcode.end() - 1:])
    frame = re.search(r"stack_frame_id=(\d+)", attributes)
    return {"name": name, "opcode": opcode.group(1), "result_bytes": _bytes(result_type),
            "operands": re.findall(r"%([\w.\-]+)", operands),
            "calls": re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", attributes),
            "frame": int(frame.group(1)) if frame else None}


def _split_type(text: str) -> tuple[str, str]:
    """(the result type, the rest) of `TYPE opcode(...)...`, TYPE possibly a (tuple, of, types)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and (ch == " " or (ch == ")" and text.startswith("("))):
            return text[:i + 1].strip(), text[i + 1:].lstrip()
    return text, ""


def _split_call(text: str) -> tuple[str, str]:
    """(the operand list, the attributes after it) of `(operands), attributes`."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[1:i], text[i + 1:]
    return text, ""


def _bytes(types: str) -> int:
    return sum(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in ARRAY.findall(types))


if __name__ == "__main__":
    main()
