"""The FLOP model and the pipeline-shaped example inputs agree with the spec's token and FLOP tables."""
import pytest

from helios_jax.models.example_inputs import example_inputs, token_counts
from helios_jax.models.flops import transformer_flops
from helios_jax.models.transformer_config import preset


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
