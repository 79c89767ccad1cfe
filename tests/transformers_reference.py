"""transformers' UMT5EncoderModel as a parity reference: built with random weights, converted through
our key map. Test-only (imports torch)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import UMT5Config
from transformers import UMT5EncoderModel as TorchUMT5Encoder

from helios_jax.loading import text_encoder_from_state_dict
from helios_jax.models.text_encoder_config import PRESETS, TRANSFORMERS_FIELDS, text_encoder_config
from tests.diffusers_reference import StateDict, relative_error  # noqa: F401 (re-exported for the tests)


def transformers_config(preset: str, **fields) -> UMT5Config:
    """A UMT5Config with a preset's architecture fields; dropout off so train/eval agree."""
    architecture = {k: v for k, v in {**TRANSFORMERS_FIELDS, **PRESETS[preset], **fields}.items()
                    if k in TRANSFORMERS_FIELDS}
    return UMT5Config(**architecture, dropout_rate=0.0, architectures=["UMT5EncoderModel"])


def build_reference(preset: str = "tiny", seed: int = 0, **fields) -> TorchUMT5Encoder:
    """An fp32 UMT5 encoder with every parameter random; norm weights are 1 + 0.3 N(0, 1) so no
    norm is the identity (spec B.9)."""
    torch.manual_seed(seed)
    model = TorchUMT5Encoder(transformers_config(preset, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def convert(reference: TorchUMT5Encoder, dtype: str = "float32"):
    """Our encoder from the reference's state dict, through the checkpoint key map."""
    fields = {k: v for k, v in reference.config.to_dict().items() if k in TRANSFORMERS_FIELDS}
    return text_encoder_from_state_dict(text_encoder_config(**fields, dtype=dtype), StateDict(reference.state_dict()))


def run_reference(reference: TorchUMT5Encoder, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = reference(torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long())
    return out.last_hidden_state.float().numpy()


def padded_batch(vocab_size: int, lengths, seq_len: int, seed: int = 0):
    """Token ids and mask shaped as the tokenizer gives them: `length - 1` random content ids, EOS (1),
    then pad (0) up to `seq_len`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), seq_len), np.int32)
    mask = np.zeros((len(lengths), seq_len), np.int32)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = rng.integers(3, vocab_size, length - 1)
        ids[row, length - 1] = 1
        mask[row, :length] = 1
    return ids, mask
