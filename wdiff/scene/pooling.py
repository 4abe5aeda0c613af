"""Block pooling: one global factor for the whole model, applied incrementally block by block.

One factor ``s`` for every tensor keeps their true relative sizes in the scene (a pooled cell always
stands for s x s weights, or 1 x s in a one-row tensor); it is the smallest ``s`` whose total cell
count fits the point budget. Pooling is fed the blocks ``AccumulatedFile.blocks`` reads, in any cut:
each block is reduced on its own into the cells it touches (partial cells at its edges) and merged
into the tensor's cell grid, so memory is one block plus the grid.

``max`` keeps hot spots visible however far a tensor is shrunk; ``mean`` shows the typical change.
Non-finite values propagate into their cell (NaN through max and mean), so a pathological weight is
never averaged away.
"""

from __future__ import annotations

import numpy as np

from wdiff.detail import (  # the level of detail is planned there; re-exported for the scene
    POOLS,
    Grid,
    Pool,
    block_shape,
    ceil_div,
    cell_count,
    cell_counts,
    pool_factor,
    to_means,
)

__all__ = [
    "POOLS", "GridPooler", "Pool", "block_shape", "ceil_div", "cell_count", "cell_counts", "coarsen",
    "pool_factor",
]  # fmt: skip


def _reduce_cells(
    values: np.ndarray, first: int, size: int, axis: int, ufunc: np.ufunc, dtype: type | None
) -> np.ndarray:
    """Reduce a 2-D block along ``axis`` into the cells of ``size`` it touches, its element 0 being
    element ``first`` of the grid: a partial head cell, whole cells by reshape, a partial tail.

    Whole cells go through a reshape because ``ufunc.reduceat`` is about 25 times slower on rows.
    """
    n = values.shape[axis]
    head = min(-first % size, n)
    body = (n - head) // size * size
    parts = []
    if head:
        parts.append(ufunc.reduce(values.take(range(head), axis), axis, dtype, keepdims=True))
    if body:
        if axis == 0:
            middle = values[head : head + body].reshape(body // size, size, values.shape[1])
        else:
            middle = values[:, head : head + body].reshape(values.shape[0], body // size, size)
        parts.append(ufunc.reduce(middle, axis + 1, dtype))
    if head + body < n:
        tail = values[head + body :] if axis == 0 else values[:, head + body :]
        parts.append(ufunc.reduce(tail, axis, dtype, keepdims=True))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


class GridPooler:
    """Pool one tensor's grid (rows x cols elements) into cells of ``block`` elements.

    Feed it every block of the grid once (``add``), in any order and cut, then take ``result()``.
    """

    def __init__(self, rows: int, cols: int, block: tuple[int, int], pool: Pool = "max") -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.rows, self.cols, self.block, self.pool = rows, cols, block, pool
        shape = (ceil_div(rows, block[0]), ceil_div(cols, block[1]))
        if pool == "max":
            self._acc = np.full(shape, -np.inf, dtype=np.float32)
        else:
            self._acc = np.zeros(shape, dtype=np.float64)
        self.nonfinite = 0  # non-finite elements seen (NaN or Inf)

    def add(self, row: int, col: int, values: np.ndarray) -> None:
        """Merge a block whose element (0, 0) is element (row, col) of the grid."""
        nr, nc = values.shape
        if nr == 0 or nc == 0:
            return
        self.nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
        (br, bc), (i0, j0) = self.block, (row // self.block[0], col // self.block[1])
        target = self._acc[i0 : (row + nr - 1) // br + 1, j0 : (col + nc - 1) // bc + 1]
        if self.pool == "max":
            part = _reduce_cells(values, row, br, 0, np.maximum, None)
            np.maximum(target, _reduce_cells(part, col, bc, 1, np.maximum, None), out=target)
        else:
            part = _reduce_cells(values, row, br, 0, np.add, np.float64)
            target += _reduce_cells(part, col, bc, 1, np.add, np.float64)

    def result(self) -> np.ndarray:
        """The pooled cells, float32, shape (ceil(rows / br), ceil(cols / bc))."""
        if self.pool == "max":
            return self._acc.copy()
        return to_means(Grid(self.rows, self.cols, self.block, mean=True), self._acc).astype(np.float32)


def coarsen(
    cells: np.ndarray,
    rows: int,
    cols: int,
    block: tuple[int, int],
    new_block: tuple[int, int],
    pool: Pool = "max",
) -> np.ndarray:
    """Pool already pooled cells further, exactly as if pooled from the elements with ``new_block``.

    ``new_block`` must be a multiple of ``block`` on each axis. Max of maxes is the max; a mean is
    re-weighted by the element count of each cell, so short edge cells weigh what they hold.
    """
    kr, kc = new_block[0] // block[0], new_block[1] // block[1]
    if kr * block[0] != new_block[0] or kc * block[1] != new_block[1]:
        raise ValueError(f"new block {new_block} is not a multiple of {block}")
    if cells.size == 0:
        return cells.copy()
    rs = np.arange(0, cells.shape[0], kr)
    cs = np.arange(0, cells.shape[1], kc)
    if pool == "max":
        return np.maximum.reduceat(np.maximum.reduceat(cells, rs, axis=0), cs, axis=1)
    weight = cell_counts(rows, cols, block).astype(np.float64)
    total = np.add.reduceat(np.add.reduceat(cells * weight, rs, axis=0), cs, axis=1)
    count = np.add.reduceat(np.add.reduceat(weight, rs, axis=0), cs, axis=1)
    return (total / count).astype(np.float32)
