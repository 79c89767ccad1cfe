"""Multi-host start-up: one process per host, all joined by `jax.distributed` before any jax use.

`initialize_if_configured()` is what the `helios-jax` command calls first. It joins the processes
when the environment says there are several:

- explicitly, with `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (and optionally `JAX_LOCAL_DEVICE_IDS`, comma separated), the same on every
  host except the id; this is how a CPU or GPU cluster, or a test on loopback, starts;
- on a multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` lists more than one host), where jax
  finds the coordinator and the process ids by itself.

Otherwise (one host, one process) it does nothing, so single-machine runs are unchanged.
`log(...)` prints on process 0 only, so N hosts do not print every progress line N times.
"""
from __future__ import annotations

import os
import sys

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"

_initialized = False


def explicit_settings(environ=os.environ) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize` from the JAX_* variables, or None when
    none is set. A partial or malformed set is an error naming the variable."""
    names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
    given = [name for name in names if environ.get(name)]
    if not given:
        return None
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise ValueError(f"{missing[0]} is not set but {given[0]} is: a multi-host run needs "
                         f"{', '.join(names)}")
    settings = dict(coordinator_address=environ[COORDINATOR])
    for name, key in ((NUM_PROCESSES, "num_processes"), (PROCESS_ID, "process_id")):
        try:
            settings[key] = int(environ[name])
        except ValueError:
            raise ValueError(f"{name} must be an integer; got {environ[name]!r}") from None
    if not 0 <= settings["process_id"] < settings["num_processes"]:
        raise ValueError(f"{PROCESS_ID}={settings['process_id']} is not in 0..{settings['num_processes'] - 1}")
    if environ.get(LOCAL_DEVICE_IDS):
        try:
            settings["local_device_ids"] = [int(i) for i in environ[LOCAL_DEVICE_IDS].split(",")]
        except ValueError:
            raise ValueError(f"{LOCAL_DEVICE_IDS} must be comma-separated integers; "
                             f"got {environ[LOCAL_DEVICE_IDS]!r}") from None
    return settings


def is_multihost_tpu(environ=os.environ) -> bool:
    """A Cloud TPU VM that is one host of several (jax auto-detects the rest there)."""
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def initialize_if_configured(environ=os.environ) -> bool:
    """Join the other processes when the environment describes several; True when it did.
    Call before anything touches a jax device (backends cannot change afterwards)."""
    global _initialized
    if _initialized:
        return True
    settings = explicit_settings(environ)
    if settings is None and not is_multihost_tpu(environ):
        return False
    import jax

    jax.distributed.initialize(**(settings or {}))
    _initialized = True
    return True


def process_index() -> int:
    """This process's index; 0 without importing jax when no multi-host run was started."""
    if not _initialized:
        return 0
    import jax

    return jax.process_index()


def is_main_process() -> bool:
    return process_index() == 0


def log(*args, **kwargs) -> None:
    """`print` on process 0 only (progress and reports are the same on every host)."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def error_log(message: str) -> None:
    """Errors are printed by every host: each may fail for its own reason."""
    prefix = f"[process {process_index()}] " if _initialized else ""
    print(prefix + message, file=sys.stderr)
