"""The Dask graph: one task per chunk of a tensor, streaming that chunk of every checkpoint.

A task reads the same element range of the tensor from checkpoint 0, 1, ..., T-1, runs the Numba
kernels, writes its slice of the accumulated map straight into the output file and returns only a few
sums. Memory is therefore (threads x chunk size), whatever the size of the model. Which task reads a
tensor depends only on where its bytes come from (``TensorRef.source``, see ``TASKS``). Per-tensor
aggregate tasks add the sums up into the metrics of ``summary.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from wdiff import blocks, stream
from wdiff.checks import SCHEDULERS
from wdiff.chunk import ChunkStats, row_cols
from wdiff.detail import Grid
from wdiff.errors import WdiffError
from wdiff.readers.base import prefetched
from wdiff.results import MapSlot, OutputLayout
from wdiff.schema import TensorEntry, tensor_entry
from wdiff.sequence import AlignedTensor, Run

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "TASKS", "ComputeResult", "Grid", "Previous", "bytes_to_read", "compute"]

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # elements per Dask task; memory per task is a few sub-blocks
# The chunk task of each source kind (``TensorRef.source``): all take the same arguments and return
# the same ChunkStats, so the graph and the aggregation do not care where the bytes come from.
TASKS: dict[str, Callable[..., ChunkStats]] = {
    "bytes": stream.process_chunk,  # one byte range per checkpoint: the Numba streaming driver
    "pieces": blocks.process_pieces,  # several byte ranges (sharded DCP tensors, strided views)
    "product": blocks.process_product,  # computed: the effective change of a LoRA adapter
}
# What the chunk task of each source kind reads of objects in a remote store: (tensor, start, stop) ->
# {URL: [(offset, nbytes), ...]}. A bundle fetches the ranges of all its tensors at once.
REMOTE_RANGES: dict[str, Callable[..., dict[str, list[tuple[int, int]]]]] = {
    "bytes": stream.remote_ranges,
    "pieces": blocks.piece_ranges,
    "product": blocks.factor_ranges,
}


@dataclass(frozen=True)
class TensorResult:
    """What one tensor's aggregate task returns: its summary entry and its pooled cells."""

    entry: TensorEntry
    cells: np.ndarray | None
    nonfinite: int
    neuron_change: np.ndarray | None = None  # its accumulated map summed over each row (float64)
    frames: np.ndarray | None = None  # (new intervals, cell rows, cell cols)


@dataclass(frozen=True)
class Previous:
    """Results of an earlier run over the first ``known`` checkpoints, to extend incrementally."""

    accumulated: str  # the earlier accumulated.safetensors
    offsets: dict[str, int]  # where each tensor's data starts in it
    known: int  # checkpoints it covers (K >= 2)
    tensors: dict[str, TensorEntry]  # its summary entries
    dtypes: dict[str, str]  # how each tensor's map is stored in it (schema.MAP_DTYPES)

    def slot(self, name: str) -> MapSlot:
        return MapSlot(self.accumulated, self.offsets[name], self.dtypes[name])


def _place(total: np.ndarray, part: np.ndarray | None, start: int, axis: int, maximum: bool) -> None:
    """Fold a chunk's part into the tensor's array along ``axis`` from ``start`` (sum, or a max that
    keeps NaN)."""
    if part is None:
        return
    index = [slice(None)] * total.ndim
    index[axis] = slice(start, start + part.shape[axis])
    view = total[tuple(index)]
    (np.maximum if maximum else np.add)(view, part, out=view)


def aggregate(
    tensor: AlignedTensor,
    previous: TensorEntry | None,
    grid: Grid | None,
    frame_grid: Grid | None,
    *chunks: ChunkStats,
) -> TensorResult:
    """Metrics of one tensor from the partial sums of its chunks (the ``summary.json`` entry), and
    its pooled cells, per-neuron change and frames put together.

    ``previous``: the tensor's entry from the earlier results an incremental run extends; the chunks
    then cover [W(0), W(K-1), W(K), ...] and the per-checkpoint lists are appended to it (the frames
    returned are then those of the new intervals only).

    ``distance_last_l2[t]`` = ||W(t) - W(T-1)|| is kept only where this pass read W(t): the last
    checkpoint changes when a run is extended, so the earlier run's distances are to another one. An
    incremental run gives it for W(0) and W(K-1) .. W(T-1), None for W(1) .. W(K-2); where it is
    given, it has the bits of a full run's.
    """
    count = len(tensor.refs)
    interval_sum = np.zeros(count - 1)
    interval = np.zeros(count - 1)
    sumsq = np.zeros(count)
    dist_first = np.zeros(count)
    dist_last = np.zeros(count)
    nonfinite = np.zeros(count, np.int64)
    acc_sum = 0.0
    acc_max = 0.0
    for c in chunks:  # always in chunk order, whatever order they finished in: same bits every run
        interval_sum += c.interval_sum
        interval += c.interval_sumsq
        sumsq += c.sumsq
        dist_first += c.dist_first
        dist_last += c.dist_last
        nonfinite += c.nonfinite
        acc_sum += c.acc_sum
        acc_max = max(acc_max, c.acc_max) if not (math.isnan(c.acc_max) or math.isnan(acc_max)) else math.nan
    norms = np.sqrt(sumsq)
    first_norm = float(norms[0])
    distance = np.sqrt(dist_first)  # ||W(t) - W(0)||
    net = float(distance[-1])
    rotation = _rotation(norms, first_norm, dist_first)
    interval_l1 = interval_sum.tolist()
    interval_l2 = np.sqrt(interval).tolist()
    l2 = norms.tolist()
    distance_l2 = distance.tolist()
    distance_last_l2: list[float | None] = np.sqrt(dist_last).tolist()
    counts = nonfinite.tolist()
    if previous is not None:  # new values start at W(K) (index 2) and interval K-1 (index 1)
        interval_l1 = previous["interval_l1"] + interval_l1[1:]
        interval_l2 = previous["interval_l2"] + interval_l2[1:]
        l2 = previous["l2"] + l2[2:]
        rotation = previous["rotation"] + rotation[2:]
        distance_l2 = previous["distance_l2"] + distance_l2[2:]
        unread: list[float | None] = [None] * (len(previous["l2"]) - 2)  # W(1) .. W(K-2)
        distance_last_l2 = distance_last_l2[:1] + unread + distance_last_l2[1:]
        counts = previous["nonfinite"] + counts[2:]
    cells = frames = rows = None
    if tensor.numel:
        rows = np.zeros(tensor.numel // row_cols(tensor.shape))
        for c in chunks:
            _place(rows, c.rows, c.row0, 0, maximum=False)
    if grid is not None and tensor.numel:
        cells = grid.empty()
        for c in chunks:
            _place(cells, c.cells, c.cell_row0, 0, maximum=not grid.mean)
    intervals = count - 2 if previous is not None else count - 1
    if frame_grid is not None and tensor.numel and intervals > 0:
        frames = frame_grid.empty(intervals, frame_grid.shape[0])
        for c in chunks:
            _place(frames, c.frames, c.frame_row0, 1, maximum=not frame_grid.mean)
    entry = tensor_entry(
        shape=list(tensor.shape),
        dtypes=tensor.dtypes,
        numel=tensor.numel,
        accumulated_l1=acc_sum,
        accumulated_max=acc_max,
        net_l2=net,
        relative_change=net / first_norm if first_norm > 0 else None,
        interval_l1=interval_l1,
        interval_l2=interval_l2,
        l2=l2,
        rotation=rotation,
        distance_l2=distance_l2,
        distance_last_l2=distance_last_l2,
        nonfinite=counts,
    )
    return TensorResult(entry, cells, sum(c.acc_nonfinite for c in chunks), rows, frames)


def _rotation(norms: np.ndarray, first_norm: float, dist_first: np.ndarray) -> list[float | None]:
    """1 - cos(W(t), W(0)) for every checkpoint, from the norms and the squared distances to W(0):
    ``(|W(t) - W(0)|^2 - (|W(t)| - |W(0)|)^2) / (2 |W(t)| |W(0)|)``. The same value as one minus the
    cosine, without its cancellation: a layer that turned by 1e-7 is told apart from one that turned by
    2e-7 (``1 - dot / norms`` loses that in float32 sums). None where a norm is 0 or not finite."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dist_first - (norms - first_norm) ** 2) / (2.0 * norms * first_norm)
    return [float(min(max(x, 0.0), 2.0)) if np.isfinite(x) else None for x in r]


def _chunks(tensor: AlignedTensor, chunk_elements: int) -> list[tuple[int, int]]:
    n = tensor.numel
    if n == 0:
        return [(0, 0)]
    return [(s, min(s + chunk_elements, n)) for s in range(0, n, chunk_elements)]


BUNDLE_TENSORS = 256  # small tensors per bundle task (see build_graph)


@dataclass(frozen=True)
class BundleItem:
    """One whole small tensor of a bundle task: its chunk task's arguments and its earlier entry.
    (A dataclass, not a tuple: Dask would run a tuple that starts with a function as a task.)"""

    task: Callable[..., ChunkStats]
    args: tuple
    entry: dict | None
    grid: Grid | None  # the scene's and the film's grids (also among ``args``), for its aggregate
    frame_grid: Grid | None


@dataclass(frozen=True)
class Bundle:
    """What a bundle task returns: the combined results of its tensors, in order."""

    results: tuple[TensorResult, ...]
    nbytes: int  # checkpoint bytes read, as a chunk task's ChunkStats.nbytes


def run_bundle(items: tuple[BundleItem, ...]) -> Bundle:
    """Each tensor's one chunk task then its aggregate, exactly as their own tasks would run them (the
    same calls on the same arguments: the same bits), without two Dask tasks per tensor."""
    results, nbytes = [], 0
    wanted: dict[str, list[tuple[int, int]]] = {}  # a remote store's ranges: one fetch for the bundle
    for item in items:
        tensor, start, stop = item.args[:3]
        for url, spans in REMOTE_RANGES[tensor.source](tensor, start, stop).items():
            wanted.setdefault(url, []).extend(spans)
    with prefetched(wanted, {p: i for item in items for p, i in item.args[0].files}):
        for item in items:
            stats = item.task(*item.args)
            nbytes += stats.nbytes
            results.append(aggregate(item.args[0], item.entry, item.grid, item.frame_grid, stats))
    return Bundle(tuple(results), nbytes)


def build_graph(
    run: Run,
    out_path: str,
    layout: OutputLayout | None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    previous: Previous | None = None,
    grids: dict[str, Grid] | None = None,
    frame_grids: dict[str, Grid] | None = None,
) -> tuple[dict, list, list, int]:
    """A plain Dask task graph: chunk tasks feeding one aggregate task per tensor, and bundle tasks.

    A tensor of one chunk that follows another such tensor shares a bundle task with it (up to
    BUNDLE_TENSORS tensors and ``chunk_elements`` elements per bundle): a mixture-of-experts model has
    100,000 tensors of a few hundred elements, and two Dask tasks each cost more than their work.

    Returns (graph, work keys: the chunk and bundle tasks that read, result keys: one aggregate task
    per big tensor or one bundle per run of small ones, in tensor order; chunks). Tasks carry only
    paths, offsets and sizes: with a distributed scheduler the workers read the checkpoints and
    write the results themselves, so every path must be the same on every worker (a shared filesystem).
    ``layout`` None: the accumulated map is not stored (``--map-dtype none``).
    """
    dsk: dict = {}
    work_keys, result_keys = [], []

    def out_slot(name: str) -> MapSlot | None:
        return layout.slot(out_path, name) if layout is not None else None

    bundle: list[BundleItem] = []
    bundle_elements = 0
    chunks = 0

    def close_bundle() -> None:
        nonlocal bundle, bundle_elements
        if bundle:
            key = ("bundle", len(dsk))
            dsk[key] = (run_bundle, tuple(bundle))
            work_keys.append(key)
            result_keys.append(key)
        bundle, bundle_elements = [], 0

    for j, tensor in enumerate(run.tensors):
        task = TASKS[tensor.source]
        entry = None
        acc_in = None
        if previous is not None:
            refs = tensor.refs
            tensor = replace(tensor, refs=(refs[0], *refs[previous.known - 1 :]))
            entry = previous.tensors[tensor.name]
            acc_in = previous.slot(tensor.name)
        grid = (grids or {}).get(tensor.name)
        frame_grid = (frame_grids or {}).get(tensor.name)
        spans = _chunks(tensor, chunk_elements)
        chunks += len(spans)
        if len(spans) == 1 and BUNDLE_TENSORS > 1:  # one chunk: into a bundle
            if len(bundle) == BUNDLE_TENSORS or bundle_elements + tensor.numel > chunk_elements:
                close_bundle()
            args = (tensor, *spans[0], out_slot(tensor.name), acc_in, grid, frame_grid)
            bundle.append(BundleItem(task, args, entry, grid, frame_grid))
            bundle_elements += tensor.numel
            continue
        close_bundle()
        keys = []
        for start, stop in spans:
            key = ("chunk", j, start)
            dsk[key] = (
                task,
                tensor,
                start,
                stop,
                out_slot(tensor.name),
                acc_in,
                grid,
                frame_grid,
            )
            keys.append(key)
        dsk[("tensor", j)] = (aggregate, tensor, entry, grid, frame_grid, *keys)
        work_keys += keys
        result_keys.append(("tensor", j))
    close_bundle()
    return dsk, work_keys, result_keys, chunks


def bytes_to_read(run: Run, previous: Previous | None = None) -> int:
    """Checkpoint bytes the graph reads: every checkpoint, or W(0) and W(K-1).. when resuming."""
    if previous is None:
        return run.bytes_per_pass
    return sum(r.nbytes for t in run.tensors for r in (t.refs[0], *t.refs[previous.known - 1 :]))


@dataclass(frozen=True)
class ComputeResult:
    tensors: dict[str, TensorEntry]  # summary entries
    read_bytes: int
    compute_seconds: float
    chunks: int
    cells: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)  # pooled cells, non-finite
    neuron_change: dict[str, np.ndarray] = field(default_factory=dict)  # the map summed over each row
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # each new interval's pooled |dW|


def compute(
    run: Run,
    out_path: str,
    layout: OutputLayout | None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    previous: Previous | None = None,
    grids: dict[str, Grid] | None = None,
    frame_grids: dict[str, Grid] | None = None,
) -> ComputeResult:
    """Run the graph on ``scheduler``; ``progress`` is called with the bytes of every finished chunk.

    Schedulers: ``threads`` (default; the kernels release the GIL), ``processes``, ``sync`` (one
    thread, for debugging), ``local:N`` (a dask.distributed LocalCluster of N single-threaded worker
    processes) or the address of a running dask.distributed scheduler (``tcp://host:8786``). Every
    scheduler gives the same bits. ``grids``/``frame_grids``: pool the accumulated map / each
    interval's change into cells on the way (see :class:`Grid`).
    """
    if chunk_elements < 1:
        raise WdiffError(None, f"chunk size must be at least one element, got {chunk_elements}")
    dsk, work_keys, result_keys, chunks = build_graph(
        run, out_path, layout, chunk_elements, previous, grids, frame_grids
    )
    read_bytes = 0

    def done(result: ChunkStats | Bundle) -> None:
        nonlocal read_bytes
        read_bytes += result.nbytes
        if progress is not None:
            progress(result.nbytes)

    if scheduler in ("threads", "processes", "sync"):
        with _local_get(scheduler, workers) as get:  # imports dask, starts processes: not compute_seconds
            t0 = time.perf_counter()
            parts = _run_local(dsk, result_keys, get, done)
    else:  # includes starting the cluster or connecting to it
        t0 = time.perf_counter()
        parts = _run_distributed(dsk, work_keys, result_keys, scheduler, done)
    seconds = time.perf_counter() - t0
    values = [v for part in parts for v in (part.results if isinstance(part, Bundle) else (part,))]
    tensors = {t.name: v.entry for t, v in zip(run.tensors, values)}
    cells = {t.name: (v.cells, v.nonfinite) for t, v in zip(run.tensors, values) if v.cells is not None}
    change = {t.name: v.neuron_change for t, v in zip(run.tensors, values) if v.neuron_change is not None}
    frames = {t.name: v.frames for t, v in zip(run.tensors, values) if v.frames is not None}
    return ComputeResult(tensors, read_bytes, seconds, chunks, cells, change, frames)


@contextlib.contextmanager
def _local_get(scheduler: str, workers: int | None) -> Iterator[Callable]:
    """``get(dsk, keys)`` of one of Dask's local schedulers (only the one asked for is imported)."""
    import functools

    import dask

    if scheduler == "sync":
        yield dask.get
    elif scheduler == "threads":
        import dask.threaded

        yield functools.partial(dask.threaded.get, num_workers=workers) if workers else dask.threaded.get
    else:
        import dask.multiprocessing

        with _process_pool(workers or os.cpu_count() or 1) as pool:
            # without fusing: fused, a one-chunk tensor's chunk task disappears into its aggregate task,
            # whose result is all the callbacks see, so its bytes were never counted (read_bytes: 0)
            yield functools.partial(dask.multiprocessing.get, pool=pool, optimize_graph=False)


@contextlib.contextmanager
def _process_pool(workers: int) -> Iterator[Any]:
    """The worker processes of ``--scheduler processes``, owned here rather than by Dask, so that
    Ctrl-C is the parent's alone and ends the run at once.

    A terminal's Ctrl-C goes to the whole process group: workers still importing printed a
    KeyboardInterrupt traceback each, and Dask's own pool waited, on interrupt, for every task
    already submitted (all of them: every chunk is ready at the start). Here the workers are started
    with SIGINT blocked (the mask is inherited through fork and exec, and Python leaves it), pending
    tasks are cancelled on any failure (the pool is still shut down, so that its queues' semaphores
    are released: the CLI ends with ``os._exit``), and a worker whose parent is gone exits by itself.
    """
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from dask.multiprocessing import get_context  # "spawn" unless Dask's config says otherwise

    pool = ProcessPoolExecutor(
        workers, mp_context=get_context(), initializer=_worker_start, initargs=(os.getpid(),)
    )
    blocking = hasattr(signal, "pthread_sigmask")  # POSIX
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocking else None
    try:
        for _ in range(workers):  # start every worker now, while SIGINT is blocked (one per submit)
            pool.submit(int)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C meanwhile is delivered now
    try:
        yield pool
    except BaseException:  # Ctrl-C or a task's error: wait only for the tasks the workers are running
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()


def _worker_start(parent: int) -> None:
    """In each worker process: end it once its parent is gone (an interrupted run's parent exits
    without waiting for its workers)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="wdiff-parent-watch", daemon=True).start()


def _run_local(dsk, keys, get, done):
    from dask.callbacks import Callback

    def posttask(key, result, dsk, state, worker_id):
        if isinstance(result, (ChunkStats, Bundle)):
            done(result)

    with Callback(posttask=posttask):
        return get(dsk, keys)


def _run_distributed(dsk, work_keys, result_keys, scheduler, done):
    from contextlib import ExitStack

    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise WdiffError(
            None, "the dask.distributed package is needed for --scheduler " + scheduler
        ) from None

    with ExitStack() as stack:
        if scheduler.startswith("local:"):
            n = scheduler.removeprefix("local:")
            if not n.isdigit() or int(n) < 1:
                raise WdiffError(None, f"--scheduler {scheduler}: N in local:N must be a positive integer")
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=int(n), threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            )  # fmt: skip
            client = stack.enter_context(Client(cluster))
        elif "://" in scheduler or ":" in scheduler:
            try:
                client = stack.enter_context(Client(scheduler, timeout="10s"))
            except (OSError, TimeoutError) as e:
                raise WdiffError(None, f"cannot reach the dask scheduler at {scheduler}: {e}") from None
        else:
            raise WdiffError(None, f"unknown scheduler {scheduler!r}: use {SCHEDULERS}")
        keys = list(dict.fromkeys(work_keys + result_keys))  # a bundle is both
        futures = dict(zip(keys, client.get(dsk, keys, sync=False)))
        for future in as_completed([futures[k] for k in work_keys]):
            if future.status == "error":
                future.result()  # raises the task's own error (a WdiffError names the file)
            done(future.result())
        return client.gather([futures[k] for k in result_keys])
