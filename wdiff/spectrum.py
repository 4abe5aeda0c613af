"""The spectrum of every 2-D weight's total update ``D = W(T) - W(0)``: how low-rank the training change is.

``D`` is the tensor as a matrix of ``m`` rows (``shape[0]``: a neuron, a token, a conv filter) by ``n``
columns (the rest, ``chunk.row_cols``), formed in float32 from the first and the last checkpoint only,
read by offset through the same readers and ``InputFiles`` as compute (remote objects by range). Three
ways, by the shape (formulas, accuracy and references in docs/metrics.md, "The rank of the update"):

- ``exact``: ``min(m, n) <= EXACT_SIDE``. A matrix of at most ``BLOCK_ELEMENTS`` elements is read whole
  and given to LAPACK's SVD; a bigger one is reduced to the triangular factor of its QR decomposition
  block by block along its long side (TSQR: the factor of ``[X1; X2]`` is that of ``[R1; R2]``), whose
  ``min(m, n)`` singular values are those of ``D``.
- ``randomized``: the range finder of Halko, Martinsson & Tropp (2011, algorithms 4.4 and 5.1) with
  ``l = k + OVERSAMPLE`` columns and ``POWER_ITERATIONS`` power iterations, over groups of row blocks:
  ``2 + 2 q`` passes over the two checkpoints, each a few Dask tasks whose partial products fit in
  ``MEMORY`` bytes.
- ``lora``: a LoRA adapter (``TensorRef.source == "product"``): ``D = [B_T, -B_0] [s_T A_T; s_0 A_0]``
  has rank at most ``r_T + r_0`` and its singular values are those of the small core ``R_B R_A^T``
  (QR of each factor), exact, from the factors alone.

The Dask tasks run on the scheduler compute used: threads (also for ``processes`` and ``local:N``: the
work is BLAS and reads, which release the GIL) or a ``dask.distributed`` address.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from wdiff.blocks import factor_ranges, piece_ranges, pieces_of
from wdiff.chunk import row_cols
from wdiff.errors import WdiffError
from wdiff.experts import fused_experts
from wdiff.readers.base import InputFiles, TensorRef
from wdiff.schema import UpdateSpectrum, update_spectrum
from wdiff.sequence import AlignedTensor

__all__ = ["ENERGIES", "K_MAX", "is_matrix", "spectrum_entry", "update_spectra"]

K_MAX = 128  # singular values reported: k = min(K_MAX, m, n)
OVERSAMPLE = 64  # randomized: l = k + OVERSAMPLE columns (Halko et al. 4.2; more than their 5-10: see docs)
POWER_ITERATIONS = 2  # randomized: q (Halko et al. section 4.5), 2 + 2q passes over W(0) and W(T)
EXACT_SIDE = 512  # min(m, n) up to this: every singular value, exactly
BLOCK_ELEMENTS = 1 << 20  # elements of D one task holds at a time (4 MiB as float32)
MEMORY = 128 << 20  # a randomized pass: bytes of the partial products its tasks hold at once
ENERGIES = (0.5, 0.9, 0.99)
SEED = 20110101  # the sample matrix is the same every run: the same numbers every run
_RTOL = 1e-12  # an energy share reached up to rounding counts as reached


def is_matrix(tensor: AlignedTensor) -> bool:
    """Whether a tensor gets an update spectrum: 2 or more dimensions (a conv weight is its filters by
    the rest) and at least one element; not fused MoE experts (``experts.gate_up_proj`` (E, 2I, H)):
    their rows are experts, and one matrix of all of them is no update anyone would factor."""
    if len(tensor.shape) == 3 and fused_experts(tensor.name):
        return False
    return len(tensor.shape) >= 2 and tensor.numel > 0


def _sides(tensor: AlignedTensor) -> tuple[int, int]:
    cols = row_cols(tensor.shape)
    return tensor.numel // cols, cols


# --- the numbers of one spectrum ------------------------------------------------------------------------


def spectrum_entry(
    values: np.ndarray, energy: float, k: int, *, complete: bool, method: str
) -> UpdateSpectrum:
    """The ``update_spectrum`` entry of ``summary.json`` from singular values ``values`` (descending)
    and ``energy = ||D||_F^2``. ``complete``: ``values`` are every singular value of ``D`` (then the
    effective rank and every rank for energy are exact); else the top ones (randomized), of which the
    first ``k`` are trusted and reported."""
    values = np.sort(np.asarray(values, np.float64))[::-1]
    values = np.maximum(values, 0.0)
    if not energy > 0:  # W(T) == W(0): the zero matrix has rank 0 and no spectrum
        return update_spectrum(
            method=method, k=k, complete=complete, singular_values=[], effective_rank=0.0,
            energy_captured=None, rank_for_energy={str(f): 0 for f in ENERGIES},
            note="W(T) equals W(0): the update is zero",
        )  # fmt: skip
    trusted = values if complete else values[:k]
    cumulative = np.cumsum(trusted**2)
    ranks: dict[str, int | None] = {}
    for f in ENERGIES:
        reached = np.nonzero(cumulative >= f * energy * (1 - _RTOL))[0]
        ranks[str(f)] = int(reached[0]) + 1 if reached.size else None  # None: more than k
    total = trusted.sum()
    p = trusted[trusted > 0] / total if total > 0 else np.ones(1)
    return update_spectrum(
        method=method,
        k=k,
        complete=complete,
        singular_values=[float(v) for v in values[:k]],
        effective_rank=float(np.exp(-(p * np.log(p)).sum())),
        energy_captured=float(min(1.0, cumulative[min(k, cumulative.size) - 1] / energy)),
        rank_for_energy=ranks,
    )


def _nonfinite(method: str, k: int) -> UpdateSpectrum:
    return update_spectrum(
        method=method, k=k, complete=False, singular_values=[], effective_rank=None, energy_captured=None,
        rank_for_energy={str(f): None for f in ENERGIES}, note="W(0) or W(T) holds NaN or Inf: no spectrum",
    )  # fmt: skip


# --- reading D --------------------------------------------------------------------------------------


def _ends(tensor: AlignedTensor) -> AlignedTensor:
    """The tensor in its first and last checkpoint only: all the spectrum reads."""
    return replace(tensor, refs=(tensor.refs[0], tensor.refs[-1]))


def _read(ref: TensorRef, spans: Sequence[tuple[int, int]], files: InputFiles) -> np.ndarray:
    """Elements ``[lo, hi)`` of every span of ``ref``, one after the other, decoded to float32."""
    size = ref.kind.bits // 8
    pieces = pieces_of(ref)
    raw = np.empty(sum(hi - lo for lo, hi in spans) * size, np.uint8)
    at = 0
    for lo, hi in spans:
        for p in pieces:
            a, b = max(lo, p.start), min(hi, p.start + p.count)
            if b <= a:
                continue
            view = memoryview(raw)[at : at + (b - a) * size]
            try:
                got = os.preadv(files.fd(p.path), [view], p.offset + (a - p.start) * size)
            except OSError as e:
                raise WdiffError(p.path, f"cannot read: {e.strerror or e}") from None
            if got != (b - a) * size:
                raise WdiffError(p.path, f"reading tensor {ref.name!r} failed: the file shrank")
            at += (b - a) * size
    assert ref.kind.decoded is not None  # computable tensors are floats
    return raw.view(ref.kind.decoded).astype(np.float32)


def _difference(pair: AlignedTensor, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """``W(T) - W(0)`` over the spans, float32 (a remote object's ranges fetched first)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for lo, hi in spans:
        for url, got in piece_ranges(pair, lo, hi).items():
            ranges.setdefault(url, []).extend(got)
    with InputFiles(dict(pair.files), ranges) as files:
        first = _read(pair.refs[0], spans, files)
        last = _read(pair.refs[1], spans, files)
        files.verify()  # not rewritten in place while it was read
    return np.subtract(last, first, out=last)


def _rows(pair: AlignedTensor, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of D, (r1 - r0, n) float32."""
    _, n = _sides(pair)
    return _difference(pair, [(r0 * n, r1 * n)]).reshape(r1 - r0, n)


def _columns(pair: AlignedTensor, c0: int, c1: int) -> np.ndarray:
    """Columns ``[c0, c1)`` of D, (m, c1 - c0) float32: one range per row."""
    m, n = _sides(pair)
    return _difference(pair, [(r * n + c0, r * n + c1) for r in range(m)]).reshape(m, c1 - c0)


# --- Dask --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _scheduler(scheduler: str, workers: int | None) -> Iterator[Callable]:
    """``get(dsk, keys)`` on compute's scheduler: Dask's threads for every local one, else a client of
    the dask.distributed scheduler at that address."""
    if scheduler == "sync":
        import dask

        yield dask.get
    elif scheduler in ("threads", "processes") or scheduler.startswith("local:"):
        import dask.threaded

        yield functools.partial(dask.threaded.get, num_workers=workers) if workers else dask.threaded.get
    else:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise WdiffError(None, f"cannot reach the dask scheduler at {scheduler}: {e}") from None
        with client:
            yield client.get


def _map(get: Callable, fn: Callable, args: Sequence[tuple]) -> list:
    """``[fn(*a) for a in args]`` as Dask tasks."""
    dsk = {("spectrum", i): (fn, *a) for i, a in enumerate(args)}
    return get(dsk, list(dsk))


def _groups(count: int, parts: int) -> list[tuple[int, int]]:
    """``[0, count)`` cut into ``parts`` contiguous ranges (fewer when ``count`` is smaller)."""
    parts = max(1, min(parts, count))
    edges = [count * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _blocks(lo: int, hi: int, size: int) -> Iterator[tuple[int, int]]:
    return ((a, min(a + size, hi)) for a in range(lo, hi, size))


# --- exact: small matrices, whole; tall or wide ones by TSQR --------------------------------------------


def _whole(tensor: AlignedTensor) -> UpdateSpectrum:
    pair = _ends(tensor)
    m, n = _sides(pair)
    k = min(K_MAX, m, n)
    d = _rows(pair, 0, m).astype(np.float64)
    energy = float(np.einsum("ij,ij->", d, d))
    if not math.isfinite(energy):
        return _nonfinite("exact", k)
    values = np.linalg.svd(d, compute_uv=False) if energy > 0 else np.zeros(0)
    return spectrum_entry(values, energy, k, complete=True, method="exact")


def _small(tensors: Sequence[AlignedTensor]) -> dict[str, UpdateSpectrum]:
    """One task's share of the small matrices and LoRA products, one after the other."""
    return {t.name: (_lora(t) if t.source == "product" else _whole(t)) for t in tensors}


def _tsqr_part(pair: AlignedTensor, lo: int, hi: int, tall: bool) -> tuple[np.ndarray, float]:
    """The R factor of blocks ``[lo, hi)`` of D along its long side (rows of a tall D, columns of a
    wide one) and their squared norm."""
    m, n = _sides(pair)
    side = n if tall else m
    r = np.zeros((0, side))
    energy = 0.0
    for a, b in _blocks(lo, hi, max(1, BLOCK_ELEMENTS // side)):
        x = (_rows(pair, a, b) if tall else _columns(pair, a, b).T).astype(np.float64)
        energy += float(np.einsum("ij,ij->", x, x))
        if not math.isfinite(energy):
            return np.zeros((0, side)), math.inf
        r = np.linalg.qr(np.vstack([r, x]), mode="r")
    return r, energy


def _tsqr(tensor: AlignedTensor, get: Callable, parts: int) -> UpdateSpectrum:
    pair = _ends(tensor)
    m, n = _sides(pair)
    k = min(K_MAX, m, n)
    tall = m >= n
    results = _map(get, _tsqr_part, [(pair, a, b, tall) for a, b in _groups(m if tall else n, parts)])
    energy = sum(e for _, e in results)
    if not math.isfinite(energy):
        return _nonfinite("exact", k)
    r = np.linalg.qr(np.vstack([r for r, _ in results]), mode="r")
    values = np.linalg.svd(r, compute_uv=False) if energy > 0 else np.zeros(0)
    return spectrum_entry(values, energy, k, complete=True, method="exact")


# --- randomized: Halko, Martinsson & Tropp 2011 ------------------------------------------------------


def _sketch(pair: AlignedTensor, r0: int, r1: int, right: np.ndarray) -> tuple[np.ndarray, float]:
    """Rows ``[r0, r1)`` of ``D @ right`` (float64) and the squared norm of those rows of D."""
    _, n = _sides(pair)
    out = np.empty((r1 - r0, right.shape[1]))
    energy = 0.0
    for a, b in _blocks(r0, r1, max(1, BLOCK_ELEMENTS // n)):
        d = _rows(pair, a, b)
        energy += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        out[a - r0 : b - r0] = d @ right
    return out, energy


def _project(pair: AlignedTensor, r0: int, r1: int, left: np.ndarray) -> np.ndarray:
    """``D[r0:r1].T @ left[r0:r1]`` (n x l, float64): a part of ``D^T Q``."""
    _, n = _sides(pair)
    out = np.zeros((n, left.shape[1]))
    for a, b in _blocks(r0, r1, max(1, BLOCK_ELEMENTS // n)):
        out += _rows(pair, a, b).T @ left[a:b]
    return out


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of ``y`` (float64 QR), as float32 for the products."""
    return np.linalg.qr(y)[0].astype(np.float32)


def _randomized(tensor: AlignedTensor, get: Callable, workers: int) -> UpdateSpectrum:
    pair = _ends(tensor)
    m, n = _sides(pair)
    k = min(K_MAX, m, n)
    width = min(k + OVERSAMPLE, m, n)
    per_task = BLOCK_ELEMENTS * 16 + n * width * 8  # a block (raw, two decoded, D) and a part of D^T Q
    groups = _groups(m, min(workers, max(1, MEMORY // per_task)))
    omega = np.random.default_rng(SEED).standard_normal((n, width), dtype=np.float32)
    parts = _map(get, _sketch, [(pair, a, b, omega) for a, b in groups])
    energy = sum(e for _, e in parts)
    if not math.isfinite(energy):
        return _nonfinite("randomized", k)
    if energy == 0:
        return spectrum_entry(np.zeros(0), 0.0, k, complete=True, method="randomized")
    q = _orthonormal(np.vstack([y for y, _ in parts]))  # m x l
    for _ in range(POWER_ITERATIONS):  # subspace iteration, re-orthonormalized each half step (alg. 4.4)
        z = _orthonormal(sum(_map(get, _project, [(pair, a, b, q) for a, b in groups])))  # n x l
        q = _orthonormal(np.vstack([y for y, _ in _map(get, _sketch, [(pair, a, b, z) for a, b in groups])]))
    bt = sum(_map(get, _project, [(pair, a, b, q) for a, b in groups]))  # (Q^T D)^T, n x l
    values = np.linalg.svd(bt, compute_uv=False)
    return spectrum_entry(values, energy, k, complete=width == min(m, n), method="randomized")


# --- LoRA: exact from the factors ----------------------------------------------------------------------


def _factors(ref: TensorRef, files: InputFiles) -> tuple[np.ndarray, np.ndarray]:
    """``(B, scale * A)`` of one checkpoint as (out, r) and (r, in) float64 matrices."""
    a, b = ref.a, ref.b  # type: ignore[attr-defined]
    a_values = _read(a, [(0, a.numel)], files).astype(np.float64).reshape(a.shape[0], -1)
    b_values = _read(b, [(0, b.numel)], files).astype(np.float64).reshape(b.shape[0], b.shape[1])
    return b_values, a_values * ref.scale  # type: ignore[attr-defined]


def _product_values(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Singular values of ``left @ right`` from the QR factors of each: those of ``R_l R_r^T``."""
    return np.linalg.svd(np.linalg.qr(left, mode="r") @ np.linalg.qr(right.T, mode="r").T, compute_uv=False)


def _lora(tensor: AlignedTensor) -> UpdateSpectrum:
    pair = _ends(tensor)
    m, n = _sides(pair)
    k = min(K_MAX, m, n)
    with InputFiles(dict(pair.files), factor_ranges(pair, 0, 0)) as files:
        b0, a0 = _factors(pair.refs[0], files)
        bt, at = _factors(pair.refs[1], files)
        files.verify()
    values = _product_values(np.hstack([bt, -b0]), np.vstack([at, a0]))  # transposing changes none
    energy = float((values**2).sum())
    if not math.isfinite(energy):
        return _nonfinite("lora", k)
    entry = spectrum_entry(values, energy, k, complete=True, method="lora")
    last = _product_values(bt, at)  # W(T) = scale B(T) A(T): the rank the adapter uses
    tol = (last.max() if last.size else 0.0) * max(m, n) * np.finfo(np.float32).eps
    held = spectrum_entry(last, float((last**2).sum()), len(last), complete=True, method="lora")
    entry["lora"] = {
        "r": int(at.shape[0]),
        "rank_used": int((last > tol).sum()) if tol > 0 else 0,
        "rank_for_energy": held["rank_for_energy"],  # of B(T) A(T): what the adapter's weight holds
    }
    return entry


# --- every tensor ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    small: list[AlignedTensor]  # whole or LoRA: bundled, many per task
    tsqr: list[AlignedTensor]
    randomized: list[AlignedTensor]


def _plan(tensors: Sequence[AlignedTensor], exact_side: int) -> _Plan:
    plan = _Plan([], [], [])
    for t in tensors:
        if not is_matrix(t):
            continue
        m, n = _sides(t)
        if t.source == "product" or (min(m, n) <= exact_side and t.numel <= BLOCK_ELEMENTS):
            plan.small.append(t)
        elif min(m, n) <= exact_side:
            plan.tsqr.append(t)
        else:
            plan.randomized.append(t)
    return plan


def update_spectra(
    tensors: Sequence[AlignedTensor],
    scheduler: str = "threads",
    workers: int | None = None,
    *,
    exact_side: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """``{name: update_spectrum entry}`` of every 2-D (or more) tensor of ``tensors`` (``is_matrix``),
    from ``refs[0]`` and ``refs[-1]``. ``exact_side``: the largest ``min(m, n)`` given every singular
    value (default ``EXACT_SIDE``; 0: the randomized path for all but LoRA products). ``progress(n)``:
    n more tensors done."""
    from threadpoolctl import threadpool_limits

    plan = _plan(tensors, EXACT_SIDE if exact_side is None else exact_side)
    parallel = workers or os.cpu_count() or 1
    found: dict[str, dict] = {}
    # One BLAS thread per task: the Dask threads are the parallelism. With OpenBLAS's own threads on
    # top, its spinning workers and the tasks fight for the cores: the spectrum of one 3905 x 4096
    # update took 5.6-6.1 s on 2 cores, against 0.71-0.72 s with one BLAS thread (docs/performance.md).
    with threadpool_limits(limits=1, user_api="blas"), _scheduler(scheduler, workers) as get:
        bundles: list[list[AlignedTensor]] = [[]]
        size = 0
        for t in plan.small:  # about BLOCK_ELEMENTS per task (a LoRA product counts its factors)
            elements = (
                sum(r.nbytes for r in (t.refs[0], t.refs[-1])) // 2 if t.source == "product" else t.numel
            )
            if bundles[-1] and size + elements > BLOCK_ELEMENTS:
                bundles.append([])
                size = 0
            bundles[-1].append(t)
            size += elements
        for part in _map(get, _small, [(b,) for b in bundles if b]):
            found.update(part)
            if progress is not None:
                progress(len(part))
        for t in plan.tsqr:
            found[t.name] = _tsqr(t, get, parallel)
            if progress is not None:
                progress(1)
        for t in plan.randomized:
            found[t.name] = _randomized(t, get, parallel)
            if progress is not None:
                progress(1)
    return {t.name: found[t.name] for t in tensors if t.name in found}
