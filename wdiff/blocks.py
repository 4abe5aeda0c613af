"""Chunk tasks for the sources whose blocks are put together in Python before the kernels see them.

Two source kinds (``TensorRef.source``), one driver (:func:`_process`):

- ``pieces`` (``readers.base.PiecesRef``): a tensor stored in several byte ranges, in element order
  (torch.distributed.checkpoint shards, strided PyTorch views). Each block is gathered from the pieces
  it overlaps (``pread``) and decoded to float32.
- ``product`` (``readers.lora.LoraRef``): the effective change ``W(t) = scale_t * B(t) @ A(t)`` of a
  LoRA adapter (in the base weight's orientation), formed in float64 from the factors, block of rows
  by block of rows, and rounded to float32. Memory per task is a few row blocks plus one module's
  factors (read whole: r x (in + out) values), whatever the size of the base model.

For every checkpoint t the block of ``W(t)`` goes into the kernels' weight buffer as float32 and is
folded with the same Numba kernels (``kernels.fold_checkpoint``, ``finish_block``, ``finish_chunk``)
that process an F32 checkpoint in ``wdiff.stream``: the sums, the handling of NaN/Inf, the accumulated
map, its rows, cells and frames are those of a run over the same values stored as F32. Both take the
arguments of ``wdiff.stream.process_chunk`` and return the same ``ChunkStats``.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator

import numpy as np

from wdiff import kernels
from wdiff.chunk import ChunkBuffers, ChunkStats, Grid, map_code, open_output, pooling_args, row_cols
from wdiff.errors import WdiffError
from wdiff.readers.base import InputFiles, Piece, TensorRef, open_input
from wdiff.readers.lora import LoraRef
from wdiff.readers.remote import is_url
from wdiff.results import MapSlot
from wdiff.sequence import AlignedTensor

BLOCK_ELEMENTS = 1 << 20  # elements of one block (for LoRA, 1 Mi elements measured 4x faster than 64 Ki)

# fill(t, lo, hi, out): write elements [lo, hi) of W(t), as float32, into ``out``
Fill = Callable[[int, int, int, np.ndarray], None]


def _process(
    tensor: AlignedTensor,
    start: int,
    stop: int,
    out: MapSlot | None,
    acc_in: MapSlot | None,
    grid: Grid | None,
    frame_grid: Grid | None,
    blocks: Iterator[tuple[int, int]],
    block: int,
    fill: Fill,
    nbytes: int,
) -> ChunkStats:
    """Fold the blocks ``[lo, hi)`` of ``[start, stop)`` (at most ``block`` elements each) of every
    checkpoint, filled by ``fill``, into the accumulated map, its slice written to ``out`` (as float32 or
    rounded to BF16; None: not stored) by the kernels ``stream`` writes it with (``kernels.write_map``)."""
    count = len(tensor.refs)
    resume = acc_in is not None
    weights = kernels.weight_buffers(block, [4])  # W(0), W(t-1), W(t), W(T-1) as float32 (kernels.slot)
    acc_buf = np.empty(block, np.float32)
    bf16 = np.empty(block, np.int16)  # a BF16 map's slice
    lut = kernels.decode_table("F32")
    b = ChunkBuffers.for_chunk(tensor, start, stop, resume, grid, frame_grid)
    dims, frame_dims, mean = pooling_args(grid, frame_grid)
    diff = np.empty(block if b.frames.size else 1, np.float32)
    totals = np.zeros(3)  # sum, max and non-finite count of the accumulated map
    sums = (b.interval_sum, b.interval_sumsq, b.sumsq, b.dist_first, b.dist_last, b.nonfinite, totals)
    state = np.full(1, -1, np.int64)
    fd = open_output(out)
    try:
        acc_fd = open_input(acc_in.path) if acc_in else -1
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    try:
        for lo, hi in blocks:
            n = hi - lo
            acc = acc_buf[:n]
            if acc_in and not kernels.read_map(
                acc_fd, acc_in.offset + lo * acc_in.itemsize, map_code(acc_in), acc, bf16
            ):
                raise WdiffError(acc_in.path, "reading the previous results failed: the file shrank")
            clean = False
            fill(count - 1, lo, hi, weights[kernels.LAST, : n * 4].view(np.float32))  # W(T-1) first
            for t in range(count):
                if t < count - 1:
                    fill(t, lo, hi, weights[kernels.slot(t, count), : n * 4].view(np.float32))
                clean = kernels.fold_checkpoint(
                    kernels.CODE_F32, lut, weights, t, count, resume, lo, n, acc, sums, frame_dims, mean,
                    b.frames, b.frame_row0, b.frame_lines, b.frame_states, diff,
                )  # fmt: skip
            kernels.finish_block(
                acc, lo, clean, totals, dims, mean, b.cells, b.cell_row0, b.line, state,
                row_cols(tensor.shape), b.rows, b.first_row,
            )  # fmt: skip
            if out and not kernels.write_map(fd, out.offset + lo * out.itemsize, map_code(out), acc, bf16):
                raise WdiffError(out.path, "writing the results failed (disk full?)")
    finally:
        if fd >= 0:
            os.close(fd)
        if acc_fd >= 0:
            os.close(acc_fd)
    kernels.finish_chunk(
        dims, mean, b.cells, b.line, state, frame_dims, b.frames, b.frame_lines, b.frame_states
    )
    return b.stats(*totals, nbytes)


def _even_blocks(start: int, stop: int, block: int) -> Iterator[tuple[int, int]]:
    return ((lo, min(lo + block, stop)) for lo in range(start, stop, block))


# --- pieces --------------------------------------------------------------------------------------------


def pieces_of(ref: TensorRef) -> tuple[Piece, ...]:
    """A tensor's byte ranges in element order: its pieces, or its one range."""
    pieces = getattr(ref, "pieces", ())
    return pieces if pieces else (Piece(0, ref.numel, ref.path, ref.offset),)


class _Gather:
    """Fills blocks of one checkpoint's tensor from its pieces (the files stay open for the task)."""

    def __init__(self, ref: TensorRef, files: InputFiles) -> None:
        self.ref = ref
        self.pieces = pieces_of(ref)
        self.starts = [p.start for p in self.pieces]
        self.itemsize = ref.kind.bits // 8
        self.code = kernels.decoder_code(ref.dtype)
        self.lut = kernels.decode_table(ref.dtype)
        self.opened = {p.path: files.fd(p.path) for p in self.pieces}

    def fill(self, lo: int, hi: int, raw: np.ndarray, out: np.ndarray) -> None:
        size = self.itemsize
        i = bisect.bisect_right(self.starts, lo) - 1
        at = lo
        while at < hi:
            piece = self.pieces[i]
            take = min(hi, piece.start + piece.count) - at
            view = memoryview(raw)[(at - lo) * size : (at - lo + take) * size]
            got = os.preadv(self.opened[piece.path], [view], piece.offset + (at - piece.start) * size)
            if got != take * size:
                raise WdiffError(
                    piece.path, f"reading tensor {self.ref.name!r} failed: the file shrank or is unreadable"
                )
            at += take
            i += 1
        kernels.decode_block(raw[: (hi - lo) * size], self.code, self.lut, out)


def piece_ranges(tensor: AlignedTensor, start: int, stop: int) -> dict[str, list[tuple[int, int]]]:
    """The bytes of elements [start, stop) in every piece stored in a remote store (by URL)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for ref in tensor.refs:
        size = ref.kind.bits // 8
        for p in pieces_of(ref):
            lo, hi = max(start, p.start), min(stop, p.start + p.count)
            if hi > lo and is_url(p.path):
                ranges.setdefault(p.path, []).append((p.offset + (lo - p.start) * size, (hi - lo) * size))
    return ranges


def process_pieces(
    tensor: AlignedTensor,
    start: int,
    stop: int,
    out: MapSlot | None,
    acc_in: MapSlot | None = None,
    grid: Grid | None = None,
    frame_grid: Grid | None = None,
) -> ChunkStats:
    """``stream.process_chunk`` for a tensor stored in pieces in some checkpoint (the others may hold
    it in one range): same arguments, same ChunkStats."""
    # each file checked to be the one scanned, on its descriptor; a remote one's pieces fetched first
    files = InputFiles(dict(tensor.files), piece_ranges(tensor, start, stop))
    try:
        gathers = [_Gather(r, files) for r in tensor.refs]
        raw = np.empty(BLOCK_ELEMENTS * max(g.itemsize for g in gathers), np.uint8)

        def fill(t: int, lo: int, hi: int, out: np.ndarray) -> None:
            gathers[t].fill(lo, hi, raw, out)

        nbytes = (stop - start) * sum(g.itemsize for g in gathers)
        blocks = _even_blocks(start, stop, BLOCK_ELEMENTS)
        stats = _process(
            tensor, start, stop, out, acc_in, grid, frame_grid, blocks, BLOCK_ELEMENTS,
            fill, nbytes,
        )  # fmt: skip
        files.verify()  # not rewritten in place while it was read
        return stats
    except OSError as e:
        raise WdiffError(e.filename, f"cannot read: {e.strerror or e}") from None
    finally:
        files.close()


# --- LoRA products -------------------------------------------------------------------------------------


def _read(ref: TensorRef, files: InputFiles) -> np.ndarray:
    """A whole adapter factor, decoded to float64 in its stored shape."""
    kind = ref.kind
    raw = np.empty(ref.numel, np.dtype(kind.storage))
    view, got = memoryview(raw).cast("B"), 0
    try:
        fd = files.fd(ref.path)
        while got < raw.nbytes:  # one read returns at most ~2 GiB
            n = os.preadv(fd, [view[got:]], ref.offset + got)
            if n == 0:
                raise WdiffError(ref.path, f"reading tensor {ref.name!r} failed: the file shrank")
            got += n
    except OSError as e:
        raise WdiffError(ref.path, f"cannot read: {e.strerror or e}") from None
    assert kind.decoded is not None
    return raw.view(kind.decoded).astype(np.float64).reshape(ref.shape)


class _Factors:
    """One checkpoint's A and B of a module, as the 2-D matrices whose product is the base weight."""

    def __init__(self, ref: LoraRef, files: InputFiles) -> None:
        a, b = _read(ref.a, files), _read(ref.b, files)
        self.a = a.reshape(a.shape[0], -1) * ref.scale  # (r, in...), scaled once here
        self.b = b.reshape(b.shape[0], b.shape[1])  # (out, r)
        self.transpose = ref.transpose

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the effective change in the base weight's orientation, flattened."""
        if self.transpose:  # rows of (B @ A).T are columns of A
            return (self.a[:, r0:r1].T @ self.b.T).ravel()
        return (self.b[r0:r1] @ self.a).ravel()


def factor_ranges(tensor: AlignedTensor, start: int, stop: int) -> dict[str, list[tuple[int, int]]]:
    """Every LoRA factor stored in a remote store (by URL), whole: each chunk reads them all."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for r in tensor.refs:
        for factor in (r.a, r.b):  # type: ignore[attr-defined]
            if is_url(factor.path):
                ranges.setdefault(factor.path, []).append((factor.offset, factor.nbytes))
    return ranges


def process_product(
    tensor: AlignedTensor,
    start: int,
    stop: int,
    out: MapSlot | None,
    acc_in: MapSlot | None = None,
    grid: Grid | None = None,
    frame_grid: Grid | None = None,
) -> ChunkStats:
    """``stream.process_chunk`` for an effective LoRA change: same arguments, same ChunkStats.
    ``acc_in``: continue an incremental run; ``tensor.refs`` are then [W(0), W(K-1), W(K), ...]."""
    # each checked to be the file scanned; a remote one's factors fetched first
    with InputFiles(dict(tensor.files), factor_ranges(tensor, start, stop)) as files:
        factors = [_Factors(r, files) for r in tensor.refs]  # type: ignore[arg-type]
        files.verify()
    cols = row_cols(tensor.shape)  # the product's rows are the tensor's rows
    rows_per_block = max(1, BLOCK_ELEMENTS // cols)

    def blocks() -> Iterator[tuple[int, int]]:  # whole rows, cut to [start, stop)
        for r0 in range(start // cols, -(-stop // cols), rows_per_block):
            yield max(start, r0 * cols), min(stop, (r0 + rows_per_block) * cols)

    def fill(t: int, lo: int, hi: int, out: np.ndarray) -> None:
        r0 = lo // cols
        out[:] = factors[t].rows(r0, -(-hi // cols))[lo - r0 * cols : hi - r0 * cols]

    # adapter bytes, shared out over the chunks so that progress adds up to ``bytes_to_read``
    nbytes = sum(r.nbytes for r in tensor.refs) * (stop - start) // max(1, tensor.numel)
    return _process(
        tensor, start, stop, out, acc_in, grid, frame_grid, blocks(),
        rows_per_block * cols, fill, nbytes,
    )  # fmt: skip
