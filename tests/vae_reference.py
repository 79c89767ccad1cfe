"""diffusers' `AutoencoderKLWan` as a parity reference: random weights, converted through our key
map. Test-only (imports torch)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan as TorchWanVAE

from tests.diffusers_reference import StateDict
from helios_jax.loading import vae_from_state_dict
from helios_jax.models.vae_config import DIFFUSERS_FIELDS, vae_config

# Tiny configs that between them cover every block type (spec vae_and_text.md A.13).
TINY_CONFIGS = {
    # one 3D resample level: causal caches, downsample3d/upsample3d, shortcut, both attention blocks
    "minimal_3d": dict(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True]),
    # the real model's structure at width 8: both 2D and both 3D resamplers, strides 4 and 8
    "wan_structure": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                          temperal_downsample=[False, True, True]),
    # spatial-only resampling: no temporal stride at all, 4 latents per encode group
    "spatial_only": dict(base_dim=8, z_dim=6, dim_mult=[1, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, False]),
}
# The Wan2.1 architecture itself (base_dim 96, z_dim 16): diffusers' defaults.
WAN21 = {}


def build_reference(seed: int = 0, **config) -> TorchWanVAE:
    """A diffusers VAE in fp32 with every parameter random; gammas (initialised to one) and biases
    are perturbed so a transposed or misplaced one cannot go unnoticed."""
    torch.manual_seed(seed)
    model = TorchWanVAE(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def convert(reference: TorchWanVAE, dtype: str = "float32"):
    fields = {k: v for k, v in dict(reference.config).items() if k in DIFFUSERS_FIELDS}
    return vae_from_state_dict(vae_config(**fields, dtype=dtype), StateDict(reference.state_dict()))


def reference_encode(reference: TorchWanVAE, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        dist = reference.encode(torch.from_numpy(video)).latent_dist
    return dist.mean.numpy(), dist.logvar.numpy()


def reference_decode(reference: TorchWanVAE, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference.decode(torch.from_numpy(latents)).sample.numpy()


def random_video(frames: int, height: int, width: int, *, channels: int = 3, batch: int = 1, seed: int = 0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, channels, frames, height, width)).astype(np.float32)
