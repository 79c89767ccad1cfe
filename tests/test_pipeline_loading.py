"""HeliosPipeline.from_pretrained on a diffusers-format model folder and on the same folder after
`helios-jax convert`: both must sample what diffusers samples from that folder."""
import json

import numpy as np
import pytest

from checkpoints_convert.convert import convert
from helios_jax.sampling.pipeline import HeliosPipeline
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


MESH_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
from flax import nnx
from helios_jax import parallel
from helios_jax.sampling.pipeline import HeliosPipeline

data = np.load(sys.argv[3], allow_pickle=False)
draws = [data[f"draw{i}"] for i in range(int(data["count"]))]
settings = json.loads(sys.argv[4])
mesh = parallel.make_mesh(data=2, fsdp=4)
for name, folder in (("diffusers", sys.argv[1]), ("converted", sys.argv[2])):
    pipe = HeliosPipeline.from_pretrained(folder, dtype="float32", mesh=mesh)
    assert pipe.mesh is mesh
    sharded = 0
    for module in (pipe.transformer, pipe.vae):
        for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)):
            assert leaf.sharding.mesh.shape == mesh.shape, (name, leaf.sharding)
            sharded += not leaf.sharding.is_fully_replicated
    assert sharded > 0, name
    latents = np.asarray(pipe(prompt_embeds=data["embeds"], height=64, width=64, num_frames=33, noise=list(draws),
                              output_type="latent", **settings))
    error = float(np.linalg.norm(latents - data["expected"]) / np.linalg.norm(data["expected"]))
    assert error <= 1e-3, (name, error)
    print(f"ok {name} sharded={sharded} error={error:.1e}")
"""


def test_from_pretrained_on_a_mesh_samples_like_diffusers(saved, tmp_path):
    """On 8 CPU devices (data=2 x fsdp=4), both folder kinds load sharded by the rules and sample
    what diffusers samples: the whole path of `from_pretrained(path, mesh=)`, end to end."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder, draws, expected, settings = saved
    converted = tmp_path / "converted"
    convert(str(folder), str(converted), dtype="keep", progress=False)
    arrays = tmp_path / "inputs.npz"
    np.savez(arrays, count=len(draws), embeds=ref.prompt_embeddings(0, 5), expected=np.asarray(expected),
             **{f"draw{i}": np.asarray(d) for i, d in enumerate(draws)})
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(folder), str(converted), str(arrays), json.dumps(settings)],
        capture_output=True, text=True, timeout=600, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ok diffusers" in result.stdout and "ok converted" in result.stdout, result.stdout
