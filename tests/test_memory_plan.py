"""Device memory of the whole generate: the memory plans, moving parameters to host memory and
back, the pipeline under each plan, and `helios-jax aot --task generate` on a TPU topology."""
import numpy as np
import pytest
from flax import nnx

from helios_jax import offload
from helios_jax.sampling import memory_plan


def test_choose_plan_keeps_everything_where_it_fits_and_offloads_in_order():
    sizes = dict(transformer_bytes=10, vae_bytes=1, text_bytes=5)
    assert memory_plan.choose_plan(None, **sizes, chunk_temporaries=100) == "resident"  # no limit known (CPU)
    assert memory_plan.choose_plan(40, **sizes, chunk_temporaries=10) == "resident"  # 26 of 36
    assert memory_plan.choose_plan(28, **sizes, chunk_temporaries=10) == "offload_text_encoder"  # 21 (+5) of 25.2
    assert memory_plan.choose_plan(13, **sizes, chunk_temporaries=0) == "sequential"  # 11 of 11.7, not with the text
    # The VAE decode's temporaries beside the transformer do not fit: each component alone.
    big_text = dict(sizes, text_bytes=12)
    assert memory_plan.choose_plan(24, **big_text, chunk_temporaries=10, decode_temporaries=4) == "sequential"
    assert memory_plan.choose_plan(24, **big_text, chunk_temporaries=10, decode_temporaries=12) == "one_at_a_time"
    with pytest.raises(ValueError, match="--memory-plan must be one of"):
        memory_plan.check_plan("everywhere")


def test_to_host_and_back_keeps_values_and_frees_the_device_copy():
    module = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    before = np.asarray(module.kernel.get_value())
    old = module.kernel.get_value()
    offload.to_host(module)
    assert offload.on_host(module) and module.kernel.get_value().sharding.memory_kind == "pinned_host"
    assert old.is_deleted()
    offload.to_device(module)
    assert not offload.on_host(module)
    np.testing.assert_array_equal(np.asarray(module.kernel.get_value()), before)
    assert offload.device_bytes(module) == (8 * 4 + 4) * 4


@pytest.mark.parametrize("plan", ["offload_text_encoder", "sequential", "one_at_a_time"])
def test_pipeline_under_each_plan_samples_what_the_resident_one_samples(plan):
    from helios_jax.sampling.pipeline import HeliosPipeline

    kwargs = dict(num_frames=33, height=64, width=64, pyramid_num_inference_steps_list=(1, 1, 1),
                  is_amplify_first_chunk=False, output_type="latent", seed=3)
    resident = HeliosPipeline.tiny_random("distilled", seed=1)
    expected = resident("a boat", **kwargs)
    pipe = HeliosPipeline.tiny_random("distilled", seed=1, memory_plan=plan)
    assert pipe.memory_plan == plan and offload.on_host(pipe.text_encoder.encoder)
    np.testing.assert_array_equal(pipe("a boat", **kwargs), expected)
    # after the prompt: the text encoder waits on the host, the transformer (and but for one_at_a_time,
    # the VAE) back on the device
    assert offload.on_host(pipe.text_encoder.encoder)
    assert not offload.on_host(pipe.transformer) and offload.on_host(pipe.vae) == (plan == "one_at_a_time")


def test_one_at_a_time_decodes_after_the_last_chunk_with_the_transformer_on_the_host():
    from helios_jax.sampling.pipeline import HeliosPipeline

    kwargs = dict(num_frames=66, height=64, width=64, pyramid_num_inference_steps_list=(1, 1, 1),
                  is_amplify_first_chunk=False, seed=3)
    expected = HeliosPipeline.tiny_random("distilled", seed=1)("a boat", **kwargs)
    pipe = HeliosPipeline.tiny_random("distilled", seed=1, memory_plan="one_at_a_time")
    chunks = list(pipe.iter_chunks("a boat", **kwargs))
    assert [c.index for c in chunks] == [0, 1] and all(c.frames is not None for c in chunks)
    # Decoding: the VAE alone on the device.
    assert offload.on_host(pipe.transformer) and offload.on_host(pipe.text_encoder.encoder)
    assert not offload.on_host(pipe.vae)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks], axis=1)[0], expected)
    np.testing.assert_array_equal(pipe("a boat", **kwargs), expected)  # the next video moves them back
    assert not offload.on_host(pipe.vae) and offload.on_host(pipe.transformer)


def test_plan_peaks_take_the_largest_phase_of_each_plan():
    from helios_jax.aot.generate import ProgramMemory, plan_peaks

    programs = {"text_encoder": ProgramMemory("text_encoder", 12, 11, 0),
                "chunk": ProgramMemory("chunk", 20, 14, 0), "vae_decode": ProgramMemory("vae_decode", 3, 0.5, 0)}
    peaks = plan_peaks(programs)
    assert peaks["resident"] == max(12 + 14.5, 20 + 0.5 + 11, 3 + 14 + 11)
    assert peaks["offload_text_encoder"] == max(12 + 14.5, 20 + 0.5, 3 + 14)
    assert peaks["sequential"] == max(12, 20 + 0.5, 3 + 14)
    assert peaks["one_at_a_time"] == max(12, 20, 3)


def test_aot_generate_compiles_every_program_on_the_auto_mesh_of_a_tpu_slice(capsys):
    pytest.importorskip("libtpu")
    from helios_jax import cli

    code = cli.main(["aot", "--topology", "v5e:2x2", "--model", "tiny", "--task", "generate", "--height", "64",
                     "--width", "64"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text
    assert "mesh auto: fsdp=4: peak" in text and "mesh auto: chose" in text
    for name in ("text_encoder", "chunk", "vae_decode"):
        assert f"  {name}: peak" in text
    for plan in ("resident", "offload_text_encoder", "sequential", "one_at_a_time"):
        assert f"  {plan}" in text
    assert "<- generate takes this" in text and "(16 GiB HBM per chip)" in text


def test_aot_generate_bad_flags_are_one_line(capsys):
    from helios_jax import cli

    assert cli.main(["aot", "--topology", "v5e:2x2", "--task", "generate", "--quantize", "int8", "--model", "tiny",
                     "--height", "100"]) == 2
    assert "multiples of" in capsys.readouterr().err
    assert cli.main(["aot", "--topology", "v5e:2x2", "--task", "rollout", "--quantize", "int8"]) == 2
    assert "--quantize applies to --task generate" in capsys.readouterr().err



@pytest.mark.parametrize("limit,plan,compiles_decode", [(1e12, "resident", False), (1e6, "one_at_a_time", True)])
def test_auto_plan_compiles_the_vae_decode_only_when_memory_is_tight(monkeypatch, limit, plan, compiles_decode):
    from helios_jax.sampling import mesh_choice
    from helios_jax.sampling.pipeline import HeliosPipeline

    monkeypatch.setattr(mesh_choice, "memory_limit", lambda device: limit)
    messages = []
    pipe = HeliosPipeline.tiny_random("distilled", memory_plan="auto", progress=messages.append)
    assert pipe.memory_plan == plan
    assert any("compiling the VAE decode" in m for m in messages) == compiles_decode
