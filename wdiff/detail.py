"""Level of detail: how far each tensor is pooled, in one place.

A model of billions of weights is drawn as at most ``max_points`` cells. This module decides the cells
(one global pooling factor for every tensor, ``pool_factor``), hands them to compute as a ``Grid`` per
tensor (compute folds the accumulated map and each interval's change into them on the way: the loops
are ``wdiff.kernels``), turns the sums of "mean" pooling into means (``to_means``, the only place),
and writes and reads the pooled files: ``pooled.safetensors`` (the scene's cells) and
``frames.safetensors`` (the film's). The scene consumes those cells; it never plans what compute does.

Who calls what::

    grids = plan_grids(shapes, max_points, pool)        # wdiff.api, before compute
    result = compute(..., grids=grids, frame_grids=...)  # wdiff.compute: the sums or maxima
    write_cells(out / POOLED, grids, result.cells, pool) # means here, then the file
    read_pooled(out / POOLED)                            # wdiff.scene.accumulated, when it draws
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Pool = Literal["max", "mean"]
POOLS: tuple[str, ...] = ("max", "mean")

FRAME_VALUES = 20_000_000  # all frames of a run together: 160 MB of float64 cells while they are combined


# -- the grid a tensor is drawn as, and its cells ---------------------------------------------------------
def grid_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the 2-D grid a tensor is drawn as: rows are the first dimension, columns the
    others flattened (row-major); a 1-D tensor is one row and a scalar is 1 x 1."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, (shape[0] if shape else 1)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cell_count(rows: int, cols: int, factor: int) -> int:
    """Cells of a rows x cols grid pooled by ``factor`` (a one-row grid pools 1 x factor)."""
    if rows == 0 or cols == 0:
        return 0
    return ceil_div(rows, factor) * ceil_div(cols, factor)


def block_shape(rows: int, factor: int) -> tuple[int, int]:
    """Elements per pooled cell: s x s, or 1 x s for a one-row grid (1-D tensors, scalars)."""
    return (1 if rows == 1 else factor, factor)


def pool_factor(grids: Iterable[tuple[int, int]], max_points: int, step: int = 1) -> int:
    """The smallest multiple of ``step`` whose total cell count over all grids fits ``max_points``.

    Raises ValueError when even one cell per non-empty grid does not fit.
    """
    nonempty = [(r, c) for r, c in grids if r > 0 and c > 0]
    if max_points < len(nonempty):
        raise ValueError(
            f"max_points={max_points} is smaller than the number of non-empty tensors "
            f"({len(nonempty)}): every tensor needs at least one point"
        )
    if not nonempty:
        return step

    def total(k: int) -> int:
        return sum(cell_count(r, c, k * step) for r, c in nonempty)

    # total() never grows with k, and at hi every grid is a single cell (which fits, checked above).
    lo, hi = 1, ceil_div(max(max(r, c) for r, c in nonempty), step)
    while lo < hi:
        mid = (lo + hi) // 2
        if total(mid) <= max_points:
            hi = mid
        else:
            lo = mid + 1
    return lo * step


def cell_sizes(length: int, size: int) -> np.ndarray:
    """Elements in each cell along one axis (the last cell may be short)."""
    edges = np.minimum(np.arange(0, length + size, size, dtype=np.int64), length)
    return np.diff(edges)[: ceil_div(length, size)]


def cell_counts(rows: int, cols: int, block: tuple[int, int]) -> np.ndarray:
    """Elements in each cell of a rows x cols grid pooled by ``block``: what turns sums into means."""
    return np.outer(cell_sizes(rows, block[0]), cell_sizes(cols, block[1]))


@dataclass(frozen=True)
class Grid:
    """How one tensor is pooled: its grid (rows x cols elements) into cells of ``block``.

    Planned here (``plan_grids``); compute folds every finished value of the accumulated map into
    these cells on the way, so the scene need not read the results again.
    """

    rows: int
    cols: int
    block: tuple[int, int]
    mean: bool = False  # sums (``to_means`` divides) instead of maxima

    @property
    def shape(self) -> tuple[int, int]:
        return (-(-self.rows // self.block[0]), -(-self.cols // self.block[1]))

    def empty(self, *shape: int) -> np.ndarray:
        """Cells before anything is folded in (the reduction's identity); by default all of them,
        or ``shape`` = (cell rows,) or (frames, cell rows) of them."""
        lead = shape[:-1] + (shape[-1], self.shape[1]) if shape else self.shape
        return np.full(lead, 0.0 if self.mean else -np.inf)

    def cell_rows(self, start: int, stop: int) -> tuple[int, int]:
        """The cell rows elements [start, stop) of the flattened grid fall in (first, count)."""
        row0 = start // self.cols // self.block[0]
        return row0, (stop - 1) // self.cols // self.block[0] - row0 + 1

    def dims(self) -> np.ndarray:
        return np.array([self.rows, self.cols, *self.block], np.int64)


def to_means(grid: Grid, cells: np.ndarray) -> np.ndarray:
    """Cells as the files keep them: a "mean" grid's sums divided by the elements of each cell (the
    only place sums become means), maxima as they are. ``cells`` may lead with an interval axis."""
    return cells / cell_counts(grid.rows, grid.cols, grid.block) if grid.mean else cells


# -- planning ---------------------------------------------------------------------------------------------
def plan_grids(shapes: Iterable[tuple[str, Sequence[int]]], max_points: int, pool: str) -> dict[str, Grid]:
    """Each non-empty tensor's Grid for this budget: one global factor, the smallest that fits (the
    scene draws exactly these cells). ValueError when the budget cannot give every tensor a point."""
    dims = [(name, *grid_dims(tuple(shape)), math.prod(shape)) for name, shape in shapes]
    factor = pool_factor(((rows, cols) for _, rows, cols, size in dims if size > 0), max_points)
    mean = pool == "mean"
    return {
        name: Grid(rows, cols, block_shape(rows, factor), mean=mean)
        for name, rows, cols, size in dims
        if size > 0
    }


def frame_budget_for(frame_points: int, intervals: int, tensors: int) -> int:
    """Points per frame: ``frame_points``, halved as often as needed to keep every frame of the run
    within FRAME_VALUES (a run of 1,000 checkpoints would otherwise hold 200 million cells). Halving
    in steps keeps the frames' grid unchanged while a watched run grows, until its length doubles."""
    budget = frame_points
    while budget > tensors and budget * max(intervals, 1) > FRAME_VALUES:
        budget //= 2
    return max(budget, tensors)


# -- the pooled files -------------------------------------------------------------------------------------
def write_pooled(
    path: str | os.PathLike[str],
    cells: dict[str, tuple[np.ndarray, tuple[int, int], int]],
    pool: str,
) -> None:
    """Write the scene's cells: ``{name: (cells, block, nonfinite)}``.

    float32 cells per tensor; the metadata records each tensor's block, the pool kind and the
    non-finite counts, so a reader uses them only for exactly that pooling.
    """
    from safetensors.numpy import save_file

    meta = {
        "pool": pool,
        "blocks": json.dumps({n: list(b) for n, (_, b, _) in cells.items()}),
        "nonfinite": json.dumps({n: k for n, (_, _, k) in cells.items()}),
    }
    save_file({n: np.ascontiguousarray(c, np.float32) for n, (c, _, _) in cells.items()}, str(path), meta)


def write_cells(
    path: str | os.PathLike[str], grids: dict[str, Grid], cells: dict[str, tuple[np.ndarray, int]], pool: str
) -> None:
    """Write the cells compute pooled (maxima, or sums for "mean") as ``pooled.safetensors``."""
    write_pooled(
        path,
        {name: (to_means(grids[name], raw), grids[name].block, bad) for name, (raw, bad) in cells.items()},
        pool,
    )


def read_pooled(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, tuple[int, int], str, int]]:
    """Cells from ``write_pooled``: {name: (cells, block, pool, nonfinite)}; {} when absent or unusable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            blocks = json.loads(meta["blocks"])
            nonfinite = json.loads(meta["nonfinite"])
            return {n: (f.get_tensor(n), tuple(blocks[n]), meta["pool"], int(nonfinite[n])) for n in f.keys()}
    except (OSError, SafetensorError, KeyError, ValueError, TypeError):
        return {}


def write_frames(
    path: str | os.PathLike[str], frames: dict[str, np.ndarray], blocks: dict[str, tuple[int, int]], pool: str
) -> None:
    """Frames (already divided into means for "mean" pooling) with how they were pooled."""
    from safetensors.numpy import save_file

    meta = {
        "format": "wdiff-frames",
        "pool": pool,
        "blocks": json.dumps({n: list(blocks[n]) for n in frames}),
    }
    save_file({n: np.ascontiguousarray(f, np.float32) for n, f in frames.items()}, str(path), metadata=meta)


def finish_frames(
    path: str | os.PathLike[str],
    frames: dict[str, np.ndarray],
    grids: dict[str, Grid],
    pool: str,
    earlier: dict[str, np.ndarray] | None,
) -> None:
    """Write the frames compute pooled ("mean" frames hold sums until here), after the ``earlier``
    frames an incremental run extends."""
    done = {n: to_means(grids[n], f) for n, f in frames.items()}
    if earlier is not None:
        done = {n: np.concatenate([earlier[n], f]) for n, f in done.items()}
    write_frames(path, done, {n: g.block for n, g in grids.items()}, pool)


def read_frames(path: str | os.PathLike[str], names: Sequence[str]) -> tuple[dict[str, np.ndarray], str, int]:
    """({name: (intervals, rows, cols)}, pool kind, pooling factor) from ``frames.safetensors``."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = f.metadata() or {}
        blocks = json.loads(meta.get("blocks", "{}"))
        arrays = {n: f.get_tensor(n) for n in names if n in f.keys()}
    factor = max((int(b[1]) for b in blocks.values()), default=1)
    return arrays, meta.get("pool", "max"), factor


def frame_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """How the frames were pooled: {"pool": "max" | "mean", "blocks": {name: [rows, cols]}}."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    return {"pool": meta.get("pool"), "blocks": json.loads(meta.get("blocks", "{}"))}


def earlier_frames(path: Path, known: int, grids: dict[str, Grid], pool: str) -> dict[str, np.ndarray] | None:
    """The frames of earlier results (``path``: their frames file) when they cover their ``known - 1``
    intervals on these grids, pooled the same way."""
    from safetensors import safe_open

    try:
        info = frame_info(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not in these results")
        with safe_open(path, framework="numpy") as f:
            frames = {name: f.get_tensor(name) for name in grids}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    same = all(
        f.shape == (known - 1, *grid.shape) and tuple(info["blocks"].get(name, ())) == grid.block
        for (name, grid), f in zip(grids.items(), frames.values())
    )
    return frames if same and info["pool"] == pool else None
