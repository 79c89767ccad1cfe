"""`helios-jax convert`: diffusers/transformers safetensors -> converted folders, streamed and atomic.

Every source tensor is checked (name, shape, dtype, file integrity) from the safetensors headers
before anything is written; then tensors are read one at a time, put in our layout and dtype, and
written into their leaf (one layer slice at a time for stacked leaves). Peak memory is a constant
plus about two copies of the largest tensor. Output goes to a temporary folder beside DST that is
renamed to DST at the end, so DST never holds a partial conversion.

A converted component folder holds `config.json` (the source's, unchanged), `params/` (see
`param_store`) and `conversion.json` (converter version, dtypes, source files' sizes and hashes).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints_convert import components as comp
from checkpoints_convert.inflight import BufferPool, Hasher, HashingFile, as_array
from checkpoints_convert.key_rules import IGNORED_KEY
from checkpoints_convert.layout_copy import cast_to_layout, our_shape
from checkpoints_convert.param_store import DIRECT_ALIGN, ParamReader, ParamWriter, numpy_dtype
from checkpoints_convert.safetensors_folder import CheckpointError
from checkpoints_convert.safetensors_stream import StreamingFolder

CONVERTER_VERSION = "1.0"
DTYPE_CHOICES = ("bfloat16", "float32", "keep")
CONVERSION_JSON = "conversion.json"
TOKENIZER = "tokenizer"  # copied as is, once check_tokenizer_folder has loaded it
# Keys only the official training module has (spec transformer.md §3.1): skipped, not refused.
OFFICIAL_ONLY = (r"^blocks\.\d+\.attn1\.history_key_scale$", r"^blocks\.\d+\.attn1\.[qkv]_loras\.",
                 r"^gan_heads\.", r"^gan_final_head\.")
# Test hook: SIGKILL this process after writing N tensors (the atomicity test).
KILL_AFTER_ENV = "HELIOS_CONVERT_KILL_AFTER"
# Bytes of the buffers for tensors being read, hashed, converted or written (source buffers plus
# converted copies, reused): enough to overlap reading with converting; the largest tensor (the
# 14B model's fp32 `time_proj`, 629 MB + 315 MB in bf16) passes alone when it does not fit beside others.
MAX_BYTES_IN_FLIGHT = 1 << 30


class LeafPlan:
    def __init__(self, name, var, stacked):
        self.name, self.var, self.stacked = name, var, stacked
        self.shape = tuple(var.shape)
        self.layers = self.shape[0] if stacked else 1
        self.sources: dict[int, str] = {}  # layer (0 for unstacked) -> source key
        self.torch_keys: dict[int, str] = {}
        self.transform = None
        self.dtype = np.dtype(var.dtype)


class ComponentPlan:
    """A checked mapping of one source component folder onto our tree; nothing read but headers."""

    def __init__(self, folder: Path, dtype: str | None, expected_kind: str | None = None):
        self.folder = Path(folder)
        self.config_json = comp.read_config(self.folder)
        self.component = comp.component_of(self.folder, self.config_json, expected_kind)
        if self.component.derive is not None:  # its config.json would not say how to restore it
            raise CheckpointError(f"{self.folder / 'config.json'}: {self.config_json.get('_class_name')} is not "
                                  "converted; load the folder directly (helios_jax.load / --config.model.init)")
        self.reader = StreamingFolder(self.folder)
        keep = dtype == "keep"
        config, _, _, variables = comp.build_abstract(self.component, self.folder, self.config_json,
                                                   None if keep else dtype)
        self.leaves = {name: LeafPlan(name, var, comp.is_stacked(var)) for name, var in variables.items()}
        self.skipped = []
        key_map, keys = self.component.key_map, self.component.wrap_reader(self.reader).keys()
        for key in keys:
            self._place(key, key_map)
        for leaf in self.leaves.values():
            missing = [layer for layer in range(leaf.layers) if layer not in leaf.sources]
            if missing:
                raise CheckpointError(f"{self.folder}: missing tensor {self._expected_key(leaf, missing[0])}")
        if keep:  # each leaf as stored; the model then runs in fp32 unless every tensor is half precision
            for leaf in self.leaves.values():
                leaf.dtype = self.reader.info(leaf.sources[0]).dtype
            stored = {leaf.dtype.name for leaf in self.leaves.values()}
            self.model_dtype = stored.pop() if len(stored) == 1 else "float32"
        else:
            self.model_dtype = config.dtype
        self.tensor_keys = sorted((k for leaf in self.leaves.values() for k in leaf.sources.values()),
                                  key=lambda k: (str(self.reader.file_of(k)), self.reader.info(k).offset))

    def _place(self, key: str, key_map) -> None:
        where, info = self.reader.file_of(key), self.reader.info(key)
        target = key_map.locate(key)
        if target is IGNORED_KEY:
            self.skipped.append(key)
            return
        if target is None or target.path not in self.leaves:
            if self.component.kind == "transformer" and any(re.search(p, key) for p in OFFICIAL_ONLY):
                self.skipped.append(key)
                return
            raise CheckpointError(f"{where}: unexpected tensor {key} (no place in {self.component.kind})")
        leaf = self.leaves[target.path]
        if (target.layer is not None) != leaf.stacked or (leaf.stacked and target.layer >= leaf.layers):
            raise CheckpointError(f"{where}: unexpected tensor {key} (layer {target.layer} of {leaf.layers})")
        layer = target.layer or 0
        shape = key_map.to_our_layout(np.broadcast_to(np.zeros((), info.dtype), info.shape), target.transform).shape
        expected = leaf.shape[1:] if leaf.stacked else leaf.shape
        if tuple(shape) != tuple(expected):
            torch_shape = key_map.to_torch_layout(np.broadcast_to(np.zeros(()), expected), target.transform).shape
            raise CheckpointError(f"{where}: tensor {key} has shape {list(info.shape)}, expected {list(torch_shape)}")
        if layer in leaf.sources:
            raise CheckpointError(f"{where}: tensor {key} given twice (also as {leaf.sources[layer]})")
        leaf.sources[layer] = key
        leaf.torch_keys[layer] = self.component.torch_key(key, target)
        leaf.transform = target.transform

    def _expected_key(self, leaf: LeafPlan, layer: int) -> str:
        if leaf.stacked and leaf.torch_keys:  # a sibling layer's name with this layer's index
            sibling, name = next(iter(leaf.torch_keys.items()))
            return re.sub(rf"\.{sibling}\.", f".{layer}.", name, count=1)
        inverse = getattr(self.component.key_map, "torch_key_of", None)
        try:
            key = inverse(leaf.name, layer) if self.component.kind == "text_encoder" else inverse(leaf.name)[0]
            return key
        except (TypeError, KeyError, ValueError):  # no inverse map: name our parameter instead
            return f"for parameter {leaf.name}" + (f" (layer {layer})" if leaf.stacked else "")

    @property
    def total_bytes(self) -> int:
        return sum(self.reader.info(k).nbytes for k in self.tensor_keys)


class _Progress:
    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                        disable=not enabled, dynamic_ncols=True)
        self.total_tensors, self.tensors = total_tensors, 0

    def update(self, component: str, nbytes: int) -> None:
        self.tensors += 1
        self.bar.set_postfix_str(f"{component} {self.tensors}/{self.total_tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self):
        self.bar.close()


def write_component(plan: ComponentPlan, dst: Path, progress: _Progress, dtype_option: str | None) -> None:
    dst.mkdir(parents=True)
    writer = ParamWriter(dst / "params")
    for leaf in plan.leaves.values():
        writer.create(leaf.name, leaf.shape, leaf.dtype, stacked=leaf.stacked, transform=leaf.transform,
                      source_keys=[leaf.sources[i] for i in range(leaf.layers)],
                      torch_keys=[leaf.torch_keys[i] for i in range(leaf.layers)])
    where = {key: (leaf, layer) for leaf in plan.leaves.values() for layer, key in leaf.sources.items()}
    by_file = {path: [] for path in plan.reader.files}
    for key in plan.tensor_keys:  # already in file and offset order
        by_file[plan.reader.file_of(key)].append(key)
    # The main thread reads; one worker casts, lays out and writes; the hasher hashes what was read.
    # A tensor's source buffer goes back to the pool once both are done with it.
    pool, hasher = BufferPool(MAX_BYTES_IN_FLIGHT), Hasher()
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0"))
    written, lock, failures = [0], threading.Lock(), []

    def layout(leaf):
        return lambda a: plan.component.key_map.to_our_layout(a, leaf.transform)

    def convert_one(key, source, source_buffer, out_buffer, hashed):
        leaf, layer = where[key]
        try:
            shape = our_shape(source.shape, layout(leaf))
            array = cast_to_layout(source, leaf.dtype, layout(leaf), out=as_array(out_buffer, shape, leaf.dtype))
            writer.write(leaf.name, layer if leaf.stacked else None, array)
            with lock:
                written[0] += 1
                progress.update(plan.component.kind, source.nbytes)
                if kill_after and written[0] >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        except BaseException as error:
            failures.append(error)
        finally:
            pool.give(out_buffer)
            hashed.wait()  # the hasher may still be reading the source buffer
            pool.give(source_buffer)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert") as workers:
        try:
            for path, keys in by_file.items():
                file = HashingFile(path, hasher, pool)
                try:
                    for key in keys:
                        if failures:
                            raise failures[0]
                        info, leaf = plan.reader.info(key), where[key][0]
                        converted_bytes = info.nbytes // info.dtype.itemsize * leaf.dtype.itemsize
                        file.hash_up_to(info.offset)  # (takes buffers itself: not while holding this tensor's)
                        source_buffer, out_buffer = pool.take(info.nbytes + 2 * DIRECT_ALIGN, converted_bytes)
                        hashed = threading.Event()
                        start = file.read_tensor(source_buffer, info.offset, info.nbytes, hashed.set)
                        source = as_array(source_buffer[start:], info.shape, info.dtype)
                        workers.submit(convert_one, key, source, source_buffer, out_buffer, hashed)
                        del source, source_buffer, out_buffer  # the worker's now: a dropped buffer can be freed
                    file.finish()
                finally:
                    file.close()
        except BaseException:
            workers.shutdown(cancel_futures=True)
            hasher.finish()
            raise
    hashes = hasher.finish()
    if failures:
        raise failures[0]
    writer.finish()
    shutil.copy2(plan.folder / "config.json", dst / "config.json")
    stored = {}
    for leaf in plan.leaves.values():
        stored[leaf.dtype.name] = stored.get(leaf.dtype.name, 0) + 1
    metadata = {
        "converter_version": CONVERTER_VERSION,
        "component": plan.component.kind,
        "dtype": plan.model_dtype,
        "dtype_option": dtype_option or "default",
        "stored_dtypes": stored,
        "source_dtypes": sorted({plan.reader.info(k).dtype.name for k in plan.tensor_keys}),
        "tensors": len(plan.tensor_keys),
        "skipped_tensors": plan.skipped,
        "source_files": [{"name": path.name, "size": path.stat().st_size, "sha256": hashes[path]}
                         for path in plan.reader.files],
    }
    (dst / CONVERSION_JSON).write_text(json.dumps(metadata, indent=1))


def plan_source(src: Path, dtype: str | None, selected=None):
    """(component plans by destination subfolder, folders to copy, is_model_folder), all checked."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    if not (src / "model_index.json").is_file():
        if not (src / "config.json").is_file():
            raise CheckpointError(f"{src}: neither model_index.json nor config.json (not a diffusers folder)")
        plan = ComponentPlan(src, dtype)
        if selected and plan.component.kind not in selected:
            raise CheckpointError(f"{src}: holds a {plan.component.kind}, not {', '.join(selected)}")
        return {".": plan}, [], False
    try:
        index = json.loads((src / "model_index.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{src / 'model_index.json'}: invalid JSON ({error})") from None
    listed = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
              and value[0] is not None and (src / name).is_dir()]
    for name in selected or ():
        if name not in listed:
            raise CheckpointError(f"{src}: no component {name!r} (has {', '.join(listed)})")
    chosen = [name for name in listed if not selected or name in selected]
    copies = [name for name in chosen if name not in comp.KINDS]
    if TOKENIZER in copies:  # checked before the weights' headers: a bad tokenizer fails at once
        from helios_jax.text.tokenizer import check_tokenizer_folder

        check_tokenizer_folder(src / TOKENIZER)
    plans = {name: ComponentPlan(src / name, dtype, expected_kind=name) for name in chosen if name in comp.KINDS}
    return plans, copies, True


def clean_stale_temporaries(dst: Path) -> None:
    """Remove temporaries of DST left by conversions that were killed (their process is gone)."""
    for path in dst.parent.glob(f".{dst.name}.tmp-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move a finished temporary folder to DST, replacing an old DST only once the new one is complete."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists (use --overwrite)")
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def convert(src, dst, *, components=None, dtype=None, overwrite=False, verify=False, progress=True) -> Path:
    """Convert SRC (a diffusers model folder or one component folder) to DST; returns DST.

    dtype: "bfloat16", "float32", "keep" (as stored) or None (each component's spec dtype)."""
    src, dst = Path(src), Path(dst)
    if dtype not in (None, *DTYPE_CHOICES):
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists (use --overwrite)")
    plans, copies, model_folder = plan_source(src, dtype, components)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    bar = _Progress(sum(p.total_bytes for p in plans.values()), sum(len(p.tensor_keys) for p in plans.values()),
                    progress)
    try:
        if model_folder:
            tmp.mkdir()
            shutil.copy2(src / "model_index.json", tmp / "model_index.json")
            for name in copies:
                shutil.copytree(src / name, tmp / name)
        for name, plan in plans.items():
            write_component(plan, tmp / name if model_folder else tmp, bar, dtype)
        bar.close()
        os.sync()  # the chunks were written without fsync; make them durable before DST appears
        publish(tmp, dst, overwrite)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verify:
        for name, plan in plans.items():
            verify_component(plan.folder, dst / name if model_folder else dst)
    return dst


def verify_component(src: Path, converted: Path, sample: int = 8, seed: int = 0) -> int:
    """Re-read `sample` tensors (first, last and random ones) from both sides and compare them
    bit for bit after the layout and dtype change; returns the number compared."""
    reader, params = StreamingFolder(src), ParamReader(Path(converted) / "params")
    key_map = comp.component_of(src, comp.read_config(src)).key_map
    entries = [(name, layer, key) for name, leaf in params.leaves.items()
               for layer, key in enumerate(leaf["source_keys"])]
    chosen = entries[:1] + entries[-1:] + random.Random(seed).sample(entries, min(sample, len(entries)))
    for name, layer, key in chosen:
        leaf = params.leaves[name]
        if key not in reader.keys():
            raise CheckpointError(f"{src}: tensor {key} recorded in {converted} is not in the source")
        expected = key_map.to_our_layout(reader.read(key), leaf["transform"]).astype(numpy_dtype(leaf["dtype"]))
        stored = params.read(name, layer if leaf["stacked"] else ())
        if stored.shape != expected.shape or stored.tobytes() != expected.tobytes():
            raise CheckpointError(f"{converted}: parameter {name} differs from source tensor {key}")
    return len(chosen)


def verify(src, dst) -> int:
    """`convert --verify` on an existing DST: compare a sample of tensors of each component."""
    src, dst = Path(src), Path(dst)
    if not dst.is_dir():
        raise CheckpointError(f"{dst}: no such folder")
    plans, _, model_folder = plan_source(src, None)
    targets = {name: dst / name if model_folder else dst for name in plans}
    present = {name: folder for name, folder in targets.items() if (folder / CONVERSION_JSON).is_file()}
    if not present:
        raise CheckpointError(f"{dst}: no converted component to verify (no {CONVERSION_JSON})")
    return sum(verify_component(plans[name].folder, folder) for name, folder in present.items())
