"""The `helios-jax` command as a user runs it: exit codes, one-line errors, no libtpu noise on a CPU host."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from helios_jax import backend_env


def run(*args):
    return subprocess.run([sys.executable, "-m", "helios_jax", *args], capture_output=True, text=True, timeout=600)


# What libtpu prints when it loads on a host that is not a TPU VM (seen with libtpu 0.0.50 on a CPU host).
LIBTPU_NOISE = re.compile(r"libtpu|TPU_|accelerator type|worker hostname|InitGoogle|Source Location Trace|"
                          r"metadata|GetMetadata|common_lib\.cc", re.IGNORECASE)
needs_cpu_host_with_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or backend_env.tpu_may_be_present(),
    reason="needs libtpu installed on a host without TPU (where libtpu would print its warnings)")


def libtpu_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if LIBTPU_NOISE.search(line)]


def test_forward_on_tiny_random_model():
    result = run("forward", "--model", "tiny-random", "--latent-size", "3,8,8", "--config.num_layers=3")
    assert result.returncode == 0, result.stderr
    assert not libtpu_lines(result.stderr), result.stderr
    assert "layers=3" in result.stdout
    assert "output (velocity for the current chunk): (1, 4, 3, 8, 8)" in result.stdout


def test_bad_inputs_exit_non_zero_with_one_line_naming_the_culprit(tmp_path):
    cases = [
        (("forward", "--model", str(tmp_path / "absent")), "absent"),
        (("forward", "--model", "tiny-random", "--config.heads=3"), "--config.heads"),
        (("forward", "--model", "tiny-random", "--config", "nope.py"), "nope.py"),
    ]
    for args, culprit in cases:
        result = run(*args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], result.stderr


def test_help_and_version():
    assert run("--help").returncode == 0
    assert run("forward", "--help").returncode == 0
    assert "helios-jax" in run("--version").stdout


@needs_cpu_host_with_libtpu
def test_generate_on_a_cpu_host_prints_no_libtpu_warnings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != backend_env.DEFAULTS_MARKER}
    result = subprocess.run([sys.executable, "-m", "helios_jax", "generate", "--model", "tiny-random", "--prompt",
                             "a red car", "--num-frames", "33", "--pyramid-steps", "1,1,1", "--no-amplify-first-chunk",
                             "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "v.mp4").is_file()
    assert not libtpu_lines(result.stderr), result.stderr


def fake_environ(**values):
    return {"TPU_LIBRARY_PATH": "/opt/libtpu.so", **values}


@pytest.fixture
def cpu_host(tmp_path, monkeypatch):
    """An empty /dev and PCI bus for the TPU checks: a host with no TPU device."""
    dev, pci = tmp_path / "dev", tmp_path / "pci"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").touch()  # the VFIO control device: on hosts without TPU too
    (pci / "0000:00:04.0").mkdir(parents=True)
    (pci / "0000:00:04.0" / "vendor").write_text("0x1af4\n")
    original = backend_env.tpu_may_be_present
    monkeypatch.setattr(backend_env, "tpu_may_be_present",
                        lambda environ=os.environ: original(environ, dev=dev, pci_devices=pci))
    return dev, pci


def test_quiet_libtpu_sets_answers_only_on_a_host_without_tpu(cpu_host, monkeypatch):
    environ = fake_environ()
    assert backend_env.quiet_libtpu_without_tpu(environ)
    assert environ["TPU_WORKER_HOSTNAMES"] == "localhost" and environ["TPU_ACCELERATOR_TYPE"]
    assert environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1" and environ["TPU_SKIP_MDS_QUERY"] == "1"
    # A child process inherits these: they are ours, not a TPU set-up, so it quiets libtpu too.
    assert not backend_env.tpu_may_be_present(dict(environ))
    # aot's compile target replaces the CPU-host accelerator type, never a value the user set.
    backend_env.quiet_libtpu("v5p-16", environ)
    assert environ["TPU_ACCELERATOR_TYPE"] == "v5p-16"
    user = fake_environ(TPU_SKIP_MDS_QUERY="0")
    backend_env.quiet_libtpu("v5p-16", user)
    assert user["TPU_SKIP_MDS_QUERY"] == "0" and user["TPU_ACCELERATOR_TYPE"] == "v5p-16"

    for configured in (dict(TPU_ACCELERATOR_TYPE="v5litepod-8"), dict(TPU_WORKER_HOSTNAMES="h0,h1"),
                       dict(JAX_PLATFORMS="tpu,cpu"), dict(JAX_FORCE_TPU_INIT="1")):
        environ = fake_environ(**configured)
        assert not backend_env.quiet_libtpu_without_tpu(environ), configured
        assert environ == fake_environ(**configured)  # a TPU set-up is left as it is
    environ = {}
    monkeypatch.setattr(backend_env.importlib.util, "find_spec", lambda name: None)
    assert not backend_env.quiet_libtpu_without_tpu(environ) and environ == {}  # no libtpu: nothing to quiet


@pytest.mark.parametrize("device", ["accel0", "vfio_group", "google_pci"])
def test_a_tpu_device_leaves_the_environment_alone(cpu_host, device):
    dev, pci = cpu_host
    if device == "accel0":
        (dev / "accel0").touch()  # TPU v2-v4 VMs
    elif device == "vfio_group":
        (dev / "vfio" / "0").touch()  # v5e, v6e
    else:
        (pci / "0000:00:05.0").mkdir()
        (pci / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
    environ = fake_environ()
    assert not backend_env.quiet_libtpu_without_tpu(environ) and environ == fake_environ()
