"""Helios training started from a Wan2.1 transformer (training spec §1 item 1, §11.1): a diffusers
`WanTransformer3DModel` folder loads as our Helios model with the training flags and history
patchers derived from its patch embedding; without history it is exactly Wan."""
import json
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.numpy import load_file, save_file

import helios_jax
from checkpoints_convert.safetensors_folder import CheckpointError
from tests.diffusers_reference import relative_error, rerandomise, run_reference
from tests.xla_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parents[1]
# The tiny Helios shape (transformer_config.TINY) as a Wan model; text_dim 64 matches tiny-random's data.
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=64, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=64)
WAN_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A random fp32 Wan transformer (norm weights, biases and tables re-randomised so none is
    trivially 1 or 0) and the folder diffusers saved it to."""
    torch.manual_seed(0)
    reference = rerandomise(WanTransformer3DModel(**TINY_WAN).eval())
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    reference.save_pretrained(folder, safe_serialization=True)
    return reference, folder


@pytest.fixture(scope="module")
def loaded(wan):
    return helios_jax.load(wan[1], dtype="float32")


def test_config_has_helios_training_flags_and_wan_rope_split(loaded):
    config = loaded.config
    assert (config.has_multi_term_memory_patch, config.zero_history_timestep, config.guidance_cross_attn) == (True,) * 3
    assert tuple(config.rope_dim) == (4, 4, 4)  # Wan: h = w = 2 * (head_dim // 6), t the rest
    assert (config.is_amplify_history, config.history_scale_mode) == (False, "per_head")


def test_forward_without_history_equals_wan(wan, loaded):
    reference, _ = wan
    rng = np.random.default_rng(1)
    inputs = dict(hidden_states=rng.standard_normal((2, 4, 3, 16, 12)).astype(np.float32),
                  timestep=np.array([999.0, 37.0], np.float32),
                  encoder_hidden_states=rng.standard_normal((2, 7, 64)).astype(np.float32))
    expected = run_reference(reference, inputs)
    got = np.asarray(loaded(**{k: jnp.asarray(v) for k, v in inputs.items()}))
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= 1e-5


def _avg_pool(latents: np.ndarray, factor: int) -> np.ndarray:
    b, c, t, h, w = latents.shape
    grouped = latents.reshape(b, c, t // factor, factor, h // factor, factor, w // factor, factor)
    return grouped.mean(axis=(3, 5, 7))


def test_history_patchers_are_the_patch_embedding_of_pooled_latents(loaded):
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 16, 16)).astype(np.float32)
    channels_last = lambda x: jnp.moveaxis(jnp.asarray(x), 1, -1)
    embed = lambda x: np.asarray(loaded.patch_embedding(channels_last(x)))
    np.testing.assert_array_equal(np.asarray(loaded.patch_short(channels_last(latents))), embed(latents))
    for patcher, factor in ((loaded.patch_mid, 2), (loaded.patch_long, 4)):
        got = np.asarray(patcher(channels_last(latents)))
        expected = embed(_avg_pool(latents, factor))
        assert got.shape == expected.shape
        assert relative_error(got, expected) <= 1e-6


SHARDED_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
import helios_jax
from helios_jax.parallel import make_mesh

folder = sys.argv[1]
whole = helios_jax.load(folder, dtype="float32")
sharded = helios_jax.load(folder, dtype="float32", mesh=make_mesh(data=2, fsdp=4))
for name in ("patch_short", "patch_mid", "patch_long"):
    for leaf in ("kernel", "bias"):
        got = getattr(getattr(sharded, name), leaf)[...]
        assert "fsdp" in str(got.sharding.spec), (name, leaf, got.sharding.spec)  # the embed axis is split
        np.testing.assert_array_equal(np.asarray(got), np.asarray(getattr(getattr(whole, name), leaf)[...]))
print("sharded ok")
"""


def test_sharded_load_derives_the_same_patchers(wan):
    """On an 8-device mesh (fsdp=4 over the embed axis) the derived patchers equal the unsharded load's."""
    env = dict(PYTHONPATH=str(REPO), PATH="/usr/bin:/bin")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(wan[1])], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-3000:]


def _rewrite(wan_folder: Path, folder: Path, class_name: str, extra: dict) -> Path:
    """The Wan weights (plus `extra` tensors, torch layout) saved as a `class_name` folder."""
    folder.mkdir()
    tensors = {**load_file(str(wan_folder / WAN_FILE)), **extra}
    save_file(tensors, str(folder / WAN_FILE))
    config = json.loads((wan_folder / "config.json").read_text())
    if class_name == "HeliosTransformer3DModel":
        config.update(rope_dim=[4, 4, 4])
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": class_name}))
    return folder


def _patcher(name: str, kernel: tuple) -> dict:
    return {f"{name}.weight": np.zeros((24, 4, *kernel), np.float32), f"{name}.bias": np.zeros(24, np.float32)}


@pytest.mark.parametrize("class_name, extra, message", [
    # An ordinary Helios folder must carry its patchers: only the Wan class derives them.
    ("HeliosTransformer3DModel", {**_patcher("patch_mid", (2, 4, 4)), **_patcher("patch_long", (4, 8, 8))},
     r"missing 2 parameter\(s\), e.g. patch_short.bias, patch_short.kernel"),
    ("HeliosTransformer3DModel", {}, r"missing 6 parameter\(s\), e.g. patch_long"),
    # A Wan folder with some patchers but not all is not quietly half derived.
    ("WanTransformer3DModel", _patcher("patch_short", (1, 2, 2)), r"missing 4 parameter\(s\), e.g. patch_long"),
], ids=["helios_without_patch_short", "helios_without_any_patcher", "wan_with_only_patch_short"])
def test_folder_without_its_patchers_is_refused(wan, tmp_path, class_name, extra, message):
    folder = _rewrite(wan[1], tmp_path / "transformer", class_name, extra)
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: checkpoint is ") + message):
        helios_jax.load(folder, dtype="float32")


def test_wan_image_model_is_refused(wan, tmp_path):
    folder = _rewrite(wan[1], tmp_path / "transformer", "WanTransformer3DModel", {})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_dim": 1280}))
    with pytest.raises(CheckpointError, match="image_dim=1280"):
        helios_jax.load(folder)


def test_stage_1_init_trains_from_the_wan_folder(wan, tmp_path):
    """`helios-jax train` of stage_1_init:tiny with --config.model.init and .config set to the Wan folder."""
    _, folder = wan
    env = dict(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PATH="/usr/bin:/bin",
               XLA_FLAGS=FAST_COMPILE)
    result = subprocess.run(
        [sys.executable, "-m", "helios_jax", "train", "--config", "configs/train/stage1.py:tiny",
         "--workdir", str(tmp_path / "run"), f"--config.model.init={folder}", f"--config.model.config={folder}",
         "--config.total_steps=2", "--config.checkpoint_every=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_derived_parameters_share_no_buffer(loaded):
    """A train step donates every parameter: the copied ones must not alias patch_embedding's."""
    pointers = [getattr(getattr(loaded, name), leaf)[...].unsafe_buffer_pointer()
                for name in ("patch_embedding", "patch_short", "patch_mid", "patch_long") for leaf in ("kernel", "bias")]
    assert len(set(pointers)) == len(pointers)


def test_convert_refuses_a_wan_folder(wan, tmp_path):
    from checkpoints_convert.convert import convert
    with pytest.raises(CheckpointError, match="WanTransformer3DModel is not converted; load the folder directly"):
        convert(wan[1], tmp_path / "converted", progress=False)
    assert not (tmp_path / "converted").exists()
