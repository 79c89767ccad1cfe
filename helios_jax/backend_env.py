"""Environment for libtpu on hosts that have no TPU, set before any jax backend starts (no jax import here).

`jax[tpu]` installs libtpu, and jax loads it when its first backend starts, even on a CPU-only
host. libtpu then asks the TPU VM metadata server for the accelerator type and worker hostnames,
finds none, and prints several warning lines (`Failed to find host bounds for accelerator type:
WARNING: could not determine TPU accelerator type ...`, `unexpected worker hostname 'WARNING:
could not determine TPU worker hostnames ...'`) before jax falls back to the CPU. Naming a worker
(`localhost`) and an accelerator type in the environment answers both questions, and the warnings
go; nothing runs on that type, as there is no chip (jax itself sets TPU_SKIP_MDS_QUERY there).

`quiet_libtpu_without_tpu()` (the `helios-jax` command calls it first) sets them only where
`tpu_may_be_present()` is False: no /dev/accel* device (TPU v2-v4 VMs), no VFIO group under
/dev/vfio (v5e, v6e and later expose chips that way), no PCI device of Google's vendor id 0x1ae0
(the check jax itself makes), and no TPU set-up in the environment (a TPU_* topology variable or
JAX_PLATFORMS naming tpu). Any one of those and nothing is changed, so a real TPU host keeps libtpu's
own discovery. Variables the user set are never changed; those set here are listed in
HELIOS_LIBTPU_DEFAULTS, so a child process (which inherits them) does not take them for a TPU set-up,
and `quiet_libtpu` with a better value (aot's compile target) may replace them.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULTS_MARKER = "HELIOS_LIBTPU_DEFAULTS"  # comma-separated names set by this module, not by the user
CPU_HOST_ACCELERATOR_TYPE = "v5litepod-1"  # any valid name: only its existence silences libtpu
GOOGLE_PCI_VENDOR_ID = "0x1ae0"
# Variables that describe a TPU slice to libtpu or jax: set by a TPU VM image, GKE or the user.
TPU_TOPOLOGY_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_HOST_BOUNDS",
                          "TPU_PROCESS_BOUNDS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_VISIBLE_CHIPS",
                          "TPU_PROCESS_ADDRESSES", "TPU_PROCESS_ADDRESSES_PATH", "JAX_FORCE_TPU_INIT")


def quiet_libtpu_without_tpu(environ=os.environ) -> bool:
    """Set libtpu's answers for a host without TPU chips, where libtpu is installed; True when it did."""
    if not libtpu_installed(environ) or tpu_may_be_present(environ):
        return False
    quiet_libtpu(CPU_HOST_ACCELERATOR_TYPE, environ)
    return True


def quiet_libtpu(accelerator_type: str | None, environ=os.environ) -> None:
    """What libtpu would otherwise ask the metadata server for: one local worker and, when given,
    the accelerator type. Must run before libtpu loads; keeps every value the user set."""
    _set_default("TPU_SKIP_MDS_QUERY", "1", environ)
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for real chips; with none to
    # drive, several processes (tests, a sweep, compiles) may load it side by side.
    _set_default("ALLOW_MULTIPLE_LIBTPU_LOAD", "1", environ)
    _set_default("TPU_WORKER_HOSTNAMES", "localhost", environ)
    if accelerator_type:
        _set_default("TPU_ACCELERATOR_TYPE", accelerator_type, environ)


def tpu_may_be_present(environ=os.environ, *, dev: str | Path = "/dev",
                       pci_devices: str | Path = "/sys/bus/pci/devices") -> bool:
    """False only where this host clearly has no TPU: see the module docstring for the checks."""
    return _tpu_configured(environ) or _tpu_device_files(Path(dev)) or _google_pci_device(Path(pci_devices))


def libtpu_installed(environ=os.environ) -> bool:
    return bool(environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def _tpu_configured(environ) -> bool:
    ours = _defaulted(environ)
    if any(environ.get(name) and name not in ours for name in TPU_TOPOLOGY_VARIABLES):
        return True
    return "tpu" in environ.get("JAX_PLATFORMS", "").lower()


def _tpu_device_files(dev: Path) -> bool:
    if any(dev.glob("accel*")):
        return True
    # /dev/vfio/vfio is the VFIO control device of any host with the module loaded; chips are the groups.
    return any(path.name != "vfio" for path in (dev / "vfio").glob("*"))


def _google_pci_device(pci_devices: Path) -> bool:
    for vendor in pci_devices.glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR_ID:
                return True
        except OSError:
            continue
    return False


def _defaulted(environ) -> set[str]:
    return {name for name in environ.get(DEFAULTS_MARKER, "").split(",") if name}


def _set_default(name: str, value: str, environ) -> None:
    """Set `name` unless the user did (a value this module set may be replaced)."""
    ours = _defaulted(environ)
    if name in environ and name not in ours:
        return
    environ[name] = value
    environ[DEFAULTS_MARKER] = ",".join(sorted(ours | {name}))
