"""Numba kernels: plain typed loops writing into buffers the caller owns.

``stream_chunk`` is the hot path. For one element range of one tensor it walks sub-blocks of
``BLOCK`` elements; for each sub-block it reads that slice of every checkpoint in turn (``pread``
straight into a small reused buffer, no GIL), decodes it and folds it into the running sums, then
writes the accumulated slice to the output file (``pwrite``). Keeping the sub-block small (64 KiB of
float32) keeps the read buffer and the ``first/prev/acc`` slices in the CPU cache: a copy into a buffer
that leaves the cache runs at a quarter of the speed (measured: about 8 GB/s into 64 KiB, 2 GB/s into
256 KiB and more).

``start``/``fold_step`` are the per-sub-block building blocks: ``start`` decodes checkpoint 0,
``fold_step`` adds one interval (and each checkpoint's distance to the last one, W(T-1), whose block
is read first into a fourth buffer). Decoding is fused into the loop: F32/F64 are cast, BF16 is shifted
into the top half of a float32, F16 and the FP8 kinds are looked up in a table of their float32 values.

All kernels are ``nogil`` (Dask threads run them in parallel) and ``cache=True`` (a second run does not
compile). ``fastmath`` is limited to reassociation and contraction so sums vectorise, while NaN and Inf
keep IEEE semantics: a NaN in a checkpoint must show up in the results, not vanish.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_FAST = {"reassoc", "contract", "nsz", "arcp"}


def _kernel(fn):  # one decorator: the caching/fastmath choice is made once, here
    return njit(nogil=True, cache=True, fastmath=_FAST)(fn)


def _exact(fn):  # no fastmath at all
    return njit(nogil=True, cache=True)(fn)


def _bit_test(nan_only):
    """An intrinsic classifying a float by its bits: finite, or NaN.

    ``np.isfinite``/``np.isnan`` are floating-point comparisons, and the fast-math flags of the loops
    they end up inlined into allow LLVM to assume things about floats; integer tests on the exponent
    bits cannot be changed by any floating-point assumption.
    """

    def typer(typingctx, x):
        if x not in (types.float32, types.float64):
            return None
        bits = 32 if x == types.float32 else 64
        exponent = 0x7F800000 if bits == 32 else 0x7FF0000000000000
        magnitude = (1 << (bits - 1)) - 1  # everything but the sign bit

        def codegen(context, builder, signature, args):
            as_int = builder.bitcast(args[0], ir.IntType(bits))
            mask = ir.Constant(ir.IntType(bits), exponent)
            if nan_only:  # exponent all ones and a non-zero mantissa
                body = builder.and_(as_int, ir.Constant(ir.IntType(bits), magnitude))
                return builder.icmp_unsigned(">", body, mask)
            return builder.icmp_unsigned("!=", builder.and_(as_int, mask), mask)

        return types.boolean(x), codegen

    return intrinsic(typer)


_finite = _bit_test(nan_only=False)
_is_nan = _bit_test(nan_only=True)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as float32 (a register bitcast; numba has no scalar view)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_of_f32(typingctx, value):
    """The bits of a float32 as a uint32 (a register bitcast)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


def _decode(src, lut, i):  # typed implementations below, chosen at compile time by src's dtype
    raise NotImplementedError


@overload(_decode, jit_options={"fastmath": _FAST})
def _decode_impl(src, lut, i):
    dtype = src.dtype
    if isinstance(dtype, types.Float):  # F32, F64: cast

        def cast(src, lut, i):
            return np.float32(src[i])

        return cast
    if dtype == types.int16:  # BF16, passed as int16 (see RAW_VIEW): the top half of a float32

        def bf16(src, lut, i):
            return _f32_from_bits(np.uint32(np.uint16(src[i])) << np.uint32(16))

        return bf16

    def table(src, lut, i):  # F16 (uint16) and the FP8 kinds (uint8): look the bits up
        return lut[src[i]]

    return table


@_kernel
def start(src, lut):
    """Sum of W^2 (float64) and the non-finite count of one block of a checkpoint, decoded from
    ``src``: checkpoint 0, or the checkpoint an incremental run restarts from."""
    sumsq = 0.0
    for i in range(src.size):
        v = np.float64(_decode(src, lut, i))
        sumsq += v * v
    if _finite(sumsq):
        return sumsq, 0
    return _careful_norm(src, lut)


@_exact
def _careful_norm(src, lut):
    sumsq = 0.0
    nonfinite = 0
    for i in range(src.size):
        v = _decode(src, lut, i)
        if _finite(v):
            sumsq += np.float64(v) * np.float64(v)
        else:
            nonfinite += 1
    return sumsq, nonfinite


@_kernel
def fold_interval(first, old, new, lut, acc, fresh=False):
    """``fold_step`` without a last checkpoint: its first seven sums (the distance to the last
    checkpoint is left out)."""
    a, b, c, d, _, e, total, peak = fold_step(first, old, new, new, lut, acc, fresh)
    return a, b, c, d, e, total, peak


@_kernel
def fold_step(first, old, new, last, lut, acc, fresh=False):
    """One interval: ``acc += |W(t+1) - W(t)|`` with ``old = W(t)``, ``new = W(t+1)``, ``first = W(0)``
    and ``last = W(T-1)``, the run's last checkpoint.

    The four weight blocks are the checkpoints' own bytes (any dtype ``_decode`` knows, all the same
    one), decoded on the fly: nothing is copied or converted in between, and a float32 checkpoint is
    read straight into the buffer this loop reads. Returns (sum of |dW|, sum of dW^2, sum of
    W(t+1)^2, sum of (W(t+1) - W(0))^2, sum of (W(t+1) - W(T-1))^2, non-finite count of W(t+1), sum
    of ``acc``, max of ``acc``): the last two are what the caller needs after the last interval, and
    cost nothing measurable here (an ``if last`` would make LLVM compile a second version of the loop,
    whose sums could round differently: an incremental run must give the same bits as a full one).

    The loop sums unconditionally so it vectorises; only when a sum comes out non-finite (a NaN or
    Inf in the block, rare) it is redone leaving non-finite terms out, so one NaN does not hide the
    magnitude of every other weight. The accumulated map itself carries the NaN, and so do its sum and
    max. ``fresh``: this is the first interval, ``acc`` is overwritten (saves zeroing it).
    """
    # float32 partial sums: the vectorised loop keeps 32 or more independent accumulators, each summing
    # at most a few hundred terms of one block, and the caller adds the blocks up in float64. That is
    # 1.6x faster than float64 here, with a relative error far below the 1e-4 the tests demand.
    diff_sum = np.float32(0.0)
    diff_sumsq = np.float32(0.0)
    sumsq = np.float32(0.0)
    dist_first = np.float32(0.0)
    dist_last = np.float32(0.0)
    total = np.float32(0.0)
    # The max as an integer: ``acc`` holds magnitudes (or NaN), and the bits of non-negative floats
    # order like their values, with every NaN above +Inf. A signed int32 max vectorises (6x faster
    # here than a float max that must keep NaN, or an unsigned one).
    peak = np.int32(0)
    for i in range(acc.size):
        v = _decode(new, lut, i)
        w0 = _decode(first, lut, i)
        d = v - _decode(old, lut, i)
        e = v - w0
        f = v - _decode(last, lut, i)
        a = abs(d)
        s = a if fresh else acc[i] + a
        acc[i] = s
        diff_sum += a
        diff_sumsq += d * d
        sumsq += v * v
        dist_first += e * e
        dist_last += f * f
        total += s
        bits = np.int32(_bits_of_f32(s) & np.uint32(0x7FFFFFFF))
        peak = bits if bits > peak else peak
    nonfinite = 0
    if not (
        _finite(diff_sum) and _finite(diff_sumsq) and _finite(sumsq) and _finite(dist_first)
        and _finite(dist_last)
    ):  # fmt: skip
        # each sum that came out non-finite is redone; the others keep their bits, so a sum does not
        # depend on a NaN in a block it does not read (the distance to W(T-1) of a full and an
        # incremental run, whose W(t) are the same but not their W(t-1))
        c0, c1, c2, c3, c4, nonfinite = _careful_interval_sums(first, old, new, last, lut)
        return (
            _either(diff_sum, c0), _either(diff_sumsq, c1), _either(sumsq, c2), _either(dist_first, c3),
            _either(dist_last, c4), nonfinite, np.float64(total), np.float64(_f32_from_bits(np.uint32(peak))),
        )  # fmt: skip
    return (
        np.float64(diff_sum), np.float64(diff_sumsq), np.float64(sumsq), np.float64(dist_first),
        np.float64(dist_last), nonfinite, np.float64(total), np.float64(_f32_from_bits(np.uint32(peak))),
    )  # fmt: skip


@_exact
def _either(fast, careful):
    """The vectorised loop's sum when it is finite, else the careful one (float64)."""
    return np.float64(fast) if _finite(fast) else careful


@_exact
def _careful_interval_sums(first, old, new, last, lut):
    diff_sum = 0.0
    diff_sumsq = 0.0
    sumsq = 0.0
    dist_first = 0.0
    dist_last = 0.0
    nonfinite = 0
    for i in range(new.size):
        v = np.float64(_decode(new, lut, i))
        d = v - np.float64(_decode(old, lut, i))
        e = v - np.float64(_decode(first, lut, i))
        f = v - np.float64(_decode(last, lut, i))
        if _finite(d):
            diff_sum += abs(d)
            diff_sumsq += d * d
        if _finite(e):
            dist_first += e * e
        if _finite(f):
            dist_last += f * f
        if _finite(v):
            sumsq += v * v
        else:
            nonfinite += 1
    return diff_sum, diff_sumsq, sumsq, dist_first, dist_last, nonfinite


@_kernel
def distance_sq(a, b, lut):
    """Sum of (a - b)^2 (float64) over the terms that are finite, of two blocks decoded like ``start``'s."""
    total = 0.0
    for i in range(a.size):
        d = np.float64(_decode(a, lut, i)) - np.float64(_decode(b, lut, i))
        total += d * d
    if _finite(total):
        return total
    return _careful_distance_sq(a, b, lut)


@_exact
def _careful_distance_sq(a, b, lut):
    total = 0.0
    for i in range(a.size):
        d = np.float64(_decode(a, lut, i)) - np.float64(_decode(b, lut, i))
        if _finite(d):
            total += d * d
    return total


@_kernel
def decode_into(src, lut, out):
    """out = the float32 values of ``src`` (a checkpoint's bytes; used when the dtype changes along a
    run, so that every block handed to ``fold_step`` has the same type)."""
    for i in range(out.size):
        out[i] = _decode(src, lut, i)


@intrinsic
def _pread(typingctx, fd, address, nbytes, offset):
    """libc ``pread(fd, (void*)address, nbytes, offset)``, called without the GIL.

    Declared by symbol name (resolved when the cached machine code is loaded), so functions using it
    stay cacheable, unlike a ctypes function pointer baked in as a constant.
    """
    return _libc_io("pread")


@intrinsic
def _pwrite(typingctx, fd, address, nbytes, offset):
    """libc ``pwrite(fd, (const void*)address, nbytes, offset)``."""
    return _libc_io("pwrite")


def _libc_io(symbol):
    sig = types.int64(types.int32, types.intp, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i64, [ir.IntType(32), i8p, i64, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
        fd, address, nbytes, offset = args
        return builder.call(fn, [fd, builder.inttoptr(address, i8p), nbytes, offset])

    return sig, codegen


@_kernel
def _transfer(fd, address, nbytes, offset, write):
    """pread/pwrite exactly ``nbytes`` at ``offset``; False when the file ended or the call failed."""
    done = 0
    while done < nbytes:
        if write:
            moved = _pwrite(fd, address + done, nbytes - done, offset + done)
        else:
            moved = _pread(fd, address + done, nbytes - done, offset + done)
        if moved <= 0:
            return False
        done += moved
    return True


@_kernel
def read_full(fd, raw, nbytes, offset):
    """Read exactly ``nbytes`` at ``offset`` into the array ``raw``."""
    return _transfer(fd, raw.ctypes.data, nbytes, offset, False)


@_kernel
def _write_full(fd, data, nbytes, offset):
    """Write the first ``nbytes`` of the array ``data`` at ``offset``."""
    return _transfer(fd, data.ctypes.data, nbytes, offset, True)


# Decoders the driver dispatches on, one per checkpoint (the dtype may change along a run).
CODE_F32, CODE_F64, CODE_BF16, CODE_TABLE16, CODE_TABLE8 = 0, 1, 2, 3, 4
BLOCK = 1 << 14  # elements per sub-block: 64 KiB of float32 (``block_elements`` adapts it per dtype)
READ_BYTES = 1 << 17  # bytes per read: measured best here for F32 and BF16 (64 KiB: BF16 at half speed)
# Rows of the weight buffers are padded by 64 bytes: with power-of-two strides the four streams of the
# loop (first, old, new, acc) compete for the same cache sets.
SCRATCH_PAD = 64


def block_elements(itemsizes) -> int:
    """Elements per sub-block so that one read of the widest dtype is READ_BYTES (>= BLOCK / 2)."""
    return max(BLOCK // 2, READ_BYTES // max(itemsizes))


def weight_buffers(block: int, itemsizes) -> np.ndarray:
    """The four weight buffers ``stream_chunk`` needs for sub-blocks of ``block`` elements: W(0), two
    that take turns as W(t) and W(t+1), and W(T-1) (``LAST``, read first: see ``slot``); each holds a
    block of checkpoint bytes or of float32."""
    return np.empty((4, block * max(4, int(max(itemsizes))) + SCRATCH_PAD), np.uint8)


OK = 0
LAST = 3  # the weight buffer of the run's last checkpoint W(T-1)


@_kernel
def _fold_typed(first, old, new, last, lut, t, rebase, fresh, final, acc, sums, frame, fdiff):
    """One checkpoint's block, already in ``new``: its sums, or one interval folded into ``acc``.

    ``sums`` = (interval_sum, interval_sumsq, sumsq, dist_first, dist_last, nonfinite, totals);
    ``last`` holds the block of the run's last checkpoint W(T-1); ``frame``: also write this
    interval's |dW| into ``fdiff`` (for the frames); ``final``: ``acc`` is final, add its sum and max
    to ``totals``. Returns the sum of ``acc`` (0 for a checkpoint without an interval).
    """
    interval_sum, interval_sumsq, sumsq, dist_first, dist_last, nonfinite, totals = sums
    if t == 0:
        x, y = start(new, lut)
        sumsq[t] += x
        nonfinite[t] += y
        dist_last[t] += distance_sq(new, last, lut)
        return 0.0
    if rebase:  # the restart point W(K-1) of an incremental run: only its distance to W(T-1) is new,
        # summed by the loop that sums it in a full run (the same bits); acc += |W(K-1) - W(K-1)| = 0
        dist_last[t] += fold_step(first, new, new, last, lut, acc, False)[4]
        return 0.0
    a, b, c, d, e, n_bad, total, peak = fold_step(first, old, new, last, lut, acc, fresh)
    interval_sum[t - 1] += a
    interval_sumsq[t - 1] += b
    sumsq[t] += c
    dist_first[t] += d
    dist_last[t] += e
    nonfinite[t] += n_bad
    if final:
        totals[0] += total
        _merge_peak(totals, peak)
    if frame:
        abs_diff(new, old, lut, fdiff)
    return total


@_kernel
def _views(rows, k0, k1, k2, nbytes, dtype):
    """The first ``nbytes`` of buffers ``k0``, ``k1``, ``k2`` and ``LAST`` of ``rows``, as arrays of
    ``dtype``."""
    return (
        rows[k0, :nbytes].view(dtype), rows[k1, :nbytes].view(dtype), rows[k2, :nbytes].view(dtype),
        rows[LAST, :nbytes].view(dtype),
    )  # fmt: skip


@_kernel
def _fold(code, lut, rows, k0, k1, k2, n, t, rebase, fresh, final, acc, sums, frame, fdiff):
    """``_fold_typed`` on buffers ``k0`` (W(0)), ``k1`` (W(t-1)), ``k2`` (W(t)) and ``LAST`` (W(T-1))
    of ``rows``, viewed as the ``n`` values of their dtype ``code`` (the choice of decoder is made
    here, once per block)."""
    args = (lut, t, rebase, fresh, final, acc, sums, frame, fdiff)
    if code == CODE_F32:
        return _fold_typed(*_views(rows, k0, k1, k2, n * 4, np.float32), *args)
    elif code == CODE_F64:
        return _fold_typed(*_views(rows, k0, k1, k2, n * 8, np.float64), *args)
    elif code == CODE_BF16:
        return _fold_typed(*_views(rows, k0, k1, k2, n * 2, np.int16), *args)
    elif code == CODE_TABLE16:
        return _fold_typed(*_views(rows, k0, k1, k2, n * 2, np.uint16), *args)
    return _fold_typed(*_views(rows, k0, k1, k2, n, np.uint8), *args)


@_kernel
def decode_block(raw, code, lut, out):
    """``decode_into`` with the decoder chosen by ``code`` (for runs whose dtype changes)."""
    if code == CODE_F32:
        decode_into(raw[: out.size * 4].view(np.float32), lut, out)
    elif code == CODE_F64:
        decode_into(raw[: out.size * 8].view(np.float64), lut, out)
    elif code == CODE_BF16:
        decode_into(raw[: out.size * 2].view(np.int16), lut, out)
    elif code == CODE_TABLE16:
        decode_into(raw[: out.size * 2].view(np.uint16), lut, out)
    else:
        decode_into(raw[: out.size], lut, out)


@_exact
def _merge_peak(totals, peak):
    if not _is_nan(totals[1]):  # NaN-aware max: once NaN, it stays NaN
        totals[1] = peak if _is_nan(np.float64(peak)) else max(totals[1], peak)


@_kernel
def add_row_sums(values, first, cols, rows, row0):
    """rows[r - row0] += the sum of the row-r elements among ``values`` = elements [first, ...)."""
    k = 0
    n = values.size
    while k < n:
        r = (first + k) // cols
        seg = min(n - k, cols - (first + k - r * cols))  # this row's part of the piece
        piece = values[k : k + seg]  # indices from 0: no negative-index check, so the loop vectorises
        total = np.float32(0.0)  # float32 partial sums (see ``fold_step``); rows add up in float64
        for q in range(piece.size):
            total += piece[q]
        rows[r - row0] += total
        k += seg


@_kernel
def abs_diff(new, old, lut, out):
    """out = |new - old| (one interval's change, for the frames), decoded from the blocks' bytes."""
    for i in range(out.size):
        out[i] = abs(_decode(new, lut, i) - _decode(old, lut, i))


def slot(t: int, count: int) -> int:
    """The weight buffer checkpoint t of ``count`` goes into: W(0) in buffer 0, then 1, 2, 1, 2, ...
    (the previous checkpoint is always in the other one), and the last, W(T-1), in ``LAST``.

    Every sub-block reads W(T-1) first, into ``LAST``, then W(0), W(1), ...: each checkpoint's
    distance to the last one is summed in the same pass, and W(T-1) is still read once (its turn
    comes last, and it is already there)."""
    if t == count - 1:
        return LAST
    return 0 if t == 0 else 1 + (t - 1) % 2


_slot = njit(cache=True)(slot)


def read_order(count: int) -> list[int]:
    """The order the checkpoints of a sub-block are read in: W(T-1), then W(0) .. W(T-2)."""
    return [count - 1, *range(count - 1)]


@_kernel
def fold_checkpoint(
    code, lut, weights, t, count, resume, lo, n, acc, sums, fgrid, mean, fcells, fcell_row0, flines,
    fstates, diff,
):  # fmt: skip
    """Fold checkpoint ``t``'s block of ``n`` elements from ``lo``, already in buffer
    ``slot(t, count)`` of ``weights`` (as dtype ``code``; W(T-1) is in ``LAST`` from the start), into
    ``sums`` and ``acc``; pool the interval's |dW| into its frame
    (``fcells``, when not empty). Returns True when this was the last checkpoint and ``acc`` is free
    of NaN and Inf (its pooling may skip counting them)."""
    rebase = resume and t == 1  # incremental run: W(K-1), where the new intervals start
    fresh = not resume and t == 1  # the first interval writes acc instead of adding to it
    final = t == count - 1
    f = t - 2 if resume else t - 1  # this interval's frame
    frame = fcells.size > 0 and f >= 0
    fdiff = diff[:n]
    old = 0 if t <= 1 else _slot(t - 1, count)
    args = (n, t, rebase, fresh, final, acc, sums, frame, fdiff)
    total = _fold(code, lut, weights, 0, old, _slot(t, count), *args)
    if frame:
        pool_fold(
            fdiff, lo, fgrid[0], fgrid[1], fgrid[2], fgrid[3], mean, fcells[f], fcell_row0, flines[f],
            fstates[f : f + 1],
        )  # fmt: skip
    return final and _finite(total)


@_kernel
def finish_block(acc, lo, clean, totals, grid, mean, cells, cell_row0, line, state, row_cols, rows, row0):
    """The finished accumulated values of a block (elements from ``lo``): pooled into the scene's
    cells (``clean``: known free of NaN/Inf; the count of those goes to ``totals[2]``) and added to
    the row sums (each part skipped when its array is empty)."""
    if cells.size:
        totals[2] += pool_fold(
            acc, lo, grid[0], grid[1], grid[2], grid[3], mean, cells, cell_row0, line, state, clean
        )
    if rows.size:
        add_row_sums(acc, lo, row_cols, rows, row0)


@_exact
def finish_chunk(grid, mean, cells, line, state, fgrid, fcells, flines, fstates):
    """Move the partly filled pooling lines of the last rows into the cells and the frames."""
    if cells.size:
        pool_flush(cells, line, state, grid[3], mean)
    for f in range(fcells.shape[0]):
        pool_flush(fcells[f], flines[f], fstates[f : f + 1], fgrid[3], mean)


@_exact
def round_bf16(values, out):
    """out = ``values`` (float32) rounded to BF16 (the bits, as int16): to the nearest, ties to even,
    as ``ml_dtypes`` and torch round; a NaN stays a NaN of the same sign, +-Inf stays infinite, and a
    value beyond BF16's largest finite rounds to infinity."""
    for i in range(values.size):
        bits = _bits_of_f32(values[i])
        if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it a (quiet) NaN
            top = (bits >> np.uint32(16)) | np.uint32(0x0040)
        else:
            top = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out[i] = np.int16(np.uint16(top))


@_kernel
def widen_bf16(bf16, out):
    """out = the float32 values of BF16 bits ``bf16`` (int16; exact)."""
    decode_into(bf16, _NO_LUT, out)


@_kernel
def write_map(fd, offset, code, acc, store):
    """Write the accumulated slice ``acc`` at ``offset``: float32, or rounded to BF16 via ``store``;
    nothing when ``fd`` is -1 (a run that stores no map)."""
    if fd < 0:
        return True
    if code == CODE_BF16:
        bf16 = store[: acc.size]
        round_bf16(acc, bf16)
        return _write_full(fd, bf16, acc.size * 2, offset)
    return _write_full(fd, acc, acc.size * 4, offset)


@_kernel
def read_map(fd, offset, code, acc, store):
    """Read an earlier accumulated slice into ``acc`` (float32) from ``offset``: stored as float32, or
    as BF16 (read into ``store``, then widened: exact)."""
    if code == CODE_BF16:
        bf16 = store[: acc.size]
        if not read_full(fd, bf16, acc.size * 2, offset):
            return False
        widen_bf16(bf16, acc)
        return True
    return read_full(fd, acc, acc.size * 4, offset)


@_kernel
def stream_chunk(source, span, files, work, sums, pool, row_sums, frames):
    """Elements [begin, end) of one tensor, through every checkpoint, sub-block by sub-block.

    The arguments are tuples of related values:

    - ``source`` = (fds, offsets, itemsizes, codes, lut_index, luts): the tensor in every checkpoint;
    - ``span`` = (begin, end): the element range;
    - ``files`` = (out_fd, out_offset, out_code, acc_in_fd, acc_in_offset, acc_in_code): where the
      accumulated slice goes (``out_fd`` -1: nowhere, the map is not stored) and how it is stored
      (``CODE_F32``, or ``CODE_BF16``: rounded to the nearest even, ``round_bf16``), and where
      earlier results (stored as ``acc_in_code``) start it
      from (``acc_in_fd`` -1: from zero); ``out_offset``/``acc_in_offset`` are where element 0 is;
    - ``work`` = (raw, weights, acc_buf, store, block): the buffers (``store``: ``block`` int16, for
      a BF16 map) and the sub-block size;
    - ``sums`` = (interval_sum, interval_sumsq, sumsq, dist_first, dist_last, nonfinite, totals);
    - ``pool`` = (grid, mean, cells, cell_row0, line): the scene's cells;
    - ``row_sums`` = (row_cols, rows, row0);
    - ``frames`` = (fgrid, fcells, fcell_row0, flines, fstates, diff): the film's cells.

    ``fds/offsets/itemsizes/codes/lut_index`` describe the tensor in checkpoint t (``offsets[t]`` is
    the byte offset of element 0 in file ``fds[t]``; ``luts[lut_index[t]]`` its decode table). Sums
    are added into ``interval_sum`` and ``interval_sumsq`` (T-1: sum of |dW| and dW^2), ``sumsq``,
    ``dist_first`` (sum of (W(t) - W(0))^2), ``dist_last`` (sum of (W(t) - W(T-1))^2), ``nonfinite``
    (T) and ``totals`` = [sum of acc, max of
    acc, non-finite count of acc].

    Each sub-block of a checkpoint is read (``pread``, no GIL) straight into one of the four
    ``weights`` buffers (``weight_buffers``: W(0), two that take turns as W(t-1) and W(t), and W(T-1),
    read first: ``slot``) and ``fold_step`` decodes them as it goes. When the dtype changes along the
    run, each block is read into ``raw`` instead and decoded into its buffer as float32. ``acc_buf``
    (``block`` float32 or more) holds the accumulated slice, written to ``out_fd`` at ``out_offset``
    (``pwrite``), as float32 or rounded to BF16 into ``store`` first. The sums, cells and row sums
    are taken from the float32 slice either way: only the stored map is rounded.

    When ``cells`` is not empty, the finished accumulated values are also pooled into the scene's
    cells (``pool_fold``; ``grid`` = [rows, cols, block_rows, block_cols], ``mean`` the pool kind),
    so the scene does not read the results file again. When ``rows`` is not empty, the row sums of
    the accumulated map (rows of ``row_cols`` elements) are added into it from row ``row0`` on. When
    ``fcells`` (F x cell rows x cell cols) is not empty, each interval's |dW| is pooled the same way
    into its own frame (``fgrid``, ``flines[f]``, ``fstates[f]``; ``diff`` is scratch).

    Incremental runs pass ``acc_in_fd >= 0``: the accumulated map starts from the previous results at
    ``acc_in_offset`` instead of zero, and the checkpoints are [W(0), W(K-1), W(K), ...]: W(0) for the
    net change and rotation, W(K-1) the point the new intervals start from (no interval before it).
    There must be at least one interval (two checkpoints; three when resuming).

    Returns OK, ``-(t + 1)`` when reading checkpoint t failed (the file shrank or an I/O error),
    ``-(T + 1)`` when writing failed, ``-(T + 2)`` when reading previous results failed.
    """
    fds, offsets, itemsizes, codes, lut_index, luts = source
    begin, end = span
    out_fd, out_offset, out_code, acc_in_fd, acc_in_offset, acc_in_code = files
    raw, weights, acc_buf, store, block = work
    out_size = 2 if out_code == CODE_BF16 else 4
    in_size = 2 if acc_in_code == CODE_BF16 else 4
    totals = sums[6]
    grid, mean, cells, cell_row0, line = pool
    row_cols, rows, row0 = row_sums
    fgrid, fcells, fcell_row0, flines, fstates, diff = frames
    count = fds.size
    resume = acc_in_fd >= 0
    uniform = True  # one dtype all along: blocks stay in their own bytes
    for t in range(1, count):
        if codes[t] != codes[0] or lut_index[t] != lut_index[0]:
            uniform = False
    code = codes[0] if uniform else CODE_F32
    lut = luts[lut_index[0]]
    state = np.full(1, -1, np.int64)
    for lo in range(begin, end, block):
        n = min(block, end - lo)
        acc = acc_buf[:n]
        if resume and not read_map(acc_in_fd, acc_in_offset + lo * in_size, acc_in_code, acc, store):
            return -(count + 2)
        clean = False
        for k in range(count + 1):  # W(T-1) first (into LAST), then W(0) .. W(T-1): see ``slot``
            t = count - 1 if k == 0 else k - 1
            if k == 0 or t < count - 1:  # W(T-1) is read once, before the others
                nbytes = n * itemsizes[t]
                where = offsets[t] + lo * itemsizes[t]
                if uniform:
                    if not read_full(fds[t], weights[_slot(t, count)], nbytes, where):
                        return -(t + 1)
                else:
                    if not read_full(fds[t], raw, nbytes, where):
                        return -(t + 1)
                    out = weights[_slot(t, count), : n * 4].view(np.float32)
                    decode_block(raw[:nbytes], codes[t], luts[lut_index[t]], out)
            if k == 0:
                continue
            clean = fold_checkpoint(
                code, lut, weights, t, count, resume, lo, n, acc, sums, fgrid, mean, fcells, fcell_row0,
                flines, fstates, diff,
            )  # fmt: skip
        finish_block(acc, lo, clean, totals, grid, mean, cells, cell_row0, line, state, row_cols, rows, row0)
        if not write_map(out_fd, out_offset + lo * out_size, out_code, acc, store):
            return -(count + 1)
    finish_chunk(grid, mean, cells, line, state, fgrid, fcells, flines, fstates)
    return OK


# --- pooling the accumulated map into the scene's cells ----------------------------------------------
# A tensor's grid (rows = first dimension, columns = the rest) is pooled into cells of
# block_rows x block_cols elements. Values arrive as pieces of the flattened tensor, in order, from
# any starting element (a chunk of a Dask task, or a read of the results file). Two steps that both
# vectorise: down the rows of a block into a ``line`` of per-column values (elementwise max or sum),
# then, once the block of rows is complete (or the pieces stop), across the line into the cells.
# One-row grids and rows wider than the line reduce straight into the cells.

MAX_LINE = 1 << 21  # widest grid row pooled through a line buffer (16 MiB of float64)


def pool_line(rows: int, cols: int, mean: bool) -> np.ndarray:
    """The ``line`` buffer ``pool_fold`` needs for a rows x cols grid, filled with the reduction's
    identity; empty (reduce straight into the cells) for one-row grids and rows wider than MAX_LINE."""
    direct = rows == 1 or cols > MAX_LINE
    return np.full(0 if direct else cols, 0.0 if mean else -np.inf)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _fold_down(values, line, mean, clean):
    """line = max(line, values) or line += values, elementwise; returns the non-finite count.

    ``clean``: the caller knows every value is finite (skips counting them).
    """
    bad = 0
    if mean:
        for q in range(values.size):
            line[q] += values[q]
    else:
        for q in range(values.size):  # np.maximum keeps NaN, and vectorises (a select does not here)
            line[q] = np.maximum(line[q], values[q])
    if clean:
        return 0
    for q in range(values.size):
        bad += not _finite(values[q])
    return bad


@_exact
def _fold_across(line, cells_row, block_cols, mean):
    """Reduce the line into one row of cells (NaN-aware max, or sums)."""
    for j in range(cells_row.size):
        m = cells_row[j]
        for c in range(j * block_cols, min(line.size, (j + 1) * block_cols)):
            v = line[c]
            if mean:
                m += v
            elif (_is_nan(v) or v > m) and not _is_nan(m):
                m = v
        cells_row[j] = m


@_exact
def _fold_into_cells(values, cells_row, first_col, block_cols, mean):
    """Fold ``values`` (columns first_col.. of one row) straight into a row of cells."""
    bad = 0
    for q in range(values.size):
        j = (first_col + q) // block_cols
        v = values[q]
        bad += not _finite(v)
        if mean:
            cells_row[j] += v
        elif (_is_nan(v) or v > cells_row[j]) and not _is_nan(cells_row[j]):
            cells_row[j] = v
    return bad


@_exact
def pool_flush(cells, line, state, block_cols, mean):
    """Move a partly filled line into its cell row (at the end of a chunk or of the pieces)."""
    if state[0] >= 0:
        _fold_across(line, cells[state[0]], block_cols, mean)
        line[:] = 0.0 if mean else -np.inf
        state[0] = -1


@_exact
def pool_fold(
    values, first, rows, cols, block_rows, block_cols, mean, cells, cell_row0, line, state, clean=False
):
    """Fold ``values`` = elements [first, first + values.size) of the flattened grid into ``cells``.

    ``cells`` rows start at cell row ``cell_row0``; they hold -inf (max) or 0 (mean: sums) where
    nothing was folded yet. ``line`` (``cols`` float64, filled like the cells; or empty to reduce
    straight into the cells) and ``state`` (int64[1], -1 initially) carry a block of rows across
    calls; call ``pool_flush`` after the last piece. Returns the number of non-finite values
    (``clean=True``: the caller vouches that all values are finite, e.g. their sum is).
    """
    bad = 0
    k = 0
    n = values.size
    while k < n:
        r = (first + k) // cols
        c = first + k - r * cols
        seg = min(n - k, cols - c)  # this row's part of the piece
        i = r // block_rows - cell_row0
        if line.size == 0:
            bad += _fold_into_cells(values[k : k + seg], cells[i], c, block_cols, mean)
        else:
            if state[0] != i:
                pool_flush(cells, line, state, block_cols, mean)
                state[0] = i
            bad += _fold_down(values[k : k + seg], line[c : c + seg], mean, clean)
            if c + seg == cols and (r % block_rows == block_rows - 1 or r == rows - 1):
                pool_flush(cells, line, state, block_cols, mean)
        k += seg
    return bad


def warm_up() -> None:
    """Load ``stream_chunk`` from the Numba cache (or compile it) with a call that reads nothing.

    Loading costs about 0.3 s per process (mostly in LLVM, which releases the GIL), so the pipeline
    does it on a side thread while the main thread is still scanning the checkpoints.
    """
    i64 = np.zeros(1, np.int64)
    f64 = np.zeros(1)
    stream_chunk(
        (np.zeros(1, np.int32), i64, np.ones(1, np.int64), np.zeros(1, np.int8), np.zeros(1, np.int32),
         np.zeros((1, 1), np.float32)),
        (0, 0),
        (-1, 0, CODE_F32, -1, 0, CODE_F32),
        (np.empty(8, np.uint8), weight_buffers(1, [4]), np.empty(1, np.float32), np.empty(1, np.int16), 1),
        (f64[:0], f64[:0], f64, f64, f64, i64, np.zeros(3)),
        (np.zeros(4, np.int64), False, np.empty((0, 0)), 0, np.empty(0)),
        (1, np.empty(0), 0),
        (np.zeros(4, np.int64), np.empty((0, 0, 0)), 0, np.empty((0, 0)), i64, np.empty(1, np.float32)),
    )  # fmt: skip


_NO_LUT = np.empty(0, dtype=np.float32)

# How the raw bytes of each dtype are viewed by ``start``/``fold_interval``. The view's numpy type selects the
# decoder at compile time: floats are cast, int16 means BF16 (decoded by a shift), uint16/uint8 are
# looked up in ``decode_table`` (F16 and the FP8 kinds).
RAW_VIEW = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "BF16": np.dtype("<i2"),
    "F16": np.dtype("<u2"),
}
_CODES = {"F32": CODE_F32, "F64": CODE_F64, "BF16": CODE_BF16, "F16": CODE_TABLE16}


def raw_view(code: str) -> np.dtype:
    """The numpy dtype to view a chunk of ``code`` raw bytes as, for ``start``/``fold_interval``."""
    return RAW_VIEW.get(code, np.dtype("u1"))


def decoder_code(code: str) -> int:
    """How ``stream_chunk`` decodes a dtype (one of the CODE_* constants)."""
    return _CODES.get(code, CODE_TABLE8)


@functools.cache
def decode_table(code: str) -> np.ndarray:
    """float32 value of every bit pattern of F16 and the FP8 kinds; empty where the kernel decodes."""
    from wdiff.readers.base import DTYPES

    kind = DTYPES[code]
    if code in ("F32", "F64", "BF16"):
        return _NO_LUT
    raw = np.arange(1 << kind.bits, dtype=np.uint16 if kind.bits == 16 else np.uint8)
    table = raw.view(kind.decoded).astype(np.float32)
    table.flags.writeable = False
    return table


def decode_tables(codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (K, 65536) stack of the tables these dtypes need, and each dtype's row in it."""
    needed = sorted({c for c in codes if decode_table(c).size})
    luts = np.zeros((max(1, len(needed)), 1 << 16), np.float32)
    for row, code in enumerate(needed):
        table = decode_table(code)
        luts[row, : table.size] = table
    index = np.array([needed.index(c) if c in needed else 0 for c in codes], np.int32)
    return luts, index
