"""What one chunk task works with, whatever the source of its tensor's bytes: the buffers it folds its
results into (``ChunkBuffers``), the partial sums it returns (``ChunkStats``) and the pooling grid
it folds the accumulated map into on the way (``wdiff.detail.Grid``).

The chunk tasks themselves are one per source kind (``TensorRef.source``): ``wdiff.stream`` for byte
ranges, ``wdiff.blocks`` for pieces and computed LoRA products; ``wdiff.compute`` picks one per tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from wdiff import kernels
from wdiff.detail import Grid
from wdiff.errors import WdiffError
from wdiff.results import MapSlot
from wdiff.sequence import AlignedTensor

FRAME_LINES_BYTES = 64 << 20  # per task, for the line buffers of the frames (one per interval)


@dataclass(frozen=True)
class ChunkStats:
    """Partial sums of one chunk, all float64 (counts int64); added up per tensor."""

    interval_sum: np.ndarray  # (T-1,) sum of |W(t+1) - W(t)|
    interval_sumsq: np.ndarray  # (T-1,) sum of (W(t+1) - W(t))^2
    sumsq: np.ndarray  # (T,) sum of W(t)^2
    dist_first: np.ndarray  # (T,) sum of (W(t) - W(0))^2
    dist_last: np.ndarray  # (T,) sum of (W(t) - W(T-1))^2, T-1 the last checkpoint of this pass
    nonfinite: np.ndarray  # (T,) count of NaN/Inf values in W(t)
    acc_sum: float  # sum of the accumulated map
    acc_max: float
    nbytes: int  # checkpoint bytes read
    cells: np.ndarray | None = None  # the chunk's part of the scene's cells (see Grid)
    cell_row0: int = 0  # first cell row in ``cells``
    acc_nonfinite: int = 0  # non-finite values of the accumulated map
    rows: np.ndarray | None = None  # row sums of the accumulated map, rows row0.. of the tensor
    row0: int = 0
    frames: np.ndarray | None = None  # (intervals, cell rows, cell cols): each interval's |dW| pooled
    frame_row0: int = 0


@dataclass
class ChunkBuffers:
    """What one chunk task folds its results into: the partial sums, and its part of the scene's cells,
    of the frames and of the row sums. Shared by every chunk task (``wdiff.stream``, ``wdiff.blocks``)."""

    interval_sum: np.ndarray  # (T-1,)
    interval_sumsq: np.ndarray  # (T-1,)
    sumsq: np.ndarray  # (T,)
    dist_first: np.ndarray  # (T,)
    dist_last: np.ndarray  # (T,)
    nonfinite: np.ndarray  # (T,) int64
    cell_row0: int  # the scene's cells: first cell row, cells (or empty), the pooling line
    cells: np.ndarray
    line: np.ndarray
    frame_row0: int  # the frames: first cell row, (intervals, rows, cols) cells, lines, line states
    frames: np.ndarray
    frame_lines: np.ndarray
    frame_states: np.ndarray
    first_row: int  # the row sums: first row, one float64 per row of the chunk (or empty)
    rows: np.ndarray

    @classmethod
    def for_chunk(
        cls,
        tensor: AlignedTensor,
        start: int,
        stop: int,
        resume: bool,
        grid: Grid | None,
        frame_grid: Grid | None,
    ) -> ChunkBuffers:
        count = len(tensor.refs)
        live = stop > start
        cell_row0, cells, line = 0, np.empty((0, 0)), np.empty(0)
        if grid is not None and live:
            cell_row0, n_rows = grid.cell_rows(start, stop)
            cells, line = grid.empty(n_rows), kernels.pool_line(grid.rows, grid.cols, grid.mean)
        intervals = count - 2 if resume else count - 1  # intervals this chunk adds
        frame_row0, frames, frame_lines = 0, np.empty((0, 0, 0)), np.empty((0, 0))
        if frame_grid is not None and live and intervals > 0:
            frame_row0, n_rows = frame_grid.cell_rows(start, stop)
            frames = frame_grid.empty(intervals, n_rows)
            line_size = kernels.pool_line(frame_grid.rows, frame_grid.cols, frame_grid.mean).size
            if intervals * line_size * 8 > FRAME_LINES_BYTES:  # many frames of wide rows: straight to cells
                line_size = 0
            frame_lines = np.full((intervals, line_size), 0.0 if frame_grid.mean else -np.inf)
        cols = row_cols(tensor.shape)
        first_row = start // cols
        return cls(
            np.zeros(count - 1), np.zeros(count - 1), np.zeros(count), np.zeros(count), np.zeros(count),
            np.zeros(count, np.int64), cell_row0, cells, line, frame_row0, frames, frame_lines,
            np.full(frames.shape[0], -1, np.int64), first_row,
            np.zeros((stop - 1) // cols - first_row + 1 if live else 0),
        )  # fmt: skip

    def stats(self, acc_sum: float, acc_max: float, acc_nonfinite: int, nbytes: int):
        """The chunk's ChunkStats."""
        return ChunkStats(
            self.interval_sum, self.interval_sumsq, self.sumsq, self.dist_first, self.dist_last,
            self.nonfinite, float(acc_sum), float(acc_max), nbytes,
            self.cells if self.cells.size else None, self.cell_row0, int(acc_nonfinite),
            self.rows if self.rows.size else None, self.first_row,
            self.frames if self.frames.size else None, self.frame_row0,
        )  # fmt: skip


def pooling_args(grid: Grid | None, frame_grid: Grid | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """What the kernels take for the scene's and the frames' pooling: both grids' dimensions (zeros
    when there is none) and the pool kind."""
    dims = grid.dims() if grid is not None else np.zeros(4, np.int64)
    frame_dims = frame_grid.dims() if frame_grid is not None else np.zeros(4, np.int64)
    mean = bool(grid.mean) if grid is not None else bool(frame_grid and frame_grid.mean)
    return dims, frame_dims, mean


def map_code(slot: MapSlot | None) -> int:
    """How the kernels store or read an accumulated map (``kernels.CODE_F32`` or ``CODE_BF16``)."""
    return kernels.decoder_code(slot.dtype) if slot is not None else kernels.CODE_F32


def open_output(slot: MapSlot | None) -> int:
    """A descriptor to write a tensor's accumulated map with (``kernels.write_map``); -1 when the map is
    not stored (``--map-dtype none``). The caller closes it."""
    if slot is None:
        return -1
    try:
        return os.open(slot.path, os.O_WRONLY)
    except OSError as e:
        raise WdiffError(e.filename, f"cannot open: {e.strerror}") from None


def row_cols(shape: tuple[int, ...]) -> int:
    """Elements per row: rows are the first dimension (a neuron, a token, a conv filter); a vector's
    rows are its elements and a scalar is one row."""
    return max(1, math.prod(shape[1:])) if len(shape) >= 2 else 1
