"""The FLOP models (transformer, VAE decode) and the pipeline-shaped example inputs agree with the spec's token and FLOP tables."""
import pytest

from helios_jax.models.example_inputs import example_inputs, token_counts
from helios_jax.models.flops import transformer_flops
from helios_jax.models.transformer_config import preset
from helios_jax.models.vae_config import DIFFUSERS_FIELDS as VAE_FIELDS
from helios_jax.models.vae_config import vae_config
from helios_jax.models.vae_flops import decode_flops


@pytest.mark.parametrize(
    "latent, current, tokens, flops",
    [
        ((9, 48, 80), None, (2400, 8640), 3.596e14),  # 384x640
        ((9, 60, 104), None, (3926, 14040), 6.855e14),  # 480x832
        ((9, 48, 80), (9, 12, 20), (2400, 540), 6.97e13),  # pyramid stage 0
        ((9, 48, 80), (9, 24, 40), (2400, 2160), 1.190e14),  # pyramid stage 1
    ],
)
def test_tokens_and_flops_match_spec_tables(latent, current, tokens, flops):
    config = preset("helios_14b")
    assert token_counts(config, latent, current_size=current) == tokens
    assert transformer_flops(config, *tokens) == pytest.approx(flops, rel=1e-3)


def test_example_inputs_have_pipeline_shapes():
    config = preset("tiny")
    inputs = example_inputs(config, (9, 12, 20), current_size=(9, 6, 10), text_len=32, real_text_len=5)
    assert inputs["hidden_states"].shape == (1, 4, 9, 6, 10)
    assert inputs["latents_history_long"].shape == (1, 4, 16, 12, 20)
    assert inputs["indices_latents_history_short"].tolist() == [0, 19]
    assert inputs["indices_latents_history_mid"].tolist() == [17, 18]
    assert inputs["indices_hidden_states"].tolist() == list(range(20, 29))
    assert float(abs(inputs["encoder_hidden_states"][:, 5:]).max()) == 0.0


@pytest.mark.parametrize(
    "latent, flops", [((9, 48, 80), 6.926e13), ((9, 60, 104), 1.128e14), ((1, 48, 80), 2.66e12), ((2, 48, 80), 1.10e13)]
)
def test_vae_decode_flops_match_spec_table(latent, flops):
    assert decode_flops(vae_config(), *latent) == pytest.approx(flops, rel=2e-3)


def _cpu_attention_flops() -> dict:
    """torch's counter (2.14) has no formula for the CPU flash-attention op that SDPA calls on the
    CPU, so the VAE's attention would count as zero: give it torch's own SDPA formula."""
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return {}

    def count(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    return {op: count}


def test_vae_decode_flops_match_torch_flop_counter_on_diffusers():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tests.vae_reference import TINY_CONFIGS, build_reference

    reference = build_reference(**TINY_CONFIGS["wan_structure"])
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with torch.no_grad(), counter:
        reference.decode(torch.zeros(1, 4, 3, 4, 6))
    fields = {k: v for k, v in dict(reference.config).items() if k in VAE_FIELDS}
    assert decode_flops(vae_config(**fields), 3, 4, 6) == counter.get_total_flops()
