"""The chunk task for tensors stored as one byte range per checkpoint (``TensorRef.source == "bytes"``):
safetensors, ONNX raw and external data, PyTorch storages. The hot path: the Numba driver
``kernels.stream_chunk`` reads, decodes, accumulates and writes without the GIL.
"""

from __future__ import annotations

import os

import numpy as np

from wdiff import kernels
from wdiff.chunk import ChunkBuffers, ChunkStats, Grid, map_code, open_output, pooling_args, row_cols
from wdiff.errors import WdiffError
from wdiff.readers.base import InputFiles
from wdiff.readers.remote import is_url
from wdiff.results import MapSlot
from wdiff.sequence import AlignedTensor


def remote_ranges(tensor: AlignedTensor, start: int, stop: int) -> dict[str, list[tuple[int, int]]]:
    """The byte range of elements [start, stop) in each checkpoint stored in a remote store (by URL):
    what ``InputFiles`` fetches before the kernels read."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for r in tensor.refs:
        if is_url(r.path):
            size = r.kind.bits // 8
            ranges.setdefault(r.path, []).append((r.offset + start * size, (stop - start) * size))
    return ranges


def process_chunk(
    tensor: AlignedTensor,
    start: int,
    stop: int,
    out: MapSlot | None,
    acc_in: MapSlot | None = None,
    grid: Grid | None = None,
    frame_grid: Grid | None = None,
) -> ChunkStats:
    """Stream elements [start, stop) of ``tensor`` through every checkpoint; write the accumulated slice.

    Opens the files, hands everything to the Numba driver (which reads, decodes, accumulates and
    writes without the GIL) and returns the partial sums. ``out``: where the tensor's map goes (and
    its storage dtype; None: the map is not stored); ``acc_in``: where the earlier results to continue
    from are: then ``tensor.refs`` are [W(0), W(K-1), W(K), ...] (see ``kernels.stream_chunk``).
    ``grid``: pool the accumulated map into the scene's cells on the way; ``frame_grid``: pool every
    interval's |dW| into cells too (the frames of the training film).
    """
    refs = tensor.refs
    count = len(refs)
    luts, lut_index = kernels.decode_tables([r.dtype for r in refs])
    codes = np.array([kernels.decoder_code(r.dtype) for r in refs], np.int8)
    itemsizes = np.array([r.kind.bits // 8 for r in refs], np.int64)
    offsets = np.array([r.offset for r in refs], np.int64)
    block = kernels.block_elements(itemsizes)
    uniform = len({(c, i) for c, i in zip(codes.tolist(), lut_index.tolist())}) == 1
    raw = np.empty(1 if uniform else block * int(itemsizes.max()), np.uint8)  # only to decode from
    weights = kernels.weight_buffers(block, itemsizes)
    acc = np.empty(block + kernels.SCRATCH_PAD, np.float32)
    store = np.empty(block if "BF16" in (out and out.dtype, acc_in and acc_in.dtype) else 1, np.int16)
    b = ChunkBuffers.for_chunk(tensor, start, stop, acc_in is not None, grid, frame_grid)
    dims, frame_dims, mean = pooling_args(grid, frame_grid)
    diff = np.empty(block if b.frames.size else 1, np.float32)
    totals = np.zeros(3)  # sum, max and non-finite count of the accumulated map
    # each file checked to be the one scanned, on its descriptor; a remote one's slices fetched first
    files = InputFiles(dict(tensor.files), remote_ranges(tensor, start, stop))
    try:
        fds = np.array([files.fd(r.path) for r in refs], np.int32)
        acc_fd = files.fd(acc_in.path) if acc_in else -1
        out_fd = open_output(out)
        try:
            status = kernels.stream_chunk(
                (fds, offsets, itemsizes, codes, lut_index, luts),
                (start, stop),
                (
                    out_fd,
                    out.offset if out else 0,
                    map_code(out),
                    acc_fd,
                    acc_in.offset if acc_in else 0,
                    map_code(acc_in),
                ),  # fmt: skip
                (raw, weights, acc, store, block),
                (b.interval_sum, b.interval_sumsq, b.sumsq, b.dist_first, b.dist_last, b.nonfinite, totals),
                (dims, mean, b.cells, b.cell_row0, b.line),
                (row_cols(tensor.shape), b.rows, b.first_row),
                (frame_dims, b.frames, b.frame_row0, b.frame_lines, b.frame_states, diff),
            )
        finally:
            if out_fd >= 0:
                os.close(out_fd)
        files.verify()  # not rewritten in place while it was read
    finally:
        files.close()
    if status < 0:
        t = -status - 1
        if t == count and out:
            raise WdiffError(out.path, "writing the results failed (disk full?)")
        if t == count + 1 and acc_in:
            raise WdiffError(acc_in.path, "reading the previous results failed: the file shrank")
        raise WdiffError(
            refs[t].path, f"reading tensor {tensor.name!r} failed: the file shrank or is unreadable"
        )
    nbytes = int((stop - start) * itemsizes.sum())  # checkpoint bytes; earlier results not counted
    return b.stats(*totals, nbytes)
