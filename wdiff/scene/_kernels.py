"""Numba kernel that pools a tensor of ``accumulated.safetensors`` straight from the file.

The scene is built from the results of a whole model (a 7B model's map is 28 GB). Reading it through
a memory map costs a page fault per 4 KiB and numpy's reductions another pass; this kernel ``pread``s
the float32 values in 64 KiB pieces (the size that stays in the CPU cache, see ``wdiff.kernels``)
and folds each piece straight into its cells, without the GIL. Memory: one piece plus the cell grid.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from wdiff.kernels import _finite, _is_nan, _read_full

PIECE = 1 << 14  # float32 values per read: 64 KiB


@njit(nogil=True, cache=True)
def pool_tensor(fd, offset, rows, cols, block_rows, block_cols, mean, cells, buf):
    """Pool the rows x cols float32 grid at byte ``offset`` of ``fd`` into ``cells`` (float64).

    ``cells`` must be pre-filled (-inf for max, 0 for mean); mean cells receive sums (the caller
    divides by the element count). Max: a NaN anywhere in a cell makes the cell NaN; +Inf wins.
    Returns the number of non-finite values, or -1 when the file could not be read.
    """
    total = rows * cols
    nonfinite = 0
    for e0 in range(0, total, PIECE):
        n = min(PIECE, total - e0)
        if not _read_full(fd, buf, n * 4, offset + e0 * 4):
            return -1
        k = 0
        while k < n:
            e = e0 + k
            r = e // cols
            c = e - r * cols
            i = r // block_rows
            seg_end = min(n, k + (cols - c))  # this row's part of the piece
            while k < seg_end:
                j = c // block_cols
                end = min(seg_end, k + (j + 1) * block_cols - c)  # this cell's part of the row
                if mean:
                    s = 0.0
                    for q in range(k, end):
                        s += buf[q]
                    cells[i, j] += s
                else:
                    m = cells[i, j]
                    for q in range(k, end):
                        if buf[q] > m:
                            m = buf[q]
                    cells[i, j] = m
                bad = 0
                for q in range(k, end):
                    if not _finite(buf[q]):
                        bad += 1
                if bad:
                    nonfinite += bad
                    if not mean:  # NaN never compares greater: put it in by hand
                        for q in range(k, end):
                            if _is_nan(buf[q]):
                                cells[i, j] = np.nan
                c += end - k
                k = end
    return nonfinite
