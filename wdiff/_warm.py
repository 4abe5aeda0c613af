"""Load on side threads what a run needs later, while the main thread imports and scans.

Two threads, started before the CLI's own imports:

- the compute kernels from the Numba cache (about 0.4 s, mostly in LLVM, which releases the GIL);
  compute waits for this one (``wait``); always started;
- matplotlib (about 0.8 s of pure-Python import: the report's figures and the Agg backend), only for
  a run that draws pictures (``start(plotting=True)``): a ``--no-render`` run never imports it, and
  a thread importing it would hold the GIL the main thread needs to import and scan. Nobody waits for
  it: the pictures and the report import it again and find it loaded (or wait on the import lock).
  Started at the beginning it overlaps with the kernel loading (the other core) instead of running
  during compute, where an import holding the GIL stalls the Dask threads between their Numba calls
  (measured: compute 0.45 s -> 0.9 s on 6 x 128 MB BF16).

A run that draws pictures also starts the picture worker (``wdiff.worker``): a child process that
imports Open3D meanwhile, on the other core, and later renders there.

The CLI also tunes its own process for a run (``tune_process``, not done for notebook users): the
garbage collector pauses through the start-up imports, and freed memory stays in the process.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import gc
import threading

_kernels: threading.Thread | None = None
_plotting: threading.Thread | None = None
_lock = threading.Lock()


def _load_kernels() -> None:
    try:
        from wdiff import kernels

        kernels.warm_up()
    except Exception:  # noqa: BLE001 - the real call reports any failure, with context
        pass


def _load_plotting() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the real use reports any failure, with context
        pass


def start(plotting: bool = False) -> None:
    """Start loading the kernels, and when ``plotting`` matplotlib and the picture worker (each
    once per process; the worker loads Open3D, ``wdiff.worker.warm``).

    numpy is imported first, on the calling thread: the side threads and the main thread all import
    it, and two threads importing the same packages in different orders can meet in Python's import
    deadlock avoidance, which hands one of them a half-initialised module (seen once in a full test
    run under load: ``ImportError: numpy._core.umath failed to import`` in the main thread)."""
    global _kernels, _plotting
    import numpy  # noqa: F401

    with _lock:
        if _kernels is None:
            _kernels = threading.Thread(target=_load_kernels, name="wdiff-warm-kernels", daemon=True)
            _kernels.start()
        if plotting and _plotting is None:
            _plotting = threading.Thread(target=_load_plotting, name="wdiff-warm-plotting", daemon=True)
            _plotting.start()
    if plotting:
        from wdiff import worker

        try:
            worker.warm()
        except OSError:  # no child process here: the pictures say so, with context, when drawn
            pass


def import_scheduler(scheduler: str) -> None:
    """Import the Dask scheduler compute will use (``dask/__init__`` alone is about 0.25 s of Python),
    on the calling thread while the kernels are still loading: that loading is mostly LLVM, which
    releases the GIL, so the import fits in its shadow instead of running after it. The cluster
    schedulers (dask.distributed) are left to compute: they are seconds to start anyway."""
    if scheduler in ("threads", "processes", "sync"):
        import dask.callbacks  # noqa: F401

        if scheduler == "threads":
            import dask.threaded  # noqa: F401
        elif scheduler == "processes":
            import dask.multiprocessing  # noqa: F401


_gc_paused = False


def tune_process() -> None:
    """Tune the CLI's process for a run (called first thing by ``wdiff run``/``watch``).

    - Python's cyclic garbage collector pauses until ``wait``: the start-up imports (numpy, numba,
      dask, typer) allocate hundreds of thousands of objects, none of them garbage, and the
      collections they trigger cost about 0.15 s of a 1 s start here. ``wait`` freezes what was
      loaded (later collections skip it) and turns the collector back on.
    - glibc's malloc serves blocks below 32 MiB from its heap and keeps freed memory in the process
      (``mallopt``), instead of mapping every large numpy temporary afresh and unmapping it after
      use: each fresh page is a page fault, and on this project's virtual machines a fresh page
      first costs the host a fault too (100 MB touched at 0.4 GB/s the first time, 7 GB/s after).
      Measured: writing ``points.ply`` and ``scene.html`` for 1 M points, 0.31 s -> 0.18 s. Peak
      memory is what it was; freed memory is simply not handed back before the process ends, except
      where the picture worker grows beside it (``wdiff._heap``).
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")  # glibc only: elsewhere the defaults stay
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's largest allowed value
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):
        pass


def wait() -> None:
    """Wait until the kernels are loaded (starting the loading if nobody did); resume the garbage
    collector if ``tune_process`` paused it."""
    global _gc_paused
    start()
    assert _kernels is not None
    _kernels.join()
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()
