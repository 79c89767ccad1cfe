"""`helios-jax convert` / `export`: round trips through diffusers and transformers for all three
components, dtypes, whole model folders, verification, mesh restore, atomicity and bad input."""
import hashlib
import threading
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan as TorchVAE
from diffusers import HeliosTransformer3DModel as TorchHelios
from flax import nnx
from transformers import UMT5EncoderModel as TorchUMT5

import helios_jax
from checkpoints_convert import convert as convert_module
from checkpoints_convert import transformer_keys, vae_keys
from checkpoints_convert.convert import KILL_AFTER_ENV, convert
from checkpoints_convert.inflight import BufferPool, Hasher, HashingFile
from checkpoints_convert.layout_copy import cast_to_layout
from checkpoints_convert.safetensors_stream import StreamingFolder
from checkpoints_convert.export import export
from checkpoints_convert.param_store import ParamReader
from helios_jax.cli import main
from tests import diffusers_reference, transformers_reference, vae_reference
from tests.test_transformer_parity import make_inputs
from tests.xla_flags import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]


def _state(module):
    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(module))}


def _same_state(a, b):
    a, b = _state(a), _state(b)
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bit_identical(torch_a, torch_b):
    a, b = torch_a.state_dict(), torch_b.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def write_tiny_tokenizer(folder):
    """A valid tokenizer/ folder: a character-level Unigram tokenizer.json (convert loads it first)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["▁", -2.0]] + [[c, -3.0] for c in letters]
    added = [{"id": i, "content": t, "special": True} for i, t in enumerate(["<pad>", "</s>", "<unk>"])]
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": vocab},
                                                       "added_tokens": added}))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}')


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A diffusers model folder with tiny random components; the transformer sharded."""
    root = tmp_path_factory.mktemp("model")
    transformer = diffusers_reference.build_reference(seed=1)
    vae = vae_reference.build_reference(seed=2, **vae_reference.TINY_CONFIGS["minimal_3d"])
    text_encoder = transformers_reference.build_reference("tiny", seed=3)
    transformer.save_pretrained(root / "transformer", max_shard_size="40KB")
    vae.save_pretrained(root / "vae")
    text_encoder.save_pretrained(root / "text_encoder")
    write_tiny_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "HeliosScheduler"}')
    index = {"_class_name": "HeliosPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "HeliosTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "AutoTokenizer"],
             "scheduler": ["diffusers", "HeliosScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def round_trip(model_folder, tmp_path_factory):
    """The model folder converted with --dtype keep and exported back."""
    src, _ = model_folder
    out = tmp_path_factory.mktemp("round_trip")
    convert(src, out / "converted", dtype="keep", verify=True, progress=False)
    export(out / "converted", out / "exported", max_shard_bytes=60_000, progress=False)
    return out / "converted", out / "exported"


def test_whole_folder_layout_and_carried_files(model_folder, round_trip):
    src, _ = model_folder
    converted, exported = round_trip
    for folder in (converted, exported):
        assert (folder / "model_index.json").read_text() == (src / "model_index.json").read_text()
        assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
    metadata = json.loads((converted / "transformer" / "conversion.json").read_text())
    assert metadata["converter_version"] and metadata["dtype"] == "float32"
    files = {f["name"]: f for f in metadata["source_files"]}
    assert len(files) > 1 and all(len(f["sha256"]) == 64 for f in files.values())
    assert all(f["size"] == (src / "transformer" / name).stat().st_size for name, f in files.items())
    assert all(f["sha256"] == _sha256(src / "transformer" / name) for name, f in files.items())
    assert len(list((exported / "transformer").glob("diffusion_pytorch_model-0000*-of-0000*.safetensors"))) > 1
    assert (exported / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not list(converted.parent.glob(".*tmp-*"))


def test_transformer_round_trip_bit_identical_and_same_forward(model_folder, round_trip):
    reference = model_folder[1]["transformer"]
    converted, exported = round_trip
    back = TorchHelios.from_pretrained(exported / "transformer").eval()
    assert _bit_identical(reference, back)
    # Both sides through from_pretrained: same tensors and the same memory layout, so the same kernels.
    original = TorchHelios.from_pretrained(model_folder[0] / "transformer").eval()
    inputs = make_inputs(seed=3)
    assert np.array_equal(diffusers_reference.run_reference(back, inputs),
                          diffusers_reference.run_reference(original, inputs))
    ours = helios_jax.load(converted / "transformer")
    assert _same_state(ours, helios_jax.load(model_folder[0] / "transformer", dtype="float32"))


def test_vae_round_trip_bit_identical_and_same_forward(model_folder, round_trip):
    reference = model_folder[1]["vae"]
    converted, exported = round_trip
    back = TorchVAE.from_pretrained(exported / "vae").eval()
    assert _bit_identical(reference, back)
    original = TorchVAE.from_pretrained(model_folder[0] / "vae").eval()
    video = vae_reference.random_video(5, 16, 16, seed=1)
    assert np.array_equal(vae_reference.reference_encode(back, video)[0],
                          vae_reference.reference_encode(original, video)[0])
    assert _same_state(helios_jax.load(converted / "vae"), helios_jax.load(model_folder[0] / "vae"))


def test_text_encoder_round_trip_bit_identical_and_same_forward(model_folder, round_trip):
    reference = model_folder[1]["text_encoder"]
    converted, exported = round_trip
    back = TorchUMT5.from_pretrained(exported / "text_encoder").eval()
    assert _bit_identical(reference, back)
    original = TorchUMT5.from_pretrained(model_folder[0] / "text_encoder").eval()
    ids, mask = transformers_reference.padded_batch(reference.config.vocab_size, [5, 9], 12, seed=1)
    assert np.array_equal(transformers_reference.run_reference(back, ids, mask),
                          transformers_reference.run_reference(original, ids, mask))
    ours = helios_jax.load(converted / "text_encoder")
    assert _same_state(ours, helios_jax.load(model_folder[0] / "text_encoder", dtype="float32"))


def test_default_dtypes_follow_the_spec_and_load_runs(model_folder, tmp_path):
    src, _ = model_folder
    convert(src, tmp_path / "out", components=["transformer", "vae"], progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_index.json", "transformer", "vae"]
    leaves = ParamReader(tmp_path / "out" / "transformer" / "params").leaves
    assert leaves["blocks.attn1.to_q.kernel"]["dtype"] == "bfloat16"
    assert leaves["condition_embedder.time_embedder.linear_1.kernel"]["dtype"] == "float32"
    assert leaves["blocks.scale_shift_table"]["dtype"] == "float32"
    assert ParamReader(tmp_path / "out" / "vae" / "params").leaves["decoder.conv_in.kernel"]["dtype"] == "float32"
    ours = helios_jax.load(tmp_path / "out" / "transformer")
    assert ours.blocks.attn1.to_q.kernel.dtype == jnp.bfloat16
    expected = helios_jax.load(src / "transformer")  # in-memory conversion, same default dtype
    assert _same_state(ours, expected)
    with pytest.raises(Exception, match="already exists"):
        convert(src, tmp_path / "out", progress=False)
    assert main(["convert", str(src), str(tmp_path / "out"), "--verify"]) == 0  # only the converted parts
    export(tmp_path / "out", tmp_path / "exported", progress=False)  # bf16 with fp32 islands, as stored
    from safetensors import safe_open

    reference = model_folder[1]["transformer"].state_dict()
    with safe_open(str(tmp_path / "exported" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("blocks.1.ffn.net.0.proj.weight"),
                           reference["blocks.1.ffn.net.0.proj.weight"].to(torch.bfloat16))
        assert torch.equal(f.get_tensor("blocks.1.scale_shift_table"), reference["blocks.1.scale_shift_table"])
    back = TorchHelios.from_pretrained(tmp_path / "exported" / "transformer", torch_dtype=torch.bfloat16)
    assert back.blocks[1].ffn.net[0].proj.weight.dtype == torch.bfloat16
    convert(src / "vae", tmp_path / "out", dtype="bfloat16", overwrite=True, progress=False)
    assert ParamReader(tmp_path / "out" / "params").leaves["decoder.conv_in.kernel"]["dtype"] == "bfloat16"


def test_load_onto_a_mesh_places_each_parameter_sharded(round_trip):
    converted, _ = round_trip
    mesh = jax.make_mesh((1,), ("fsdp",))
    ours = helios_jax.load(converted / "transformer", mesh=mesh)
    kernel = ours.blocks.ffn.linear_in.kernel
    assert isinstance(kernel.get_value().sharding, jax.sharding.NamedSharding)
    assert kernel.get_value().sharding.mesh == mesh  # one device: the rules leave it replicated
    assert _same_state(ours, helios_jax.load(converted / "transformer"))


MESH_SCRIPT = """
import sys, jax, numpy as np, helios_jax
mesh = jax.make_mesh((2,), ("fsdp",))
sharded = helios_jax.load(sys.argv[1], mesh=mesh)
plain = helios_jax.load(sys.argv[1])
kernel = sharded.blocks.ffn.linear_in.kernel.get_value()
assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None), kernel.sharding.spec
assert {s.data.shape for s in kernel.addressable_shards} == {(kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2])}
from flax import nnx
flat = lambda m: [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(m))]
pairs = list(zip(flat(sharded), flat(plain)))
assert len(pairs) > 20 and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in pairs)
print("ok")
"""


def test_load_onto_a_two_device_mesh_reads_each_shard(round_trip):
    converted, _ = round_trip
    result = _cli("-c", MESH_SCRIPT, str(converted / "transformer"),
                  env={"XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_verify_detects_a_changed_tensor(model_folder, tmp_path, capsys):
    src, _ = model_folder
    dst = tmp_path / "vae"
    assert main(["convert", str(src / "vae"), str(dst), "--dtype", "keep", "--quiet"]) == 0
    assert main(["convert", str(src / "vae"), str(dst), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    leaves = ParamReader(dst / "params").leaves
    for name in leaves:  # change every stored parameter, so any sample sees one
        for chunk in (dst / "params" / name).glob("[0-9]*"):
            data = bytearray(chunk.read_bytes())
            data[:4] = b"\x00\x00\xc0\x7f"
            chunk.write_bytes(bytes(data))
    assert main(["convert", str(src / "vae"), str(dst), "--verify"]) == 2
    assert "differs from source tensor" in capsys.readouterr().err


def _copy_component(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def _rewrite(folder, change):
    """Rewrite the single safetensors file of `folder` with `change(dict of tensors)` applied."""
    from safetensors.numpy import load_file, save_file

    path = next(folder.glob("*.safetensors"))
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _bad_cases(src):
    vae_file = "diffusion_pytorch_model.safetensors"
    shard = sorted((src / "transformer").glob("*-00002-of-*.safetensors"))[0].name
    return {
        "missing path": (lambda tmp: tmp / "absent", "absent"),
        "no config": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: (d / "config.json").unlink()),
                      "config.json"),
        "truncated": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: os.truncate(
            d / vae_file, (d / vae_file).stat().st_size - 100)), vae_file),
        "corrupted header": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: (d / vae_file).write_bytes(
            (d / vae_file).read_bytes()[:8] + b"#" + (d / vae_file).read_bytes()[9:])), vae_file),
        "index names a missing shard": (lambda tmp: _copy_component(
            src / "transformer", tmp / "c", lambda d: (d / shard).unlink()), shard),
        "missing tensor": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: _rewrite(
            d, lambda t: t.pop("decoder.conv_in.weight"))), "decoder.conv_in.weight"),
        "unexpected tensor": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: _rewrite(
            d, lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)}))), "decoder.extra.weight"),
        "wrong shape": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: _rewrite(
            d, lambda t: t.update({"decoder.conv_in.bias": np.zeros(3, np.float32)}))), "decoder.conv_in.bias"),
        "unsupported dtype": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: _rewrite(
            d, lambda t: t.update({"decoder.conv_in.bias": t["decoder.conv_in.bias"].astype(np.float64)}))),
            "decoder.conv_in.bias"),
        "wrong class": (lambda tmp: _copy_component(src / "vae", tmp / "c", lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "_class_name": "AutoencoderKL"}))),
            "AutoencoderKL"),
        "component folder of the wrong class": (lambda tmp: _model_with_swapped_vae(src, tmp / "m"), "vae"),
    }


def _model_with_swapped_vae(src, dst):
    dst.mkdir()
    shutil.copy(src / "model_index.json", dst)
    shutil.copytree(src / "transformer", dst / "vae")  # a transformer where the VAE should be
    return dst


def test_bad_input_fails_with_one_line_and_leaves_nothing(model_folder, tmp_path, capsys):
    src, _ = model_folder
    for case, (make, culprit) in _bad_cases(src).items():
        work = tmp_path / case.replace(" ", "_")
        work.mkdir()
        source, dst = make(work), work / "dst"
        assert main(["convert", str(source), str(dst), "--quiet"]) == 2, case
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], (case, lines)
        assert not dst.exists() and not list(work.glob(".dst.*")), case


def _model_with_tokenizer(src, dst, damage):
    """A copy of the model folder (weights linked, not copied) whose tokenizer/ is damaged."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "tokenizer":
            (dst / item.name).symlink_to(item)
    (dst / "tokenizer").mkdir()
    damage(dst / "tokenizer")
    return dst


BAD_TOKENIZERS = {
    "config only": (lambda d: (d / "tokenizer_config.json").write_text("{}"),
                    "neither tokenizer.json nor spiece.model"),
    "corrupt spiece.model": (lambda d: (d / "spiece.model").write_bytes(b"\x00garbage" * 100), "spiece.model"),
    "invalid tokenizer.json": (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_a_bad_tokenizer_is_refused_before_any_weight(model_folder, tmp_path, capsys, monkeypatch, case):
    src, _ = model_folder
    damage, culprit = BAD_TOKENIZERS[case]
    source, dst = _model_with_tokenizer(src, tmp_path / "m", damage), tmp_path / "dst"

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were planned before the tokenizer was checked")

    monkeypatch.setattr(convert_module, "ComponentPlan", no_weights)
    capsys.readouterr()
    assert main(["convert", str(source), str(dst), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0] and str(source / "tokenizer") in lines[0], lines
    assert not dst.exists() and not list(tmp_path.glob(".dst.*"))
    # Converting the other components alone does not look at the tokenizer.
    monkeypatch.undo()
    assert main(["convert", str(source), str(dst), "--quiet", "--component", "scheduler"]) == 0
    assert (dst / "scheduler").is_dir() and not (dst / "tokenizer").exists()


def test_official_only_extras_and_aliases_are_accepted(model_folder, tmp_path):
    src, _ = model_folder
    folder = tmp_path / "t"
    folder.mkdir()
    shutil.copy(src / "transformer" / "config.json", folder)
    from safetensors.numpy import save_file

    tensors = {k: v.detach().numpy() for k, v in model_folder[1]["transformer"].state_dict().items()}
    tensors["scale_shift_table"] = tensors.pop("norm_out.scale_shift_table")  # legacy name
    tensors["blocks.0.attn1.history_key_scale"] = np.ones(2, np.float32)  # official module only
    tensors["gan_heads.0.weight"] = np.ones((2, 2), np.float32)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    convert(folder, tmp_path / "out", dtype="keep", progress=False)
    metadata = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert sorted(metadata["skipped_tensors"]) == ["blocks.0.attn1.history_key_scale", "gan_heads.0.weight"]
    # skipped tensors are not converted, yet hashed with the rest of the file
    assert metadata["source_files"][0]["sha256"] == _sha256(folder / "diffusion_pytorch_model.safetensors")
    export(tmp_path / "out", tmp_path / "exported", progress=False)
    back = TorchHelios.from_pretrained(tmp_path / "exported")
    assert _bit_identical(model_folder[1]["transformer"], back)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_killed_conversion_leaves_no_destination_and_next_run_cleans_up(model_folder, tmp_path):
    src, _ = model_folder
    dst = tmp_path / "dst"
    killed = _cli("-m", "helios_jax", "convert", str(src / "transformer"), str(dst), "--quiet",
                  env={KILL_AFTER_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL
    assert not dst.exists()
    assert list(tmp_path.glob(".dst.tmp-*"))  # the killed run's temporary, removed by the next run
    done = _cli("-m", "checkpoints_convert", str(src / "transformer"), str(dst), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (dst / "conversion.json").is_file() and not list(tmp_path.glob(".dst.tmp-*"))
    exported = _cli("-m", "helios_jax", "export", str(dst), str(tmp_path / "exported"), "--quiet")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "exported" / "diffusion_pytorch_model.safetensors").is_file()


def test_dst_exists_without_overwrite(model_folder, tmp_path, capsys):
    src, _ = model_folder
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    assert main(["convert", str(src / "vae"), str(dst), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(src / "vae"), str(tmp_path / "e"), "--quiet"]) == 2  # not a converted folder
    assert (dst / "mine.txt").read_text() == "keep me"


def test_buffers_in_flight_stay_within_the_pool_limit(model_folder, tmp_path, monkeypatch):
    """The reader runs ahead of the writer by at most the pool's limit; a tensor above it passes
    alone; buffers are reused rather than allocated per tensor."""
    src, _ = model_folder
    pools, breaches = [], []

    class RecordingPool(BufferPool):
        def __init__(self, limit):
            super().__init__(limit)
            pools.append(self)

        def take(self, *sizes):
            taken = super().take(*sizes)
            if self.in_use > self.limit and self.in_use != sum(b.size for b in taken):
                breaches.append((self.in_use, sizes))
            return taken

    limit = 64 * 1024
    monkeypatch.setattr(convert_module, "MAX_BYTES_IN_FLIGHT", limit)
    monkeypatch.setattr(convert_module, "BufferPool", RecordingPool)
    convert(src / "transformer", tmp_path / "out", dtype="keep", verify=True, progress=False)
    reader = StreamingFolder(src / "transformer")
    largest = max(reader.info(key).nbytes for key in reader.keys())
    assert sum(reader.info(key).nbytes for key in reader.keys()) > 2 * limit  # the limit did bind
    (pool,) = pools
    assert not breaches and pool.in_use == 0 and 0 < pool.peak <= max(limit, 2 * largest + 2 * 4096)


def test_buffer_pool_reuses_buffers_and_serves_one_oversized_request_alone():
    pool = BufferPool(3 * 4096)
    a, b = pool.take(10, 4096)
    assert a.size == b.size == 4096 and a.ctypes.data % 4096 == 0 == b.ctypes.data % 4096
    pool.give(a)
    pool.give(b)
    (c,) = pool.take(100)
    assert c is a or c is b  # reused, not allocated
    pool.give(c)
    (big,) = pool.take(5 * 4096)  # above the limit, but nothing else is in use: free buffers dropped
    assert big.size == 5 * 4096 and pool.allocated == 5 * 4096 and pool.peak == 5 * 4096


@pytest.mark.parametrize("keys, transform, shape", [
    (transformer_keys, transformer_keys.LINEAR, (37, 23)),
    (transformer_keys, transformer_keys.CONV3D, (9, 3, 1, 2, 2)),
    (transformer_keys, transformer_keys.SQUEEZE0, (1, 6, 8)),
    (vae_keys, vae_keys.CONV2D, (7, 5, 3, 3)),
    (vae_keys, vae_keys.CONV1X1, (7, 5, 1, 1)),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_banded_cast_and_layout_equals_a_plain_copy(keys, transform, shape, dtype, monkeypatch):
    import checkpoints_convert.layout_copy as layout_copy

    monkeypatch.setattr(layout_copy, "_BAND_BYTES", 64)  # many bands, a partial last one
    source = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    target = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    ours = cast_to_layout(source, target, lambda a: keys.to_our_layout(a, transform))
    expected = np.ascontiguousarray(keys.to_our_layout(source, transform)).astype(target)
    assert ours.flags.c_contiguous and ours.dtype == target and ours.shape == expected.shape
    assert ours.tobytes() == expected.tobytes()


def test_hashing_file_hashes_every_byte_once_in_order(tmp_path, monkeypatch):
    """Reads with gaps (headers, skipped tensors), overlaps and an unread tail hash the whole file."""
    import checkpoints_convert.inflight as inflight

    monkeypatch.setattr(inflight, "_GAP_CHUNK", 7)
    data = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    hasher, pool = Hasher(), BufferPool(1 << 20)
    file = HashingFile(path, hasher, pool)
    for offset, size in [(10, 30), (40, 5), (30, 20), (120, 40)]:
        buffer = bytearray(size)
        file.read_into(memoryview(buffer), offset, lambda: None)
        assert bytes(buffer) == data[offset:offset + size]
    file.finish()
    file.close()
    assert hasher.finish() == {path: hashlib.sha256(data).hexdigest()}
    assert pool.in_use == 0


@pytest.mark.parametrize("direct", [True, False])
def test_read_tensor_direct_and_plain_give_the_bytes_and_the_whole_hash(tmp_path, monkeypatch, direct):
    """Unaligned tensors (and one ending at the file's end) read with O_DIRECT from the page
    boundary before them, or with plain reads where O_DIRECT is unavailable."""
    import checkpoints_convert.inflight as inflight
    from checkpoints_convert.param_store import DIRECT_ALIGN

    if not direct:
        monkeypatch.setattr(inflight, "_open_direct", lambda path: None)
    data = np.random.default_rng(1).integers(0, 256, 3 * DIRECT_ALIGN + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    hasher, pool = Hasher(), BufferPool(1 << 20)
    file = HashingFile(path, hasher, pool)
    assert (file.direct_fd is not None) == (direct and inflight._open_direct(path) is not None)
    for offset, size in [(5, 100), (DIRECT_ALIGN + 7, DIRECT_ALIGN), (len(data) - 50, 50)]:
        (buffer,) = pool.take(size + 2 * DIRECT_ALIGN)
        hashed = threading.Event()
        start = file.read_tensor(buffer, offset, size, hashed.set)
        assert buffer[start:start + size].tobytes() == data[offset:offset + size]
        hashed.wait()  # (the hasher may still be reading the buffer)
        pool.give(buffer)
    file.finish()
    file.close()
    assert hasher.finish() == {path: hashlib.sha256(data).hexdigest()}
