"""Moving a module's parameters between device memory and host memory, keeping their sharding.

The whole generate does not need every component on the device at once: the text encoder runs once
per prompt, before any chunk. `to_host(module)` puts each parameter in the host memory of its own
devices (memory kind `pinned_host`, the same sharding, multi-host too) and frees the device copy;
`to_device(module)` brings it back; device_put keeps each array's layout across memories (the
compiled parameter layouts, sampling/parameter_layouts.py). Arrays move one at a time, so a move
never needs room for a second copy of the module on the device.
"""
from __future__ import annotations

import jax
from flax import nnx

HOST, DEVICE = "pinned_host", "device"


def _move(module: nnx.Module, memory_kind: str) -> nnx.Module:
    for _, variable in nnx.to_flat_state(nnx.state(module)):
        value = variable.get_value()
        if not isinstance(value, jax.Array) or value.sharding.memory_kind == memory_kind:
            continue
        moved = jax.device_put(value, value.sharding.with_memory_kind(memory_kind))
        moved.block_until_ready()
        value.delete()  # the old copy goes now, not when the garbage collector gets to it
        variable.set_value(moved)
    return module


def to_host(module: nnx.Module) -> nnx.Module:
    """Parameters to host memory, device copies freed (in place; returns `module`)."""
    return _move(module, HOST)


def to_device(module: nnx.Module) -> nnx.Module:
    """Parameters back to device memory (in place; returns `module`)."""
    return _move(module, DEVICE)


def on_host(module: nnx.Module) -> bool:
    return any(isinstance(v.get_value(), jax.Array) and v.get_value().sharding.memory_kind == HOST
               for _, v in nnx.to_flat_state(nnx.state(module)))


def device_bytes(module: nnx.Module) -> int:
    """Bytes of `module`'s parameters held by its most loaded device (one shard per parameter)."""
    per_device: dict = {}
    for _, variable in nnx.to_flat_state(nnx.state(module)):
        value = variable.get_value()
        for shard in getattr(value, "addressable_shards", ()):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
