"""Cast a torch-layout tensor and lay it out in ours, into a fresh C-contiguous array.

Our layout usually moves torch's first axis (a linear's or conv's output features) to the end: a
transpose. A plain strided copy of a large transpose walks memory column by column and runs at a
few hundred MB/s; tensorstore's own layout copy is slower still. Copying in bands of a few
thousand source rows keeps both sides of each band in cache (about 5x faster), and casting each
band just before it is copied keeps the temporary small.
"""
from __future__ import annotations

import numpy as np

# Source bytes per band: large enough that per-band overhead is negligible, small enough for L2/L3.
_BAND_BYTES = 8 << 20
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(array: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers: numpy copies those without holding the GIL, which
    it may not do for a custom dtype such as ml_dtypes' bfloat16."""
    return array.view(_UINT[array.dtype.itemsize])


def moves_first_axis_last(source: np.ndarray, ours: np.ndarray) -> bool:
    """Whether `ours` (a view of `source`) has source axis 0 as its last axis, so that bands
    of source rows land in slices `[..., i:j]` of ours."""
    return (ours.ndim >= 2 and source.ndim >= 1 and source.shape[0] > 1 and np.shares_memory(ours, source)
            and ours.shape[-1] == source.shape[0] and ours.strides[-1] == source.strides[0])


def our_shape(source_shape, to_our_layout) -> tuple:
    return to_our_layout(np.broadcast_to(np.zeros((), np.uint8), source_shape)).shape


def cast_to_layout(source: np.ndarray, dtype: np.dtype, to_our_layout, out: np.ndarray | None = None) -> np.ndarray:
    """`to_our_layout(source)` cast to `dtype`, as a C-contiguous array: `out` (of that shape and
    dtype) if given, else a new one."""
    ours = to_our_layout(source)
    if out is None:
        out = np.empty(ours.shape, dtype)
    if not moves_first_axis_last(source, ours):
        np.copyto(out, ours, casting="unsafe")  # no transpose to speak of: one plain copy
        return out
    rows = max(1, _BAND_BYTES // max(1, source[0].nbytes))
    out_bits = _bits(out)
    for start in range(0, source.shape[0], rows):
        band = source[start:start + rows].astype(dtype, copy=False)  # contiguous, cache-sized
        out_bits[..., start:start + rows] = _bits(to_our_layout(band))
    return out
