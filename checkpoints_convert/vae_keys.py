"""Key and layout map between diffusers' `AutoencoderKLWan` state dict and our NNX tree.

Our tree keeps diffusers' module paths (`decoder.up_blocks.1.resnets.0.conv1`, `resample.1`, ...);
only the leaf `weight` becomes `kernel`, stored channels last. So the map is a transpose per kind:
Conv3d (O, I, kT, kH, kW) -> (kT, kH, kW, I, O); Conv2d (O, I, kH, kW) -> (kH, kW, I, O); the
attention's 1x1 Conv2d -> dense (I, O); RMS gamma (C, 1, 1[, 1]) -> (C,).
"""
from __future__ import annotations

import re

import numpy as np

from checkpoints_convert.key_rules import Target

CONV3D, CONV2D, CONV1X1, GAMMA_VIDEO, GAMMA_IMAGE, SAME = (
    "conv3d", "conv2d", "conv1x1", "gamma_video", "gamma_image", "same"
)  # fmt: skip


def target_of(key: str) -> Target | None:
    """Where a diffusers VAE key lands in our tree (None: not a VAE parameter name)."""
    module, _, leaf = key.rpartition(".")
    if leaf == "gamma":
        attention_norm = re.search(r"\.attentions\.\d+\.norm$", module)
        return Target(key, None, GAMMA_IMAGE if attention_norm else GAMMA_VIDEO)
    if leaf == "bias":
        return Target(key, None, SAME)
    if leaf != "weight":
        return None
    if re.search(r"\.attentions\.\d+\.(to_qkv|proj)$", module):
        transform = CONV1X1
    elif module.endswith(".resample.1"):
        transform = CONV2D
    else:
        transform = CONV3D
    return Target(f"{module}.kernel", None, transform)


# The VAE has no legacy or ignored names: every key is located directly.
locate = target_of


def to_our_layout(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == CONV3D:
        return array.transpose(2, 3, 4, 1, 0)
    if transform == CONV2D:
        return array.transpose(2, 3, 1, 0)
    if transform == CONV1X1:
        return array.reshape(array.shape[:2]).T
    if transform in (GAMMA_VIDEO, GAMMA_IMAGE):
        return array.reshape(array.shape[0])
    return array


def to_torch_layout(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == CONV3D:
        return array.transpose(4, 3, 0, 1, 2)
    if transform == CONV2D:
        return array.transpose(3, 2, 0, 1)
    if transform == CONV1X1:
        return array.T[:, :, None, None]
    if transform == GAMMA_VIDEO:
        return array.reshape(-1, 1, 1, 1)
    if transform == GAMMA_IMAGE:
        return array.reshape(-1, 1, 1)
    return array


def torch_key_of(path: str) -> tuple[str, str]:
    """Our dotted path -> (diffusers key, transform): the inverse of `target_of`, for export."""
    module, _, leaf = path.rpartition(".")
    key = f"{module}.weight" if leaf == "kernel" else path
    target = target_of(key)
    if target is None or target.path != path:
        raise ValueError(f"{path} is not a VAE parameter path")
    return key, target.transform
