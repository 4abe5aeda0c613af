"""Compute the accumulated change of LoRA-adapted weights, chunk by chunk (one Dask task per chunk).

For elements [start, stop) of a base weight's effective change (``wdiff.readers.lora.LoraRef``), a
task works through the covering rows in small blocks: for every checkpoint t it forms the block of
``W(t) = scale_t * B(t) @ A(t)`` (in the base weight's orientation) in float64 from the adapter
factors and folds it into the accumulated map and the sums with the same Numba kernels as a
checkpoint stored in F32. Memory per task is a few row blocks (BLOCK_ELEMENTS: small blocks make
the BLAS product slow, 1 Mi elements measured 4x faster than 64 Ki) plus the adapter factors of one
module, whatever the size of the base model; the factors are read whole (r x (in + out) values).
"""

from __future__ import annotations

import os

import numpy as np

from wdiff import kernels
from wdiff.compute import ChunkBuffers, ChunkStats, Grid, _row_cols
from wdiff.errors import WdiffError
from wdiff.readers.base import TensorRef
from wdiff.readers.lora import LoraRef
from wdiff.scan import AlignedTensor

BLOCK_ELEMENTS = 1 << 20  # elements of one row block (the float64 product: 8 MiB)


def _read(ref: TensorRef) -> np.ndarray:
    """A whole adapter factor, decoded to float64 in its stored shape."""
    kind = ref.kind
    try:
        raw = np.fromfile(ref.path, dtype=np.dtype(kind.storage), count=ref.numel, offset=ref.offset)
    except OSError as e:
        raise WdiffError(ref.path, f"cannot read: {e.strerror or e}") from None
    if raw.size != ref.numel:
        raise WdiffError(ref.path, f"reading tensor {ref.name!r} failed: the file shrank")
    assert kind.decoded is not None
    return raw.view(kind.decoded).astype(np.float64).reshape(ref.shape)


class _Factors:
    """One checkpoint's A and B of a module, as the 2-D matrices whose product is the base weight."""

    def __init__(self, ref: LoraRef) -> None:
        a, b = _read(ref.a), _read(ref.b)
        self.a = a.reshape(a.shape[0], -1) * ref.scale  # (r, in...), scaled once here
        self.b = b.reshape(b.shape[0], b.shape[1])  # (out, r)
        self.transpose = ref.transpose

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the effective change in the base weight's orientation, flattened."""
        if self.transpose:  # rows of (B @ A).T are columns of A
            return (self.a[:, r0:r1].T @ self.b.T).ravel()
        return (self.b[r0:r1] @ self.a).ravel()


def process_chunk(
    tensor: AlignedTensor,
    start: int,
    stop: int,
    out_path: str,
    out_offset: int,
    acc_in: tuple[str, int] | None = None,
    grid: Grid | None = None,
    frame_grid: Grid | None = None,
) -> ChunkStats:
    """``compute.process_chunk`` for an effective LoRA change: same arguments, same ChunkStats.

    Each block of ``W(t)`` is formed in float64, rounded to float32 and handed to the same Numba
    kernels (``kernels.start``/``kernels.step``, the pooling and row-sum kernels) that process an F32
    checkpoint, so the sums, the handling of NaN/Inf, the accumulated map, its rows, cells and frames
    are those of a run over the effective weights saved as F32. ``acc_in``: continue an incremental
    run from earlier results; ``tensor.refs`` are then [W(0), W(K-1), W(K), ...] and there is no
    interval between the first two.
    """
    refs = tensor.refs
    count = len(refs)
    resume = acc_in is not None
    factors = [_Factors(r) for r in refs]  # type: ignore[arg-type]
    cols = _row_cols(tensor.shape)  # the product's rows are the tensor's rows
    rows_per_block = max(1, BLOCK_ELEMENTS // cols)
    acc_sum = acc_max = 0.0
    acc_bad = 0
    # W(0) and two buffers that take turns as W(t-1) and W(t), float32; then the accumulated slice
    scratch = np.empty((4, rows_per_block * cols), np.float32)
    diff = np.empty(rows_per_block * cols, np.float32)
    lut = kernels.decode_table("F32")
    b = ChunkBuffers.for_chunk(tensor, start, stop, resume, grid, frame_grid)
    state = np.full(1, -1, np.int64)
    fd = os.open(out_path, os.O_WRONLY)
    acc_fd = os.open(acc_in[0], os.O_RDONLY) if acc_in else -1
    try:
        for r0 in range(start // cols, -(-stop // cols), rows_per_block):
            r1 = r0 + rows_per_block
            lo, hi = max(start, r0 * cols), min(stop, r1 * cols)
            n = hi - lo
            cut = slice(lo - r0 * cols, hi - r0 * cols)
            first, acc = scratch[0, :n], scratch[3, :n]
            if acc_in:
                raw = os.pread(acc_fd, n * 4, acc_in[1] + lo * 4)
                if len(raw) != n * 4:
                    raise WdiffError(acc_in[0], "reading the previous results failed: the file shrank")
                acc[:] = np.frombuffer(raw, np.float32)
            clean = False
            for t in range(count):
                new = first if t == 0 else scratch[1 + (t - 1) % 2, :n]
                old = first if t <= 1 else scratch[1 + t % 2, :n]
                new[:] = factors[t].rows(r0, r1)[cut]  # rounded to float32
                if t == 0 or (resume and t == 1):  # W(0), or W(K-1) where an incremental run restarts
                    x, y = kernels.start(new, lut)
                    b.sumsq[t] += x
                    b.nonfinite[t] += y
                    continue
                last = t == count - 1
                sums = kernels.step(first, old, new, lut, acc, not resume and t == 1)
                b.interval_sum[t - 1] += sums[0]
                b.interval_sumsq[t - 1] += sums[1]
                b.sumsq[t] += sums[2]
                b.dist_first[t] += sums[3]
                b.nonfinite[t] += sums[4]
                if last:
                    total, peak = sums[5], sums[6]
                    clean = bool(np.isfinite(total))
                    acc_sum += total
                    if not np.isnan(acc_max):  # NaN-aware max, as stream_chunk: once NaN, it stays NaN
                        acc_max = peak if np.isnan(peak) else max(acc_max, peak)
                f = t - 2 if resume else t - 1  # this interval's frame
                if b.frames.size:
                    kernels.abs_diff(new, old, lut, diff[:n])
                    g = frame_grid
                    kernels.pool_fold(
                        diff[:n], lo, g.rows, g.cols, g.block[0], g.block[1], g.mean, b.frames[f],
                        b.frame_row0, b.frame_lines[f], b.frame_states[f : f + 1],
                    )  # fmt: skip
            if b.cells.size:  # counts the map's non-finite values, as stream_chunk does
                acc_bad += kernels.pool_fold(
                    acc, lo, grid.rows, grid.cols, grid.block[0], grid.block[1], grid.mean, b.cells,
                    b.cell_row0, b.line, state, clean,
                )  # fmt: skip
            if b.rows.size:
                kernels.add_row_sums(acc, lo, cols, b.rows, b.first_row)
            if os.pwrite(fd, acc.tobytes(), out_offset + lo * 4) != n * 4:
                raise WdiffError(out_path, "writing the results failed (disk full?)")
    finally:
        os.close(fd)
        if acc_fd >= 0:
            os.close(acc_fd)
    if b.cells.size:
        kernels.pool_flush(b.cells, b.line, state, grid.block[1], grid.mean)
    for f in range(b.frames.shape[0]):
        kernels.pool_flush(
            b.frames[f], b.frame_lines[f], b.frame_states[f : f + 1], frame_grid.block[1], frame_grid.mean
        )
    # adapter bytes, shared out over the chunks so that progress adds up to ``bytes_to_read``
    nbytes = sum(r.nbytes for r in refs) * (stop - start) // max(1, tensor.numel)
    return b.stats(acc_sum, acc_max, acc_bad, nbytes)
