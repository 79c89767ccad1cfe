"""Sharding checks on 8 CPU devices, run as a script by tests/test_parallel.py (the device count
must be set before jax starts). argv: a diffusers transformer folder and its conversion.

Each check prints one `ok NAME` line; any failure exits non-zero with its traceback.
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import helios_jax  # noqa: E402
from helios_jax import parallel  # noqa: E402
from helios_jax.models.example_inputs import example_inputs  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel  # noqa: E402
from helios_jax.models.transformer_config import preset  # noqa: E402

TOLERANCE = 1e-5
LATENT_SIZE = (9, 8, 8)  # 184 tokens with history: divisible by seq = 2, 4 and 8


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def flat_values(module) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}


def assert_sharded_where_the_rules_say(module, mesh, what: str) -> int:
    """Every parameter the rules split is split on every device: no device holds it whole."""
    count = 0
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        value = variable.get_value()
        expected = parallel.parameter_sharding(variable, mesh)
        assert value.sharding.is_equivalent_to(expected, value.ndim), (what, path, value.sharding, expected)
        if any(axis is not None for axis in expected.spec):
            count += 1
            for shard in value.addressable_shards:
                assert np.prod(shard.data.shape) < np.prod(value.shape), (what, path, shard.data.shape)
    assert count > 10, (what, count)
    return count


def run_forward(model, inputs, mesh):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    with parallel.use_mesh(mesh):
        program = forward.lower(state, inputs).as_text()
        return np.asarray(forward(state, inputs)), program


def check_make_mesh():
    mesh = parallel.make_mesh(data=2, fsdp=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "seq": 1}, mesh.shape
    assert parallel.make_mesh(tensor=2).devices.size == 2
    for bad in (dict(data=3, fsdp=-1), dict(fsdp=16)):
        try:
            parallel.make_mesh(**bad)
        except ValueError:
            continue
        raise AssertionError(f"make_mesh({bad}) did not raise")
    print("ok make_mesh")


def check_forward():
    """Sharded forward == unsharded forward for meshes sharding each axis, params via init_sharded."""
    config = preset("tiny")
    build = lambda: HeliosTransformer3DModel(config, rngs=nnx.Rngs(0))  # noqa: E731
    inputs = example_inputs(config, LATENT_SIZE, batch=2, text_len=16, real_text_len=8)
    one_device = parallel.make_mesh(devices=jax.devices()[:1])
    reference, _ = run_forward(parallel.init_sharded(build, one_device), inputs, None)
    # Two compiles cover every axis (the 2-core CI budget): params and batch split, then tokens.
    meshes = {"data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2), "seq=4": dict(seq=4)}
    for name, sizes in meshes.items():
        mesh = parallel.make_mesh(**sizes)
        model = parallel.init_sharded(build, mesh)
        output, program = run_forward(model, inputs, mesh)
        error = relative_error(output, reference)
        assert error <= TOLERANCE, (name, error)
        for axis in sizes:  # the constraints (and parameter shardings) name each axis in the program
            assert f'"{axis}"' in program, (name, axis)
        if "fsdp" in sizes or "tensor" in sizes:
            assert_sharded_where_the_rules_say(model, mesh, name)
        print(f"ok forward {name} error={error:.2e}")


def check_loading(diffusers_folder: str, converted_folder: str):
    """From a converted folder (Orbax) and from diffusers safetensors: sharded by the rules, and the
    same values as an unsharded load."""
    plain = {k: np.asarray(v) for k, v in flat_values(helios_jax.load(diffusers_folder)).items()}
    for sizes in (dict(fsdp=2, tensor=4),):
        mesh = parallel.make_mesh(**sizes)
        for what, folder in (("diffusers", diffusers_folder), ("converted", converted_folder)):
            model = helios_jax.load(folder, mesh=mesh)
            count = assert_sharded_where_the_rules_say(model, mesh, what)
            values = flat_values(model)
            assert values.keys() == plain.keys()
            for key, value in values.items():
                assert np.array_equal(np.asarray(value), plain[key]), (what, key)
            print(f"ok load {what} {sizes} sharded={count}")


def check_pipeline():
    """A tiny Distilled pipeline with CFG on data=2 x fsdp=4 samples what one device samples."""
    from helios_jax.sampling.pipeline import HeliosPipeline
    from helios_jax.sampling.variants import PIPELINE_FLAGS
    from helios_jax.tiny_random import tiny_random_components

    def generate(mesh):
        components = tiny_random_components("distilled", seed=0)
        if mesh is not None:
            parallel.shard_state(components["transformer"], mesh)
            parallel.shard_state(components["vae"], mesh)
        pipe = HeliosPipeline(**components, **PIPELINE_FLAGS["distilled"])
        assert pipe.mesh is mesh, pipe.mesh
        text_dim = pipe.transformer.config.text_dim
        embeds = np.random.default_rng(0).standard_normal((2, 1, 16, text_dim)).astype(np.float32)
        chunk = next(pipe.iter_chunks(
            prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=64, width=64, num_frames=33,
            pyramid_num_inference_steps_list=[1, 1, 1], guidance_scale=3.0, is_amplify_first_chunk=False,
            seed=0))
        return np.asarray(chunk.latents), chunk.frames

    import warnings

    warnings.simplefilter("ignore")  # CFG on a distilled model warns; the test wants the cond+uncond batch
    single_latents, single_frames = generate(None)
    mesh = parallel.make_mesh(data=2, fsdp=4)
    latents, frames = generate(mesh)
    error = relative_error(latents, single_latents)
    assert error <= TOLERANCE, error
    assert np.abs(frames.astype(int) - single_frames.astype(int)).max() <= 1
    print(f"ok pipeline error={error:.2e}")


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    check_make_mesh()
    check_forward()
    check_loading(sys.argv[1], sys.argv[2])
    check_pipeline()
    print("all ok")
