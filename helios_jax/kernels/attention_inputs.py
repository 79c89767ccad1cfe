"""The shape and dtype checks every attention kernel makes of its q, k, v ([B, L, H, D])."""
from __future__ import annotations


def check_qkv(q, k, v, who: str = "flash_attention") -> None:
    """One clear error naming the tensor when q, k, v cannot be attended: not 4-D, k/v of different
    shapes, q/k differing in batch, heads or head_dim, mixed dtypes, or an empty sequence."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{who}: {name} must be [batch, length, heads, head_dim]; got shape {t.shape}")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k and v must have one shape; got {k.shape} and {v.shape}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"{who}: q {q.shape} and k {k.shape} differ in batch, heads or head_dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{who}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{who}: needs non-empty sequences; got q {q.shape} and k {k.shape}")
