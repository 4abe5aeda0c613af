"""Pool a tensor of ``accumulated.safetensors`` straight from the file (when the compute step did not
already write the cells the scene needs into ``pooled.safetensors``).

``pread`` of 64 KiB pieces (the size that stays in the CPU cache, see ``wdiff.kernels``) folded into
the cells by ``wdiff.kernels.pool_fold``, without the GIL. Memory: one piece, one line of the grid
(8 bytes a column) and the cells.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from wdiff.kernels import CODE_BF16, pool_flush, pool_fold, read_full, widen_bf16

PIECE = 1 << 14  # float32 values per read: 64 KiB


@njit(nogil=True, cache=True)
def pool_tensor(fd, offset, code, rows, cols, block_rows, block_cols, mean, cells, buf, raw, line):
    """Pool the rows x cols grid at byte ``offset`` of ``fd`` into ``cells`` (float64): float32 values
    (``code`` ``wdiff.kernels.CODE_F32``, read into ``buf``) or BF16 (``CODE_BF16``: read into ``raw``,
    ``PIECE`` int16, and widened into ``buf``).

    ``cells`` must be pre-filled (-inf for max, 0 for mean); mean cells receive sums (the caller
    divides by the element count). Max: a NaN anywhere in a cell makes the cell NaN; +Inf wins.
    ``line`` comes from ``wdiff.kernels.pool_line``. Returns the number of non-finite values, or -1
    when reading failed.
    """
    total = rows * cols
    nonfinite = 0
    state = np.full(1, -1, np.int64)
    for e0 in range(0, total, PIECE):
        n = min(PIECE, total - e0)
        if code == CODE_BF16:
            if not read_full(fd, raw, n * 2, offset + e0 * 2):
                return -1
            widen_bf16(raw[:n], buf[:n])
        elif not read_full(fd, buf, n * 4, offset + e0 * 4):
            return -1
        nonfinite += pool_fold(buf[:n], e0, rows, cols, block_rows, block_cols, mean, cells, 0, line, state)
    pool_flush(cells, line, state, block_cols, mean)
    return nonfinite
