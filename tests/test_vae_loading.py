"""The VAE outside parity: `helios_jax.load` on diffusers folders, bf16, the key map, the parameter
count, logical axes, one compile per chunk shape, and latent normalisation as the pipeline does it."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan as TorchWanVAE
from flax import nnx
from safetensors.numpy import load_file, save_file

import helios_jax
from checkpoints_convert import vae_keys
from checkpoints_convert.safetensors_folder import CheckpointError
from helios_jax.models.forward import parameter_count
from helios_jax.models.vae import AutoencoderKLWan
from helios_jax.models.vae_config import preset, vae_config
from tests.diffusers_reference import relative_error
from tests.test_transformer_structure import BACKEND_COMPILE_EVENT
from tests.vae_reference import TINY_CONFIGS, build_reference, reference_decode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference = build_reference(seed=9, **TINY_CONFIGS["minimal_3d"])
    folder = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(folder, safe_serialization=True)
    return reference, folder


def latents(z_dim=4, frames=3, seed=0, size=(8, 12)):
    return np.random.default_rng(seed).standard_normal((1, z_dim, frames, *size)).astype(np.float32)


def test_load_diffusers_folder(saved):
    reference, folder = saved
    vae = helios_jax.load(folder)
    assert isinstance(vae, AutoencoderKLWan) and vae.decoder.conv_in.kernel.dtype == jnp.float32
    z = latents()
    assert relative_error(np.asarray(vae.decode(z)), reference_decode(reference, z)) <= 1e-4


def test_bf16_error_at_most_twice_diffusers_bf16_error(saved):
    reference, folder = saved
    z = latents(seed=1)
    exact = reference_decode(reference, z)
    torch_bf16 = TorchWanVAE.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = torch_bf16.decode(torch.from_numpy(z).to(torch.bfloat16)).sample.float().numpy()
    ours = helios_jax.load(folder, dtype="bfloat16")
    assert ours.decoder.conv_in.kernel.dtype == jnp.bfloat16
    our_error = relative_error(np.asarray(ours.decode(jnp.asarray(z, jnp.bfloat16)), np.float32), exact)
    their_error = relative_error(theirs, exact)
    print(f"bf16 decode relative error: ours {our_error:.2e}, diffusers {their_error:.2e}")
    assert 0 < our_error <= 2 * their_error


def _edited_folder(saved, tmp_path, edit):
    reference, folder = saved
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, c: _set(c, "is_residual", True), r"config.json: is_residual=true is the Wan2.2 VAE"),
        (lambda t, c: _set(c, "attn_scales", [0.5]), r"config.json: attn_scales must be empty"),
        (lambda t, c: t.pop("decoder.conv_out.bias"), r"missing 1 parameter\(s\), e.g. decoder.conv_out.bias"),
        (lambda t, c: _set(t, "decoder.extra.weight", np.zeros(2, np.float32)), r"tensor decoder.extra.weight has no place"),
        (lambda t, c: _set(t, "decoder.conv_in.scale", np.zeros(2, np.float32)), r"tensor decoder.conv_in.scale has no place"),
        (lambda t, c: _set(t, "quant_conv.weight", np.zeros((8, 8, 1, 1, 2), np.float32)),
         r"tensor quant_conv.weight has shape \(1, 1, 2, 8, 8\) in our layout, expected \(1, 1, 1, 8, 8\)"),
    ],
    ids=["wan2.2-residual", "attn-scales", "missing", "unexpected", "unknown-leaf", "wrong-shape"],
)
def test_broken_folders_are_refused_with_the_reason(saved, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        helios_jax.load(_edited_folder(saved, tmp_path, edit))


def test_key_map_is_a_bijection_with_exact_layout_round_trip():
    reference = build_reference(**TINY_CONFIGS["wan_structure"])  # every module type of the real model
    model = nnx.eval_shape(lambda: AutoencoderKLWan(preset("tiny"), rngs=nnx.Rngs(0)))
    ours = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    state_dict = reference.state_dict()
    assert len(state_dict) == len(ours)
    for key, tensor in state_dict.items():
        target = vae_keys.target_of(key)
        assert target.path in ours, key
        array = tensor.numpy()
        mine = vae_keys.to_our_layout(array, target.transform)
        assert mine.shape == ours[target.path].shape, key
        assert vae_keys.torch_key_of(target.path) == (key, target.transform)
        np.testing.assert_array_equal(vae_keys.to_torch_layout(mine, target.transform), array)


def test_wan21_parameter_count_and_logical_axes():
    model = nnx.eval_shape(lambda: AutoencoderKLWan(vae_config(), rngs=nnx.Rngs(0)))
    assert parameter_count(model) == 126_892_531  # spec vae_and_text.md A.11
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path


def test_chunk_decode_compiles_once_for_every_chunk():
    vae = AutoencoderKLWan(preset("tiny"), rngs=nnx.Rngs(0))
    chunks = [latents(frames=9, seed=seed, size=(4, 6)) for seed in (1, 2)]
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = np.asarray(vae.decode(chunks[0]))
        assert len(compiles) == 1
        second = np.asarray(vae.decode(chunks[1]))
        assert len(compiles) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first.shape == second.shape == (1, 3, 33, 32, 48)
    assert not np.allclose(first, second)


def test_latent_normalisation_matches_the_pipeline():
    """diffusers' Helios pipeline: (z - mean) * (1/std) after encode, z_n / (1/std) + mean before decode."""
    vae = nnx.eval_shape(lambda: AutoencoderKLWan(vae_config(), rngs=nnx.Rngs(0)))
    z = np.random.default_rng(0).standard_normal((1, 16, 3, 4, 6)).astype(np.float32) * 3
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    normalised = (torch.from_numpy(z) - mean) * inv_std
    np.testing.assert_array_equal(np.asarray(vae.normalize_latents(z)), normalised.numpy())
    np.testing.assert_array_equal(np.asarray(vae.denormalize_latents(normalised.numpy())), (normalised / inv_std + mean).numpy())
    channels_last = np.moveaxis(z, 1, -1)
    np.testing.assert_array_equal(np.asarray(vae.normalize_latents(channels_last, channel_axis=-1)), np.moveaxis(normalised.numpy(), 1, -1))
