"""HeliosPipeline.from_pretrained on a diffusers-format model folder and on the same folder after
`helios-jax convert`: both must sample what diffusers samples from that folder."""
import json

import numpy as np
import pytest

from checkpoints_convert.convert import convert
from helios_jax.pipeline import HeliosPipeline
from tests import pipeline_reference as ref
from tests.diffusers_reference import relative_error

H, W, FRAMES = 64, 64, 33


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The Distilled reference pipeline saved with save_pretrained (no text encoder), its draws and latents."""
    folder = tmp_path_factory.mktemp("model") / "helios-distilled"
    reference = ref.build_reference_pipeline("distilled", seed=3)
    reference.save_pretrained(folder)
    settings = ref.VARIANTS["distilled"].call
    draws, latents = ref.run_reference("distilled", reference, prompt_embeds=ref.prompt_embeddings(0, 5),
                                       num_frames=FRAMES, height=H, width=W, seed=4, **settings)
    return folder, draws, latents, settings


def sample(pipe, draws, settings):
    return pipe(prompt_embeds=ref.prompt_embeddings(0, 5), height=H, width=W, num_frames=FRAMES, noise=list(draws),
                output_type="latent", **settings)


def test_diffusers_folder_and_converted_folder_sample_like_diffusers(saved, tmp_path):
    folder, draws, expected, settings = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "HeliosPyramidPipeline" and index["is_distilled"]

    direct = HeliosPipeline.from_pretrained(folder, dtype="float32")  # the default would be bf16, as the spec runs it
    assert direct.variant == "distilled" and direct.text_encoder is None
    assert relative_error(sample(direct, draws, settings), expected) <= 1e-3

    converted = tmp_path / "converted"
    convert(str(folder), str(converted), dtype="keep", progress=False)  # fp32 as saved
    restored = HeliosPipeline.from_pretrained(converted)
    assert restored.variant == "distilled"
    assert relative_error(sample(restored, draws, settings), expected) <= 1e-3


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        HeliosPipeline.from_pretrained(tmp_path / "absent")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match="no vae/ folder"):
        HeliosPipeline.from_pretrained(tmp_path)
