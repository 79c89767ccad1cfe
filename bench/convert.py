"""Peak host memory and throughput of `helios-jax convert` on a synthetic Helios transformer.

Builds a diffusers-format transformer folder with N blocks of the real 14B shapes (fp32; key names
and shapes from diffusers' own class, instantiated on the meta device) plus the full top level,
one shard per block as the released checkpoints shard, then for each N:

- reads every source file once (plain sequential reads; the time "to simply read the files"),
- converts it in a fresh subprocess (`checkpoints_convert.convert.convert`), reporting that
  process's peak RSS (`VmHWM`), MB/s of source bytes (conversion call only; the process time
  with imports is printed beside it), and the peak RSS of an import-only process.

Both timed passes start from the same page-cache state of the source files (`--cache`): "cold"
(cached pages dropped first: disk reads, as for a freshly downloaded checkpoint) and/or "warm"
(read once first: page-cache reads, a memcpy). The conversion also writes its output and syncs it
to disk, which the plain read does not. Run on a quiet machine. Needs about 2.5 + 1.4 N GB of disk per N (fp32
source) plus the converted copy.

    python bench/convert.py --blocks 1 4 --workdir /tmp/helios-convert-bench
    python bench/convert.py --blocks 1 2 --small   # tiny shapes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, text_dim=64, rope_dim=[12, 10, 10])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4], help="values of N")
    parser.add_argument("--workdir", default="/tmp/helios-convert-bench")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "keep"),
                        help="convert --dtype (default: the spec's, bf16 with fp32 islands)")
    parser.add_argument("--small", action="store_true", help="small shapes instead of the 14B ones")
    parser.add_argument("--cache", nargs="+", default=["cold", "warm"], choices=("cold", "warm"),
                        help="page-cache state of the source files before each timed pass (both passes alike)")
    parser.add_argument("--keep-files", action="store_true")
    return parser.parse_args(argv)


def diffusers_config(blocks: int, small: bool) -> dict:
    from helios_jax.models.transformer_config import DIFFUSERS_FIELDS

    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in DIFFUSERS_FIELDS.items()}
    return {"_class_name": "HeliosTransformer3DModel", **fields, **(SMALL if small else {}), "num_layers": blocks}


def write_checkpoint(folder: Path, config: dict) -> int:
    """Write the synthetic folder; returns its size in bytes. One tensor in memory at a time."""
    import torch
    from diffusers import HeliosTransformer3DModel

    from checkpoints_convert.safetensors_stream import write_file

    with torch.device("meta"):
        model = HeliosTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    groups: dict[str, list] = {}
    for key, shape in shapes.items():
        group = f"block{key.split('.')[1]}" if key.startswith("blocks.") else "top"
        groups.setdefault(group, []).append(key)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = sorted(groups, key=lambda g: (g != "top", int(g[5:]) if g != "top" else 0))
    weight_map = {}
    for number, group in enumerate(names, 1):
        name = f"diffusion_pytorch_model-{number:05d}-of-{len(names):05d}.safetensors"
        entries = [(key, shapes[key], np.float32, lambda s=shapes[key]: rng.random(s, dtype=np.float32))
                   for key in groups[group]]
        write_file(folder / name, entries, metadata={"format": "pt"})
        weight_map.update({key: name for key in groups[group]})
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return total


def set_cache_state(folder: Path, state: str) -> None:
    """Put the source files in `state` before a timed pass, so that the plain read and the
    conversion start alike: "warm" reads them once (the page cache then holds them, if it can),
    "cold" asks the kernel to drop their cached pages (posix_fadvise DONTNEED; the files were
    fsynced when written, so their pages are clean and are dropped)."""
    for path in sorted(folder.glob("*.safetensors")):
        if state == "warm":
            plain_read_file(path)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def plain_read_file(path: Path, buffer=None) -> None:
    buffer = buffer or bytearray(16 << 20)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass


def plain_read(folder: Path) -> float:
    """Seconds to read every safetensors file of `folder` sequentially."""
    start = time.perf_counter()
    buffer = bytearray(16 << 20)
    for path in sorted(folder.glob("*.safetensors")):
        plain_read_file(path, buffer)
    return time.perf_counter() - start


MEASURE = """
import os, time
start = time.perf_counter()
{setup}
timed, cpu = time.perf_counter(), os.times()
{body}
end, cpu_end = time.perf_counter(), os.times()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
cpu_s = cpu_end.user + cpu_end.system - cpu.user - cpu.system
print(end - timed, end - start, peak * 1024, cpu_s)
"""


def in_subprocess(setup: str, body: str = "pass") -> tuple[float, float, int, float]:
    """(seconds of `body`, seconds of the process after start-up, peak RSS bytes, CPU seconds of
    `body` over all threads): `setup` then `body` run in a fresh Python process."""
    code = MEASURE.format(setup=setup, body=body)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    seconds, total, rss, cpu = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(total), int(rss), float(cpu)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    gib, mb = 1024**3, 1e6
    imports = "from checkpoints_convert.convert import convert\nimport helios_jax.models.transformer"
    _, _, baseline, _ = in_subprocess(imports)
    print(f"import-only process peak RSS: {baseline / gib:.2f} GiB")
    print(f"{'N':>3} {'cache':>5} {'source GB':>10} {'read s':>8} {'read MB/s':>10} {'convert s':>10} "
          f"{'convert MB/s':>13} {'ratio':>6} {'CPU s':>6} {'with imports s':>15} {'peak RSS GiB':>13}")
    rows = []
    for blocks in args.blocks:
        src, dst = work / f"src-{blocks}", work / f"dst-{blocks}"
        total = write_checkpoint(src, diffusers_config(blocks, args.small))
        for cache in args.cache:
            set_cache_state(src, cache)
            read_s = plain_read(src)
            shutil.rmtree(dst, ignore_errors=True)
            set_cache_state(src, cache)
            dtype = f", dtype={args.dtype!r}" if args.dtype else ""
            convert_s, process_s, rss, cpu_s = in_subprocess(
                imports, f"convert({str(src)!r}, {str(dst)!r}, progress=False{dtype})")
            row = dict(blocks=blocks, cache=cache, source_bytes=total, read_s=read_s, convert_s=convert_s,
                       process_s=process_s, cpu_s=cpu_s, peak_rss=rss, read_mb_s=total / mb / read_s,
                       convert_mb_s=total / mb / convert_s)
            rows.append(row)
            print(f"{blocks:>3} {cache:>5} {total / 1e9:>10.2f} {read_s:>8.1f} {row['read_mb_s']:>10.0f} "
                  f"{convert_s:>10.1f} {row['convert_mb_s']:>13.0f} {row['convert_mb_s'] / row['read_mb_s']:>6.2f} "
                  f"{cpu_s:>6.1f} {process_s:>15.1f} {rss / gib:>13.2f}", flush=True)
        if not args.keep_files:
            shutil.rmtree(src)
            shutil.rmtree(dst)
    print(json.dumps({"baseline_rss": baseline, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
