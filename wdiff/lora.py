"""Compute the accumulated change of LoRA-adapted weights, chunk by chunk (one Dask task per chunk).

For elements [start, stop) of a base weight's effective change (``wdiff.readers.lora.LoraRef``), a
task works through the covering rows in small blocks: for every checkpoint t it forms the block of
``W(t) = scale_t * B(t) @ A(t)`` (in the base weight's orientation) in float64 from the adapter
factors, and folds ``|W(t+1) - W(t)|`` into the accumulated map and the same sums the Numba path
returns. Memory per task is a few row blocks plus the adapter factors of one module, whatever the
size of the base model; the factors are read whole (they hold r x (in + out) values).
"""

from __future__ import annotations

import os

import numpy as np

from wdiff import kernels
from wdiff.compute import ChunkStats, Grid
from wdiff.errors import WdiffError
from wdiff.readers.base import TensorRef
from wdiff.readers.lora import LoraRef
from wdiff.scan import AlignedTensor

BLOCK_ELEMENTS = 1 << 16  # elements of one row block (float64 buffers of 512 KiB)


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
        self.a = a.reshape(a.shape[0], -1)  # (r, in...)
        self.b = b.reshape(b.shape[0], b.shape[1])  # (out, r)
        self.scale = ref.scale
        self.transpose = ref.transpose

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the effective change in the base weight's orientation, flattened."""
        if self.transpose:  # rows of (B @ A).T are columns of A
            block = self.a[:, r0:r1].T @ self.b.T
        else:
            block = self.b[r0:r1] @ self.a
        return (block * self.scale).ravel()


def _finite_sum(values: np.ndarray) -> tuple[float, int]:
    good = np.isfinite(values)
    return float(np.sum(values, where=good)), int(values.size - np.count_nonzero(good))


def process_chunk(
    tensor: AlignedTensor,
    start: int,
    stop: int,
    out_path: str,
    out_offset: int,
    acc_in: tuple[str, int] | None = None,
    grid: Grid | None = None,
) -> ChunkStats:
    """``compute.process_chunk`` for an effective LoRA change: same arguments, same ChunkStats.

    ``acc_in``: continue an incremental run from earlier results; ``tensor.refs`` are then
    [W(0), W(K-1), W(K), ...] and there is no interval between the first two.
    """
    refs = tensor.refs
    count = len(refs)
    factors = [_Factors(r) for r in refs]  # type: ignore[arg-type]
    cols = tensor.numel // tensor.shape[0] if tensor.numel else 1
    interval_sumsq = np.zeros(count - 1)
    sumsq = np.zeros(count)
    dot_first = np.zeros(count)
    nonfinite = np.zeros(count, np.int64)
    net_sumsq = acc_sum = 0.0
    acc_max = 0.0
    acc_bad = 0
    if grid is not None and stop > start:
        row0 = start // grid.cols // grid.block[0]
        row1 = (stop - 1) // grid.cols // grid.block[0]
        cells = np.full((row1 - row0 + 1, grid.shape[1]), 0.0 if grid.mean else -np.inf)
        line = kernels.pool_line(grid.rows, grid.cols, grid.mean)
        state = np.full(1, -1, np.int64)
    rows_per_block = max(1, BLOCK_ELEMENTS // cols)
    fd = os.open(out_path, os.O_RDWR if acc_in else os.O_WRONLY)
    acc_fd = os.open(acc_in[0], os.O_RDONLY) if acc_in else -1
    try:
        for r0 in range(start // cols, -(-stop // cols), rows_per_block):
            r1 = r0 + rows_per_block
            lo, hi = max(start, r0 * cols), min(stop, r1 * cols)
            cut = slice(lo - r0 * cols, hi - r0 * cols)
            if acc_in:
                raw = os.pread(acc_fd, (hi - lo) * 4, acc_in[1] + lo * 4)
                if len(raw) != (hi - lo) * 4:
                    raise WdiffError(acc_in[0], "reading the previous results failed: the file shrank")
                acc = np.frombuffer(raw, np.float32).astype(np.float64)
            else:
                acc = np.zeros(hi - lo)
            first = factors[0].rows(r0, r1)[cut]
            prev = first
            s, bad = _finite_sum(first * first)
            sumsq[0] += s
            nonfinite[0] += bad
            for t in range(1, count):
                w = factors[t].rows(r0, r1)[cut]
                s, bad = _finite_sum(w * w)
                sumsq[t] += s
                nonfinite[t] += bad
                dot_first[t] += _finite_sum(w * first)[0]
                if not (acc_in and t == 1):  # incremental: W(0) -> W(K-1) is not an interval
                    d = w - prev
                    acc += np.abs(d)
                    interval_sumsq[t - 1] += _finite_sum(d * d)[0]
                prev = w
            net_sumsq += _finite_sum((prev - first) ** 2)[0]
            acc32 = acc.astype(np.float32)
            total, _ = _finite_sum(acc32.astype(np.float64))
            acc_sum += total
            if acc32.size:
                peak = float(np.max(acc32))  # NaN propagates, as in the kernels
                acc_max = peak if np.isnan(peak) or np.isnan(acc_max) else max(acc_max, peak)
            if grid is not None:  # counts the map's non-finite values, as stream_chunk does
                acc_bad += kernels.pool_fold(
                    acc32, lo, grid.rows, grid.cols, grid.block[0], grid.block[1], grid.mean, cells,
                    row0, line, state,
                )  # fmt: skip
            if os.pwrite(fd, acc32.tobytes(), out_offset + lo * 4) != acc32.nbytes:
                raise WdiffError(out_path, "writing the results failed (disk full?)")
    finally:
        os.close(fd)
        if acc_fd >= 0:
            os.close(acc_fd)
    if grid is not None and stop > start:
        kernels.pool_flush(cells, line, state, grid.block[1], grid.mean)
    else:
        cells, row0 = np.empty((0, 0)), 0
    dot_first[0] = sumsq[0]
    # adapter bytes, shared out over the chunks so that progress adds up to ``bytes_to_read``
    nbytes = sum(r.nbytes for r in refs) * (stop - start) // max(1, tensor.numel)
    return ChunkStats(
        interval_sumsq, sumsq, dot_first, nonfinite, net_sumsq, acc_sum, acc_max, nbytes,
        cells if cells.size else None, row0, acc_bad,
    )  # fmt: skip
