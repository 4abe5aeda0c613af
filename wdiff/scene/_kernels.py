"""Numba kernel that pools a tensor of ``accumulated.safetensors`` straight from the file.

The scene is built from the results of a whole model (a 7B model's map is 28 GB). Reading it through
a memory map costs a page fault per 4 KiB and numpy's reductions more passes; this kernel ``pread``s
the float32 values in 64 KiB pieces (the size that stays in the CPU cache, see ``wdiff.kernels``)
and folds each piece into the cells without the GIL.

Cells of s x s elements are reduced in two steps that both vectorise: down the rows of a block into a
line of per-column values (elementwise max or sum), then, once per block of rows, across the line into
cells. Memory: one piece, one line (8 bytes a column) and the cell grid. Rows wider than
``MAX_LINE`` columns, and one-row grids, are reduced cell by cell instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from wdiff.kernels import _finite, _is_nan, _read_full

PIECE = 1 << 14  # float32 values per read: 64 KiB
MAX_LINE = 1 << 21  # columns of the per-column line buffer (16 MiB of float64)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _fold_down(values, line, mean):
    """line = max(line, values) or line += values, elementwise; returns the non-finite count."""
    bad = 0
    if mean:
        for q in range(values.size):
            line[q] += values[q]
    else:
        for q in range(values.size):
            line[q] = max(line[q], values[q])  # NaN handled below: max() may drop it
    for q in range(values.size):
        bad += not _finite(values[q])
    if bad and not mean:
        for q in range(values.size):
            if _is_nan(values[q]):
                line[q] = np.nan
    return bad


@njit(nogil=True, cache=True)
def _fold_across(line, cells_row, block_cols, mean):
    """Reduce the line into one row of cells (NaN-aware max, or sums)."""
    for j in range(cells_row.size):
        m = cells_row[j]
        for c in range(j * block_cols, min(line.size, (j + 1) * block_cols)):
            v = line[c]
            if mean:
                m += v
            elif _is_nan(v) or v > m:
                if not _is_nan(m):
                    m = v
        cells_row[j] = m


@njit(nogil=True, cache=True)
def pool_tensor(fd, offset, rows, cols, block_rows, block_cols, mean, cells, buf, line):
    """Pool the rows x cols float32 grid at byte ``offset`` of ``fd`` into ``cells`` (float64).

    ``cells`` must be pre-filled (-inf for max, 0 for mean); mean cells receive sums (the caller
    divides by the element count). Max: a NaN anywhere in a cell makes the cell NaN; +Inf wins.
    ``line`` holds ``cols`` float64 (or is empty: then cells are reduced directly, for one-row grids
    and very wide rows). Returns the number of non-finite values, or -1 when reading failed.
    """
    total = rows * cols
    nonfinite = 0
    direct = line.size < cols
    if not direct:
        line[:] = 0.0 if mean else -np.inf
    for e0 in range(0, total, PIECE):
        n = min(PIECE, total - e0)
        if not _read_full(fd, buf, n * 4, offset + e0 * 4):
            return -1
        k = 0
        while k < n:
            r = (e0 + k) // cols
            c = e0 + k - r * cols
            seg = min(n - k, cols - c)  # this row's part of the piece
            i = r // block_rows
            if direct:
                for q in range(seg):
                    nonfinite += not _finite(buf[k + q])
                _fold_across_at(buf[k : k + seg], cells[i], c, block_cols, mean)
            else:
                nonfinite += _fold_down(buf[k : k + seg], line[c : c + seg], mean)
                if c + seg == cols and (r % block_rows == block_rows - 1 or r == rows - 1):
                    _fold_across(line, cells[i], block_cols, mean)
                    line[:] = 0.0 if mean else -np.inf
            k += seg
    return nonfinite


@njit(nogil=True, cache=True)
def _fold_across_at(values, cells_row, first_col, block_cols, mean):
    """Fold ``values`` (columns first_col.. of one row) into a row of cells."""
    for q in range(values.size):
        j = (first_col + q) // block_cols
        v = values[q]
        m = cells_row[j]
        if mean:
            cells_row[j] = m + v
        elif (_is_nan(v) or v > m) and not _is_nan(m):
            cells_row[j] = v
