"""The Dask graph: one task per chunk of a tensor, streaming that chunk of every checkpoint.

A task reads the same element range of the tensor from checkpoint 0, 1, ..., T-1 by offset, runs the
Numba kernels, writes its slice of the accumulated map straight into the output file and returns only
a few sums. Memory is therefore (threads x chunk size), whatever the size of the model. Per-tensor
combine tasks add the sums up into the metrics of ``summary.json``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from wdiff import kernels
from wdiff.errors import WdiffError
from wdiff.results import OutputLayout
from wdiff.scan import AlignedTensor, Run

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # elements per Dask task; memory per task is a few sub-blocks


@dataclass(frozen=True)
class ChunkStats:
    """Partial sums of one chunk, all float64 (counts int64); added up per tensor."""

    interval_sumsq: np.ndarray  # (T-1,) sum of (W(t+1) - W(t))^2
    sumsq: np.ndarray  # (T,) sum of W(t)^2
    dot_first: np.ndarray  # (T,) sum of W(t) * W(0)
    nonfinite: np.ndarray  # (T,) count of NaN/Inf values in W(t)
    net_sumsq: float  # sum of (W(T-1) - W(0))^2
    acc_sum: float  # sum of the accumulated map
    acc_max: float
    nbytes: int  # checkpoint bytes read


def process_chunk(tensor: AlignedTensor, start: int, stop: int, out_path: str, out_offset: int) -> ChunkStats:
    """Stream elements [start, stop) of ``tensor`` through every checkpoint; write the accumulated slice.

    Opens the files, hands everything to the Numba driver (which reads, decodes, accumulates and
    writes without the GIL) and returns the partial sums.
    """
    refs = tensor.refs
    count = len(refs)
    luts, lut_index = kernels.decode_tables([r.dtype for r in refs])
    codes = np.array([kernels.decoder_code(r.dtype) for r in refs], np.int8)
    itemsizes = np.array([r.kind.bits // 8 for r in refs], np.int64)
    offsets = np.array([r.offset for r in refs], np.int64)
    interval_sumsq = np.zeros(count - 1)
    sumsq = np.zeros(count)
    dot_first = np.zeros(count)
    nonfinite = np.zeros(count, np.int64)
    totals = np.zeros(3)
    block = kernels.BLOCK
    raw = np.empty(block * 8, np.uint8)
    scratch = np.empty((4, block), np.float32)
    opened: dict[str, int] = {}
    try:
        for path in [r.path for r in refs] + [out_path]:
            if path not in opened:
                flags = os.O_WRONLY if path == out_path else os.O_RDONLY
                opened[path] = os.open(path, flags)
        fds = np.array([opened[r.path] for r in refs], np.int32)
        status = kernels.stream_chunk(
            fds, offsets, itemsizes, codes, lut_index, luts, start, stop, opened[out_path], out_offset,
            raw, scratch, interval_sumsq, sumsq, dot_first, nonfinite, totals,
        )  # fmt: skip
    except OSError as e:
        raise WdiffError(e.filename, f"cannot open: {e.strerror}") from None
    finally:
        for fd in opened.values():
            os.close(fd)
    if status < 0:
        t = -status - 1
        if t == count:
            raise WdiffError(out_path, "writing the results failed (disk full?)")
        raise WdiffError(refs[t].path, f"reading tensor {tensor.name!r} failed: the file shrank or is unreadable")
    dot_first[0] = sumsq[0]
    nbytes = int((stop - start) * itemsizes.sum())
    net_sumsq, acc_sum, acc_max = totals
    return ChunkStats(interval_sumsq, sumsq, dot_first, nonfinite, float(net_sumsq), float(acc_sum), float(acc_max), nbytes)


def combine(tensor: AlignedTensor, *chunks: ChunkStats) -> dict:
    """Metrics of one tensor from the partial sums of its chunks (the ``summary.json`` entry)."""
    count = len(tensor.refs)
    interval = np.zeros(count - 1)
    sumsq = np.zeros(count)
    dot_first = np.zeros(count)
    nonfinite = np.zeros(count, np.int64)
    net_sumsq = acc_sum = 0.0
    acc_max = 0.0
    for c in chunks:
        interval += c.interval_sumsq
        sumsq += c.sumsq
        dot_first += c.dot_first
        nonfinite += c.nonfinite
        net_sumsq += c.net_sumsq
        acc_sum += c.acc_sum
        acc_max = max(acc_max, c.acc_max) if not math.isnan(c.acc_max) else math.nan
    norms = np.sqrt(sumsq)
    first_norm = float(norms[0])
    net = math.sqrt(net_sumsq)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = dot_first / (norms * first_norm)
    return {
        "shape": list(tensor.shape),
        "dtype": tensor.dtypes[0] if len(tensor.dtypes) == 1 else tensor.dtypes,
        "numel": tensor.numel,
        "accumulated_l1": acc_sum,
        "accumulated_max": acc_max,
        "net_l2": net,
        "relative_change": net / first_norm if first_norm > 0 else None,
        "interval_l2": np.sqrt(interval).tolist(),
        "l2": norms.tolist(),
        "rotation": [None if not np.isfinite(c) else float(1.0 - c) for c in cosine],
        "nonfinite": nonfinite.tolist(),
    }


def _chunks(tensor: AlignedTensor, chunk_elements: int) -> list[tuple[int, int]]:
    n = tensor.numel
    if n == 0:
        return [(0, 0)]
    return [(s, min(s + chunk_elements, n)) for s in range(0, n, chunk_elements)]


def build_graph(
    run: Run, out_path: str, layout: OutputLayout, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[dict, list]:
    """A plain Dask task graph: chunk tasks feeding one combine task per tensor."""
    dsk: dict = {}
    keys = []
    for j, tensor in enumerate(run.tensors):
        chunk_keys = []
        for start, stop in _chunks(tensor, chunk_elements):
            key = ("chunk", j, start)
            dsk[key] = (process_chunk, tensor, start, stop, out_path, layout.offsets[tensor.name])
            chunk_keys.append(key)
        dsk[("tensor", j)] = (combine, tensor, *chunk_keys)
        keys.append(("tensor", j))
    return dsk, keys


@dataclass(frozen=True)
class ComputeResult:
    tensors: dict[str, dict]
    read_bytes: int
    compute_seconds: float
    chunks: int


def compute(
    run: Run,
    out_path: str,
    layout: OutputLayout,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ComputeResult:
    """Run the graph; ``progress`` is called with the bytes of every finished chunk."""
    import dask
    from dask.callbacks import Callback

    if chunk_elements < 1:
        raise WdiffError(None, f"chunk size must be at least one element, got {chunk_elements}")
    dsk, keys = build_graph(run, out_path, layout, chunk_elements)
    read_bytes = 0

    def posttask(key, result, dsk, state, worker_id):
        nonlocal read_bytes
        if isinstance(result, ChunkStats):
            read_bytes += result.nbytes
            if progress is not None:
                progress(result.nbytes)

    getters = {"threads": dask.threaded.get, "sync": dask.get}
    if scheduler not in getters:
        raise WdiffError(None, f"unknown scheduler {scheduler!r}: use one of {', '.join(getters)}")
    kwargs = {"num_workers": workers} if scheduler == "threads" and workers else {}
    t0 = time.perf_counter()
    with Callback(posttask=posttask):
        values = getters[scheduler](dsk, keys, **kwargs)
    seconds = time.perf_counter() - t0
    tensors = {t.name: v for t, v in zip(run.tensors, values)}
    chunks = sum(1 for k in dsk if k[0] == "chunk")
    return ComputeResult(tensors, read_bytes, seconds, chunks)
