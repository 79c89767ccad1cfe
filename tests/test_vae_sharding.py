"""The VAE's activation axis names take effect: the activation rules map `height` to `seq`, so on a
mesh with seq=4 the decode is partitioned spatially over 4 CPU devices and gives the unsharded frames. Runs in a
subprocess because the device count must be set before jax starts."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from helios_jax import parallel
    from helios_jax.models.vae import AutoencoderKLWan
    from helios_jax.models.vae_config import preset

    vae = AutoencoderKLWan(preset("tiny"), rngs=nnx.Rngs(0))
    z = np.random.default_rng(0).standard_normal((1, 4, 3, 8, 12)).astype(np.float32)
    unsharded = np.asarray(vae.decode(z))
    graphdef, state = nnx.split(vae)

    @jax.jit
    def decode(state, z):
        frames = nnx.merge(graphdef, state).decode_frames(jnp.moveaxis(z, 1, -1))[0]
        return jnp.moveaxis(frames, -1, 1)

    mesh = parallel.make_mesh(seq=4)
    with parallel.use_mesh(mesh):
        program = decode.lower(state, z).as_text()
        sharded = np.asarray(decode(state, z))
    constraints = program.count('[{}, {}, {"seq"}, {}, {}]')
    error = np.abs(sharded - unsharded).max() / np.abs(unsharded).max()
    print(f"constraints={constraints} error={error:.3e}")
    assert constraints >= 10, constraints
    assert error <= 1e-4, error
    """
)


def test_decode_partitions_spatially_over_seq():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "constraints=" in result.stdout
