"""A LoRA'd forward equals diffusers' HeliosTransformer3DModel with the same adapters loaded through
PEFT from our PEFT-named export (random non-zero LoRA weights, fp32)."""
import numpy as np
import torch
from flax import nnx
from peft import LoraConfig, set_peft_model_state_dict

from helios_jax.training import lora
from tests.diffusers_reference import build_reference, convert, relative_error, run_reference
from tests.test_lora import forward, randomize_lora
from tests.test_transformer_parity import make_inputs

RANK, ALPHA = 4, 8


def test_lora_forward_matches_diffusers_with_peft_adapters():
    reference = build_reference(seed=0)
    ours = convert(reference)
    lora.add_lora(ours, rank=RANK, alpha=ALPHA, patch_embedding="lora", history_patches="lora", rngs=nnx.Rngs(1))
    randomize_lora(ours, std=0.2)
    tensors, config = lora.peft_lora_state_dict(ours)
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert "transformer.blocks.1.attn1.to_out.0.lora_A.weight" in tensors
    assert tensors["transformer.blocks.0.ffn.net.0.proj.lora_B.weight"].shape == (32, RANK)
    assert tensors["transformer.patch_mid.lora_A.weight"].shape == (RANK, 4, 2, 4, 4)

    inputs = make_inputs(current=(3, 16, 16), short=(2, 16, 16), mid=(2, 16, 16), long=(16, 16, 16))
    base = run_reference(reference, inputs)
    reference.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=config["target_modules"]))
    state = {k.removeprefix("transformer."): torch.from_numpy(v) for k, v in tensors.items()}
    result = set_peft_model_state_dict(reference, state)
    assert not result.unexpected_keys
    loaded = {k for k in reference.state_dict() if ".lora_" in k}
    assert len(loaded) == len(tensors)  # every adapter of the reference got a tensor

    expected = run_reference(reference, inputs)
    assert relative_error(expected, base) > 1e-2  # the adapters change the output
    assert relative_error(np.asarray(forward(ours, inputs)), expected) <= 1e-4
