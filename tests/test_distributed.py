"""Multi-host: two `jax.distributed` processes on loopback, 4 CPU devices each, run the tiny
transformer sharded over all 8 devices (data=2 x fsdp=4) and must give what one device gives,
both with parameters placed from a host copy and restored by each host from a converted (Orbax)
checkpoint straight into the cross-host sharding.

The same file is the worker: `python tests/test_distributed.py OUT.npy` (with the JAX_* variables
set) is one host of the run. CPU collectives across processes go through gloo, jax's default
CPU collectives in jax 0.12.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.xla_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parents[1]
DEVICES_PER_PROCESS = 4
PROCESSES = 2
BATCH = 2  # split over the data axis: each data rank (one per host) gets one sample


def tiny_model_and_inputs():
    """The same weights and inputs in every process: init draws from numpy seeded by the key."""
    from flax import nnx

    from helios_jax.models import transformer_config
    from helios_jax.models.example_inputs import example_inputs
    from helios_jax.models.transformer import HeliosTransformer3DModel

    config = transformer_config.preset("tiny", num_attention_heads=4, attention_head_dim=12, ffn_dim=64)
    model = HeliosTransformer3DModel(config, rngs=nnx.Rngs(0))
    inputs = example_inputs(config, (3, 8, 8), batch=BATCH, text_len=16, real_text_len=8, seed=1)
    return model, {k: np.asarray(v) for k, v in inputs.items()}


def run_worker(out_path: str, converted: str) -> None:
    from helios_jax import distributed

    assert distributed.initialize_if_configured(), "the JAX_* variables should have started a multi-host run"
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from helios_jax.parallel import activation_sharding, make_mesh, sharding_for

    assert jax.process_count() == PROCESSES and jax.device_count() == PROCESSES * DEVICES_PER_PROCESS
    mesh = make_mesh(data=2, fsdp=4)
    model, inputs = tiny_model_and_inputs()
    graphdef, state = nnx.split(model)

    def global_array(value, sharding):
        # Each process fills only the shards of its own devices, from the host copy.
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def place(var):
        value = np.asarray(var.get_value())
        axes = tuple(var.get_metadata().get("out_sharding") or ()) or (None,) * value.ndim
        return var.replace(global_array(value, sharding_for(value.shape, axes, mesh)))

    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharded_params = sum(1 for x in jax.tree.leaves(state) if not x.sharding.is_fully_replicated)
    assert sharded_params > 0, "no parameter was sharded by its logical axes"
    batch_axes = lambda v: ("batch",) + (None,) * (v.ndim - 1)  # noqa: E731
    placed = {k: global_array(v, activation_sharding(v.shape, batch_axes(v), mesh)) if not k.startswith("indices")
              else global_array(v, sharding_for(v.shape, (None,) * v.ndim, mesh)) for k, v in inputs.items()}
    assert not placed["hidden_states"].sharding.is_fully_replicated

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    out = forward(state, placed)
    assert not out.is_fully_addressable  # a truly global array, half on each host
    gathered = multihost_utils.process_allgather(out, tiled=True)

    # The checkpoint: every host restores only its own devices' shards.
    import helios_jax

    restored = helios_jax.load(converted, mesh=mesh)
    restored_graphdef, restored_state = nnx.split(restored)
    leaves = jax.tree.leaves(nnx.state(restored, nnx.Param))
    assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves)
    assert any(not leaf.is_fully_addressable for leaf in leaves), "no restored parameter spans both hosts"
    for leaf in leaves:  # no device holds more than its shard
        assert all(shard.data.shape == leaf.sharding.shard_shape(leaf.shape) for shard in leaf.addressable_shards)
    checkpoint_inputs = {k: global_array(v, placed[k].sharding) for k, v in checkpoint_example(restored.config).items()}

    @jax.jit
    def restored_forward(state, inputs):
        return nnx.merge(restored_graphdef, state)(**inputs)

    from_checkpoint = multihost_utils.process_allgather(restored_forward(restored_state, checkpoint_inputs), tiled=True)
    if jax.process_index() == 0:
        np.savez(out_path, placed=np.asarray(gathered), checkpoint=np.asarray(from_checkpoint))
    distributed.log("worker done")  # printed by process 0 only


def checkpoint_example(config) -> dict:
    from helios_jax.models.example_inputs import example_inputs

    inputs = example_inputs(config, (3, 8, 8), batch=BATCH, text_len=16, real_text_len=8, seed=2)
    return {k: np.asarray(v) for k, v in inputs.items()}


def converted_checkpoint(folder: Path) -> Path:
    """A random fp32 diffusers transformer (tests/diffusers_reference.py) saved and converted."""
    from checkpoints_convert.convert import convert
    from tests import diffusers_reference

    diffusers_reference.build_reference(seed=5).save_pretrained(folder / "diffusers")
    convert(folder / "diffusers", folder / "converted", dtype="keep", progress=False)  # fp32: a tight comparison
    return folder / "converted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    import jax
    from flax import nnx

    out_path = tmp_path / "out.npz"
    converted = converted_checkpoint(tmp_path)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(PROCESSES), XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    # Output to files, not pipes: a worker blocked on a full pipe would stall the other in a collective.
    logs = [tmp_path / f"process{i}.log" for i in range(PROCESSES)]
    workers = [subprocess.Popen([sys.executable, __file__, str(out_path), str(converted)], env={**env, "JAX_PROCESS_ID": str(i)},
                                stdout=open(log, "w"), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        for worker in workers:
            worker.wait(timeout=120)
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail("multi-host workers did not finish in 120 s:\n" + logs[0].read_text()[-2000:])
    outputs = [log.read_text() for log in logs]
    for i, worker in enumerate(workers):
        assert worker.returncode == 0, f"process {i} failed:\n{outputs[i][-3000:]}"
    assert "worker done" in outputs[0] and "worker done" not in outputs[1]  # log: process 0 only

    model, inputs = tiny_model_and_inputs()
    graphdef, state = nnx.split(model)
    expected = np.asarray(jax.jit(lambda s, i: nnx.merge(graphdef, s)(**i))(state, inputs))
    got = np.load(out_path, allow_pickle=False)
    import helios_jax

    restored = helios_jax.load(converted)
    restored_graphdef, restored_state = nnx.split(restored)
    expected_checkpoint = np.asarray(jax.jit(lambda s, i: nnx.merge(restored_graphdef, s)(**i))(
        restored_state, checkpoint_example(restored.config)))
    for name, reference in (("placed", expected), ("checkpoint", expected_checkpoint)):
        assert got[name].shape == reference.shape, name
        error = np.linalg.norm(got[name] - reference) / np.linalg.norm(reference)
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def test_explicit_settings_from_environment():
    from helios_jax.distributed import explicit_settings, initialize_if_configured

    assert explicit_settings({}) is None
    assert not initialize_if_configured({})  # one host: nothing to join
    settings = explicit_settings({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                  "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert settings == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=[0, 1])


@pytest.mark.parametrize("environ, flag", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID"),
])
def test_bad_settings_name_the_variable(environ, flag):
    from helios_jax.distributed import explicit_settings

    with pytest.raises(ValueError, match=flag):
        explicit_settings(environ)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_worker(sys.argv[1], sys.argv[2])
