"""Analytic FLOPs of a VAE decode (2 x multiply-adds of convs, dense layers and attention), counted
the way torch's flop counter counts diffusers' module (spec vae_and_text.md A.12)."""
from __future__ import annotations


def _conv(frames: int, height: int, width: int, in_dim: int, out_dim: int, taps: int) -> int:
    return 2 * frames * height * width * out_dim * in_dim * taps


def _residual(frames, height, width, in_dim, out_dim) -> int:
    flops = _conv(frames, height, width, in_dim, out_dim, 27) + _conv(frames, height, width, out_dim, out_dim, 27)
    if in_dim != out_dim:
        flops += _conv(frames, height, width, in_dim, out_dim, 1)
    return flops


def _attention(frames, height, width, dim) -> int:
    tokens = height * width
    projections = 2 * tokens * dim * (3 * dim + dim)
    return frames * (projections + 2 * 2 * tokens * tokens * dim)


def decode_flops(config, latent_frames: int, latent_height: int, latent_width: int) -> int:
    """FLOPs of `decode` for one segment of `latent_frames` latents at the given latent size."""
    mult = config.dim_mult
    dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = tuple(config.temperal_downsample)[::-1]
    t, h, w = latent_frames, latent_height, latent_width
    flops = _conv(t, h, w, config.z_dim, config.z_dim, 1)  # post_quant_conv
    flops += _conv(t, h, w, config.z_dim, dims[0], 27)
    flops += 2 * _residual(t, h, w, dims[0], dims[0]) + _attention(t, h, w, dims[0])
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            in_dim //= 2
        for _ in range(config.num_res_blocks + 1):
            flops += _residual(t, h, w, in_dim, out_dim)
            in_dim = out_dim
        if level == len(mult) - 1:
            break
        if temporal_upsample[level]:
            flops += _conv(t - 1, h, w, out_dim, 2 * out_dim, 3)  # frame 0 bypasses the time conv
            t = 1 + 2 * (t - 1)
        h, w = 2 * h, 2 * w
        flops += _conv(t, h, w, out_dim, out_dim // 2, 9)
    return flops + _conv(t, h, w, dims[-1], config.out_channels, 27)
