"""Where a Pallas kernel's shard_map splits its operands: the TPU compiler cannot partition a
Mosaic call, so under a mesh the kernels wrap themselves in a shard_map over the mesh's
automatic axes (those not already manual, e.g. inside Ulysses)."""
from __future__ import annotations

from jax.sharding import AxisType

BATCH_AXES = ("data", "fsdp")


def automatic_axes(mesh) -> dict[str, int]:
    """{axis: size} of the mesh's automatic axes of size > 1 (empty without a mesh)."""
    if mesh.empty:
        return {}
    return {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
            if kind != AxisType.Manual and size > 1}


def batch_axes(auto: dict[str, int], batch: int) -> tuple[str, ...] | None:
    """The batch axes (data, then fsdp) that together divide `batch`; None when none does."""
    axes, product = [], 1
    for name in BATCH_AXES:
        if name in auto and batch % (product * auto[name]) == 0:
            axes.append(name)
            product *= auto[name]
    return tuple(axes) or None


def axis_if_divides(auto: dict[str, int], name: str, size: int) -> str | None:
    return name if name in auto and size % auto[name] == 0 else None


HEADS_AXIS = "tensor"  # attention heads split over tensor parallelism
QUERY_AXIS = "seq"  # queries split over sequence parallelism (k/v stay whole)


def attention_specs(mesh, q_shape):
    """(q, k/v) PartitionSpecs of an attention kernel's shard_map over the mesh's automatic axes:
    batch over the batch axes, heads over `tensor`, queries over `seq` where they divide; None when
    there is nothing to split."""
    from jax.sharding import PartitionSpec

    auto = automatic_axes(mesh)
    if not auto:
        return None
    batch, q_len, heads, _ = q_shape
    batch_spec = batch_axes(auto, batch)
    heads_axis = axis_if_divides(auto, HEADS_AXIS, heads)
    query_axis = axis_if_divides(auto, QUERY_AXIS, q_len)
    return (PartitionSpec(batch_spec, query_axis, heads_axis, None),
            PartitionSpec(batch_spec, None, heads_axis, None))


def check_block_sizes(who: str, lanes: int, **blocks) -> None:
    """Tile sizes given to a kernel must be positive multiples of the vector lanes (None: default)."""
    for name, block in blocks.items():
        if block is not None and (block <= 0 or block % lanes):
            raise ValueError(f"{who}: {name} must be a positive multiple of {lanes}; got {block}")


def on_mesh_axes(attention, q, k, v):
    """`attention(q, k, v)` per device in a shard_map over the active mesh's automatic axes
    (`attention_specs`), or as it is where there is nothing to split; None for the caller to decide
    when there is no such axis. check_vma off: k/v are replicated over seq while q is split, which
    the kernels do not mind, and Pallas calls declare no varying axes."""
    import jax

    mesh = jax.sharding.get_abstract_mesh()
    specs = attention_specs(mesh, q.shape)
    if specs is None:
        return None
    q_spec, kv_spec = specs
    return jax.shard_map(attention, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)

