"""TPU slices described by libtpu on a machine without TPUs: abstract devices to build a mesh on,
the HBM of each generation, and the environment libtpu wants before it loads. The bottom layer of
ahead-of-time compilation (helios_jax/aot/), also used by the kernels' compile checks."""
from __future__ import annotations

import math


class TopologyError(ValueError):
    """Bad --topology / --mesh / --task: the message names the flag."""


HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def quiet_libtpu_environment(topology: str) -> None:
    """libtpu looks for TPU VM metadata when it loads and prints warnings when there is none;
    a compile-only run has none to find, so say what it would have found (one local worker, the
    topology's accelerator type; see helios_jax.backend_env). Must run before libtpu is loaded;
    the compiled target is the --topology given, whatever these say. Values the user set are kept;
    the CPU-host defaults `helios-jax` sets at start-up give way to the topology's type."""
    from helios_jax.backend_env import quiet_libtpu

    generation, _, shape = topology.partition(":")
    try:
        chips = math.prod(int(n) for n in shape.split("x"))
    except ValueError:
        chips = None  # topology_devices reports the bad name
    # Accelerator type names count TensorCores: two per chip on v4/v5p, one on v5e/v6e.
    names = {} if chips is None else {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}",
                                      "v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}
    quiet_libtpu(names.get(generation.lower()))


def topology_devices(name: str) -> list:
    """Abstract devices of a TPU slice such as `v5p:2x2x2` or `v5e:2x4` (needs libtpu)."""
    from jax.experimental import topologies

    if ":" not in name:
        raise TopologyError(f"--topology must look like v5p:2x2x2 or v5e:2x4; got {name!r}")
    try:
        import libtpu  # noqa: F401 - only to say clearly what is missing
    except ImportError:
        raise TopologyError("--topology needs libtpu to describe TPU devices: pip install 'jax[tpu]'") from None
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as error:  # libtpu raises XlaRuntimeError/ValueError with long texts
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TopologyError(f"--topology {name!r} is not a TPU topology libtpu knows: {first}") from None


def hbm_gib(topology: str) -> float | None:
    generation = topology.split(":")[0].lower()
    return HBM_GIB.get(generation)

