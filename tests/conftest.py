"""Shared test setup: no network, CPU, deterministic references."""
import os

from tests.xla_flags import FAST_COMPILE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Before jax is imported; subprocesses inherit it (scripts that add a device count append to it).
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()
