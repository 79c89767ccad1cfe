"""Weights placed in the chunk program's own parameter layouts (sampling/parameter_layouts.py).

The CPU compiler keeps row-major layouts, so the TPU's choice is simulated: every matrix of the
compiled formats is turned column-major before the weights are placed. The checks: the chunk
program then compiles with those layouts as given (no copy back), the video is the default
layouts' video, host offload keeps the layouts, and HELIOS_PARAMETER_LAYOUTS is checked.
"""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental.layout import Format, Layout

from helios_jax import HeliosPipeline, parallel
from helios_jax.aot.steps import distilled_sampling
from helios_jax.offload import to_device, to_host
from helios_jax.sampling import parameter_layouts
from helios_jax.sampling.abstract_chunk import chunk_arguments

KWARGS = dict(num_frames=66, height=64, width=64, pyramid_num_inference_steps_list=(1, 1, 1),
              is_amplify_first_chunk=False, output_type="latent", seed=3)


def column_major(formats):
    def flip(fmt):
        rank = len(fmt.layout.major_to_minor)
        if rank < 2:
            return fmt
        return Format(Layout(major_to_minor=tuple(reversed(range(rank)))), fmt.sharding)

    return jax.tree.map(flip, formats, is_leaf=lambda x: isinstance(x, Format))


def layouts(module):
    return [tuple(v.get_value().format.layout.major_to_minor) for _, v in nnx.to_flat_state(nnx.state(module))
            if getattr(v.get_value(), "ndim", 0) >= 2]


def run(pipe):
    return np.asarray(pipe("a boat", **KWARGS))


@pytest.fixture(scope="module")
def pipelines():
    default = HeliosPipeline.tiny_random("distilled", quantize="int8")
    placed = HeliosPipeline.tiny_random("distilled", quantize="int8")
    transformer = nnx.eval_shape(lambda: placed.transformer)
    mesh = parameter_layouts.layout_mesh(None)
    scheduler, settings = distilled_sampling()
    arguments = chunk_arguments(transformer.config, scheduler, settings, mesh, latent_height=8, latent_width=8)
    graphdef, state = parallel.place_abstract(transformer, mesh)
    formats = parameter_layouts.parameter_formats(
        parameter_layouts.compile_chunk_program(graphdef, state, arguments, mesh, auto_layouts=True))
    parameter_layouts.place_in_formats(placed.transformer, column_major(formats))
    placed = HeliosPipeline(placed.transformer, placed.vae, placed.scheduler, placed.text_encoder, is_distilled=True)
    return default, placed


def test_the_chunk_program_takes_the_placed_layouts_and_gives_the_same_video(pipelines):
    default, placed = pipelines
    flipped = layouts(placed.transformer)
    assert flipped and all(m == tuple(reversed(range(len(m)))) for m in flipped)
    expected, got = run(default), run(placed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The program compiles with the parameters in the placed layouts, as they are on the device.
    mesh = parameter_layouts.layout_mesh(None)
    scheduler, settings = distilled_sampling()
    spec, inputs, tables = chunk_arguments(placed.transformer.config, scheduler, settings, mesh, latent_height=8,
                                           latent_width=8)
    compiled = placed._chunk_program.lower(spec, placed._state, inputs, tables).compile()
    taken = [tuple(f.layout.major_to_minor) for f in jax.tree.leaves(compiled.input_formats[0][0])
             if len(f.layout.major_to_minor) >= 2]
    assert taken == flipped
    assert layouts(placed.transformer) == flipped


def test_host_offload_keeps_the_layouts(pipelines):
    _, placed = pipelines
    before = layouts(placed.transformer)
    to_host(placed.transformer)
    assert all(v.get_value().sharding.memory_kind == "pinned_host" for _, v in nnx.to_flat_state(nnx.state(placed.transformer)))
    to_device(placed.transformer)
    assert layouts(placed.transformer) == before


def test_compiled_layouts_for_int8_on_tpu_only_unless_forced(monkeypatch):
    class Device:
        def __init__(self, platform):
            self.platform = platform

    monkeypatch.delenv(parameter_layouts.FORCE_VARIABLE, raising=False)
    assert parameter_layouts.wants_compiled_layouts(Device("tpu"), "int8")
    assert not parameter_layouts.wants_compiled_layouts(Device("tpu"), None)
    assert not parameter_layouts.wants_compiled_layouts(Device("gpu"), "int8")
    monkeypatch.setenv(parameter_layouts.FORCE_VARIABLE, "compiled")
    assert parameter_layouts.wants_compiled_layouts(Device("cpu"), None)
    monkeypatch.setenv(parameter_layouts.FORCE_VARIABLE, "default")
    assert not parameter_layouts.wants_compiled_layouts(Device("tpu"), "int8")
    monkeypatch.setenv(parameter_layouts.FORCE_VARIABLE, "tiled")
    with pytest.raises(ValueError, match="HELIOS_PARAMETER_LAYOUTS='tiled': must be one of compiled, default"):
        parameter_layouts.wants_compiled_layouts(Device("tpu"), "int8")


def test_forced_compiled_layouts_place_the_loaded_weights_and_generate(monkeypatch):
    """The whole load path: the placement compiles the chunk program once with Layout.AUTO and the
    pipeline's weights come out in the compiled formats."""
    monkeypatch.setenv(parameter_layouts.FORCE_VARIABLE, "compiled")
    messages = []
    pipe = HeliosPipeline.tiny_random("distilled", progress=messages.append)
    assert any("parameter layouts" in m for m in messages)
    monkeypatch.setenv(parameter_layouts.FORCE_VARIABLE, "default")
    reference = HeliosPipeline.tiny_random("distilled")
    np.testing.assert_array_equal(run(pipe), run(reference))


def test_compiled_layouts_remove_the_copy_of_the_stacked_int8_weights_on_a_v5e_chip(monkeypatch):
    """The TPU compiler's own plan: two 14B-shaped int8 layers, chunk program with the default
    layouts vs the ones it picks (the full 40 layers: 16.03 GiB refused vs 14.12, docs/scaling.md)."""
    pytest.importorskip("libtpu")
    from helios_jax.aot.generate import compile_chunk
    from helios_jax.aot.steps import build_mesh, model_config
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.sampling.pipeline import quantized_builder
    from helios_jax.tpu_topology import topology_devices

    mesh = build_mesh(topology_devices("v5e:1x1"), {"fsdp": -1})
    config = model_config("helios_14b", "rollout", "pallas_tpu")
    config.num_layers = 2
    build = quantized_builder(lambda: HeliosTransformer3DModel(config, rngs=nnx.Rngs(0)), "int8")
    temporaries = {}
    for mode in ("default", "compiled"):
        monkeypatch.setenv(parameter_layouts.FORCE_VARIABLE, mode)
        _, compiled = compile_chunk(build, config, mesh, (9, 24, 40), "int8")
        temporaries[mode] = compiled.memory_analysis().temp_size_in_bytes
    # Two layers' int8 matrices are ~0.1 GiB: the copy the default layouts cost.
    assert temporaries["default"] - temporaries["compiled"] > 0.05 * 2**30, temporaries
