"""The diffusers Helios transformer as a parity reference: built with random weights, converted
through our key map. Test-only (imports torch)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import HeliosTransformer3DModel as TorchHelios

from helios_jax.loading import transformer_from_state_dict
from helios_jax.models.transformer_config import DIFFUSERS_FIELDS, TINY, transformer_config

# diffusers unit-test model (hf-internal-testing/tiny-helios-base-transformer): our tiny preset's
# architecture fields, handed to the diffusers class.
TINY_DIFFUSERS = {k: v for k, v in {**DIFFUSERS_FIELDS, **TINY}.items() if k in DIFFUSERS_FIELDS}


class StateDict:
    """A torch state dict seen through the reader interface of `StreamingFolder`."""

    def __init__(self, state_dict):
        self._tensors = {k: v.detach().float().numpy() for k, v in state_dict.items()}

    def keys(self):
        return list(self._tensors)

    def read(self, key):
        return self._tensors[key]


def build_reference(seed: int = 0, **config) -> TorchHelios:
    """A diffusers transformer in fp32 with every parameter random, including the ones that start at
    zero or one (norm weights and biases), so no path is trivially the identity or zero."""
    torch.manual_seed(seed)
    return rerandomise(TorchHelios(**{**TINY_DIFFUSERS, **config}).eval())


def rerandomise(model):
    """Norm weights near 1, biases and modulation tables near 0 but random (in place; returns model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "scale_shift_table" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def convert(reference: TorchHelios, dtype: str = "float32"):
    """Our model from the reference's state dict, through the checkpoint key map."""
    fields = {k: v for k, v in dict(reference.config).items() if k in DIFFUSERS_FIELDS}
    config = transformer_config(**fields, dtype=dtype)
    return transformer_from_state_dict(config, StateDict(reference.state_dict()))


def run_reference(reference: TorchHelios, inputs: dict, dtype=torch.float32) -> np.ndarray:
    def cast(v):
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            return t.to(dtype) if t.is_floating_point() else t
        return v

    with torch.no_grad():
        out = reference(**{k: cast(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.float().numpy()


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
