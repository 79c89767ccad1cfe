"""`helios_jax.load` on diffusers-format transformer folders: single and sharded safetensors, legacy
key names, bf16 numerics against diffusers' own bf16, and clear errors for broken folders."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HeliosTransformer3DModel as TorchHelios
from safetensors.numpy import save_file

import helios_jax
from checkpoints_convert.safetensors_folder import CheckpointError
from tests.diffusers_reference import build_reference, relative_error, run_reference
from tests.test_transformer_parity import make_inputs, run_ours

# Wide enough that bf16 rounding behaves as in the real model (several heads, real RoPE sub-dims).
BF16_CONFIG = dict(num_attention_heads=4, attention_head_dim=16, rope_dim=(4, 6, 6), ffn_dim=128, text_dim=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A reference model saved by diffusers, single-file and sharded."""
    reference = build_reference(seed=4, **BF16_CONFIG)
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    reference.save_pretrained(single, safe_serialization=True)
    reference.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and list(sharded.glob("*.index.json"))
    return reference, single, sharded


def inputs_for(reference, seed=5):
    return make_inputs(seed=seed, batch=2, text_dim=reference.config.text_dim, real_text_len=7)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_diffusers_folder_fp32(saved, layout):
    reference, single, sharded = saved
    model = helios_jax.load(single if layout == "single" else sharded, dtype="float32")
    inputs = inputs_for(reference)
    assert relative_error(run_ours(model, inputs), run_reference(reference, inputs)) <= 1e-4


def test_bf16_error_at_most_twice_diffusers_bf16_error(saved):
    reference, single, _ = saved
    inputs = inputs_for(reference, seed=6)
    exact = run_reference(reference, inputs)
    # diffusers' own bf16 path: from_pretrained keeps its fp32 modules (time embedder, tables, norm2).
    torch_bf16 = TorchHelios.from_pretrained(single, torch_dtype=torch.bfloat16).eval()
    diffusers_error = relative_error(run_reference(torch_bf16, inputs, dtype=torch.bfloat16), exact)
    ours = helios_jax.load(single, dtype=jnp.bfloat16)
    assert ours.blocks.attn1.to_q.kernel.dtype == jnp.bfloat16
    assert ours.condition_embedder.time_embedder.linear_1.kernel.dtype == jnp.float32
    our_error = relative_error(run_ours(ours, inputs), exact)
    print(f"bf16 relative error: ours {our_error:.2e}, diffusers {diffusers_error:.2e}")
    assert 0 < our_error <= 2 * diffusers_error


def _write_folder(reference, folder, rename=lambda key: key, edit=lambda tensors, config: None):
    """A diffusers-layout folder of the reference's weights, keys renamed and contents edited first."""
    folder.mkdir()
    tensors = {rename(k): v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    config = dict(reference.config, _class_name="HeliosTransformer3DModel")
    edit(tensors, config)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def _helios_legacy(key):
    key = "scale_shift_table" if key == "norm_out.scale_shift_table" else key
    for new, old in (("patch_short.", "clean_patch_embedding.proj."), ("patch_mid.", "multi_term_memory_patch.patch_mid."),
                     ("patch_long.", "clean_patch_embedding.proj_4x.")):
        key = key.replace(new, old) if key.startswith(new) else key
    return key


def _original_wan(key):
    for new, old in (("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
                     ("condition_embedder.time_proj.", "time_projection.1."),
                     ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
                     ("proj_out.", "head.head."), ("norm_out.scale_shift_table", "head.modulation"),
                     (".attn1.to_q.", ".self_attn.q."), (".attn2.to_out.0.", ".cross_attn.o."),
                     (".attn1.norm_k.", ".self_attn.norm_k."), (".norm2.", ".norm3."),
                     (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."), (".scale_shift_table", ".modulation")):
        key = key.replace(new, old)
    return key


@pytest.mark.parametrize("rename", [_helios_legacy, _original_wan], ids=["helios_legacy", "original_wan"])
def test_legacy_key_names_load_the_same_model(saved, tmp_path, rename):
    reference, _, _ = saved
    _write_folder(reference, tmp_path / "legacy", rename=rename)
    inputs = inputs_for(reference)
    model = helios_jax.load(tmp_path / "legacy", dtype="float32")
    assert relative_error(run_ours(model, inputs), run_reference(reference, inputs)) <= 1e-4


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, c: t.pop("blocks.1.ffn.net.2.weight"), "missing 1 parameter"),
        (lambda t, c: t.update({"blocks.0.attn1.surprise": np.zeros(3, np.float32)}), "blocks.0.attn1.surprise"),
        (lambda t, c: t.update({"proj_out.bias": np.zeros(5, np.float32)}), "proj_out.bias has shape"),
        (lambda t, c: t.update({"scale_shift_table": t["norm_out.scale_shift_table"]}), "given twice"),
        (lambda t, c: c.update(restrict_self_attn=True), "restrict_self_attn"),
        (lambda t, c: c.update(_class_name="SomethingElse"), "unsupported component class"),
    ],
    ids=["missing", "unexpected", "shape", "duplicate_alias", "official_only_flag", "class"],
)
def test_broken_folder_is_refused_with_its_name(saved, tmp_path, edit, message):
    reference, _, _ = saved
    _write_folder(reference, tmp_path / "broken", edit=edit)
    with pytest.raises(CheckpointError, match=message):
        helios_jax.load(tmp_path / "broken")


def test_missing_folder_and_missing_shard(saved, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        helios_jax.load(tmp_path / "absent")
    _, _, sharded = saved
    broken = tmp_path / "sharded"
    broken.mkdir()
    for path in sharded.iterdir():
        if not path.name.endswith("00001-of-" + path.name.split("-of-")[-1]) or path.suffix == ".json":
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="is missing"):
        helios_jax.load(broken)
