"""Numba kernels: plain typed 1-D loops over one chunk, writing into buffers the caller owns.

A chunk of a tensor is streamed checkpoint by checkpoint: ``start`` decodes the first checkpoint's
values, then ``step`` is called once per interval with the raw bytes of the next checkpoint. Decoding
is fused into the loop: float32/float64 are cast, every 8- and 16-bit float kind (F16, BF16, FP8) is
decoded through a lookup table of float32 values indexed by the raw bits.

All kernels are ``nogil`` (Dask threads run them in parallel) and ``cache=True`` (a second run does not
compile). ``fastmath`` is limited to reassociation and contraction so sums vectorise, while NaN and Inf
keep IEEE semantics: a NaN in a checkpoint must show up in the results, not vanish.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_FAST = {"reassoc", "contract", "nsz", "arcp"}


def _kernel(fn):  # one decorator: the caching/fastmath choice is made once, here
    return njit(nogil=True, cache=True, fastmath=_FAST)(fn)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as float32 (a register bitcast; numba has no scalar view)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

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
def start(src, lut, first, prev):
    """Decode checkpoint 0 into ``first`` and ``prev``. Returns (sum of W^2, non-finite count)."""
    sumsq = 0.0
    nonfinite = 0
    for i in range(first.size):
        v = _decode(src, lut, i)
        first[i] = v
        prev[i] = v
        if np.isfinite(v):
            sumsq += np.float64(v) * np.float64(v)
        else:
            nonfinite += 1
    return sumsq, nonfinite


@_kernel
def step(src, lut, first, prev, acc):
    """One interval: ``acc += |W(t+1) - W(t)|`` and ``prev = W(t+1)``.

    Returns (sum of dW^2, sum of W(t+1)^2, dot(W(t+1), W(0)), non-finite count of W(t+1)) for this
    chunk, accumulated in float64. Non-finite values are counted and left out of the norms, so one NaN
    does not hide the magnitude of every other weight; the accumulated map itself carries the NaN.
    """
    diff_sumsq = 0.0
    sumsq = 0.0
    dot_first = 0.0
    nonfinite = 0
    for i in range(acc.size):
        v = _decode(src, lut, i)
        d = v - prev[i]
        acc[i] += abs(d)
        prev[i] = v
        if np.isfinite(d):
            diff_sumsq += np.float64(d) * np.float64(d)
        if np.isfinite(v):
            sumsq += np.float64(v) * np.float64(v)
            dot_first += np.float64(v) * np.float64(first[i])
        else:
            nonfinite += 1
    return diff_sumsq, sumsq, dot_first, nonfinite


@_kernel
def net_change(first, last):
    """Sum of (W_last - W_first)^2 over the finite differences of this chunk."""
    total = 0.0
    for i in range(first.size):
        d = np.float64(last[i]) - np.float64(first[i])
        if np.isfinite(d):
            total += d * d
    return total


_NO_LUT = np.empty(0, dtype=np.float32)

# How the raw bytes of each dtype are viewed when passed to a kernel. The view's numpy type selects
# the decoder at compile time: floats are cast, int16 means BF16 (decoded by a shift), uint16/uint8
# are looked up in ``decode_table`` (F16 and the FP8 kinds).
RAW_VIEW = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "BF16": np.dtype("<i2"),
    "F16": np.dtype("<u2"),
}


def raw_view(code: str) -> np.dtype:
    """The numpy dtype to view a chunk of ``code`` raw bytes as, for the kernels."""
    return RAW_VIEW.get(code, np.dtype("u1"))


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
