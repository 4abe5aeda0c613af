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
from wdiff.compute import ChunkBuffers, ChunkStats, Grid, _row_cols, pooling_args
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
    kernels (``kernels.fold_checkpoint``, ``finish_block``, ``finish_chunk``) that process an F32
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
    block = rows_per_block * cols
    weights = kernels.weight_buffers(block, [4])  # W(0), W(t-1), W(t) as float32 (see kernels.slot)
    acc_buf = np.empty(block, np.float32)
    lut = kernels.decode_table("F32")
    b = ChunkBuffers.for_chunk(tensor, start, stop, resume, grid, frame_grid)
    dims, frame_dims, mean = pooling_args(grid, frame_grid)
    diff = np.empty(block if b.frames.size else 1, np.float32)
    totals = np.zeros(3)  # sum, max and non-finite count of the accumulated map
    sums = (b.interval_sum, b.interval_sumsq, b.sumsq, b.dist_first, b.nonfinite, totals)
    state = np.full(1, -1, np.int64)
    fd = os.open(out_path, os.O_WRONLY)
    acc_fd = os.open(acc_in[0], os.O_RDONLY) if acc_in else -1
    try:
        for r0 in range(start // cols, -(-stop // cols), rows_per_block):
            r1 = r0 + rows_per_block
            lo, hi = max(start, r0 * cols), min(stop, r1 * cols)
            n = hi - lo
            cut = slice(lo - r0 * cols, hi - r0 * cols)
            acc = acc_buf[:n]
            if acc_in:
                raw = os.pread(acc_fd, n * 4, acc_in[1] + lo * 4)
                if len(raw) != n * 4:
                    raise WdiffError(acc_in[0], "reading the previous results failed: the file shrank")
                acc[:] = np.frombuffer(raw, np.float32)
            clean = False
            for t in range(count):
                weights[kernels.slot(t), : n * 4].view(np.float32)[:] = factors[t].rows(r0, r1)[cut]
                clean = kernels.fold_checkpoint(
                    kernels.CODE_F32, lut, weights, t, count, resume, lo, n, acc, sums, frame_dims, mean,
                    b.frames, b.frame_row0, b.frame_lines, b.frame_states, diff,
                )  # fmt: skip
            kernels.finish_block(
                acc, lo, clean, totals, dims, mean, b.cells, b.cell_row0, b.line, state, cols, b.rows,
                b.first_row,
            )  # fmt: skip
            if os.pwrite(fd, acc.tobytes(), out_offset + lo * 4) != n * 4:
                raise WdiffError(out_path, "writing the results failed (disk full?)")
    finally:
        os.close(fd)
        if acc_fd >= 0:
            os.close(acc_fd)
    kernels.finish_chunk(
        dims, mean, b.cells, b.line, state, frame_dims, b.frames, b.frame_lines, b.frame_states
    )
    # adapter bytes, shared out over the chunks so that progress adds up to ``bytes_to_read``
    nbytes = sum(r.nbytes for r in refs) * (stop - start) // max(1, tensor.numel)
    return b.stats(*totals, nbytes)
