"""helios_jax.parallel: mesh construction, the rules' divisibility fallback, constraints as no-ops
without a mesh, and (in a subprocess with 8 CPU devices, tests/parallel_worker.py) sharded forward,
sharded loading and a sharded pipeline against their single-device results."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from helios_jax import parallel

ROOT = Path(__file__).resolve().parents[1]


def test_make_mesh_sizes_and_rest_axis():
    mesh = parallel.make_mesh(fsdp=-1)
    assert mesh.axis_names == parallel.AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1, "seq": 1}
    assert dict(parallel.make_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 1, "seq": 1}


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=-1), "only one mesh axis may be -1"),
    (dict(fsdp=0), "positive size or -1"),
    (dict(tensor=-2), "positive size or -1"),
    (dict(seq=1024), "needs 1024 devices"),
])
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(**sizes)


def test_partition_spec_falls_back_to_replication_where_a_size_does_not_divide():
    mesh = jax.sharding.AbstractMesh((2, 4, 2, 1), parallel.AXES)
    # embed -> fsdp (4 divides 24); heads -> tensor first.
    assert parallel.partition_spec((24, 24), ("embed", "heads"), mesh) == PartitionSpec("fsdp", "tensor")
    # 6 is not a multiple of 4: embed stays replicated; heads falls back to fsdp when tensor is taken.
    assert parallel.partition_spec((6, 8), ("embed", "heads"), mesh) == PartitionSpec(None, "tensor")
    assert parallel.partition_spec((3, 8), ("heads", "mlp"), mesh) == PartitionSpec(None, "tensor")
    assert parallel.partition_spec((8, 8), ("heads", "mlp"), mesh) == PartitionSpec("tensor", "fsdp")
    assert parallel.partition_spec((5,), (None,), mesh) == PartitionSpec(None)
    # Activations: batch over data, tokens over seq (size 1 here: replicated).
    rules = parallel.ACTIVATION_RULES
    assert parallel.partition_spec((2, 16, 8), ("batch", "length", "embed"), mesh, rules) == PartitionSpec("data", None, None)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((2, 4, 8))
    assert parallel.constrain(x, ("batch", "length", "embed")) is x
    assert jax.jit(lambda x: parallel.constrain(x, ("batch", "length", "embed")))(x).shape == x.shape
    with parallel.use_mesh(None):
        assert parallel.active_mesh() is None


@pytest.fixture(scope="module")
def transformer_folders(tmp_path_factory):
    """A random diffusers transformer saved with save_pretrained (sharded files) and its conversion."""
    from checkpoints_convert.convert import convert
    from tests import diffusers_reference

    root = tmp_path_factory.mktemp("parallel")
    diffusers_reference.build_reference(seed=1).save_pretrained(root / "diffusers", max_shard_size="40KB")
    convert(root / "diffusers", root / "converted", progress=False)
    return root / "diffusers", root / "converted"


def test_sharded_forward_loading_and_pipeline_on_8_devices(transformer_folders):
    diffusers_folder, converted_folder = transformer_folders
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "parallel_worker.py"), str(diffusers_folder), str(converted_folder)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for check in ("ok make_mesh", "ok forward data=2,fsdp=2,tensor=2", "ok forward seq=4", "ok load diffusers",
                  "ok load converted", "ok pipeline", "all ok"):
        assert check in result.stdout, result.stdout
