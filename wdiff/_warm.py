"""Load on a side thread what a run needs later, while the main thread imports and scans.

Loading the compute kernels from the Numba cache (about 0.3 s, mostly in LLVM, which releases the GIL)
and building the colour table (matplotlib's import, about 0.2 s) would otherwise stand in line before
the first checkpoint is read. Nothing heavy is imported at module level: the CLI starts the thread
before its own imports.

``start_report`` imports what the report's charts need (matplotlib's figure and Agg backend, about
0.7 s) while compute runs: the compute threads run Numba code without the GIL, so the import mostly
overlaps with them instead of adding its time after the results are written.
"""

from __future__ import annotations

import threading

_thread: threading.Thread | None = None
_lock = threading.Lock()


def _load() -> None:
    try:
        from wdiff import kernels
        from wdiff.scene.color import lookup_table

        kernels.warm_up()
        lookup_table()
    except Exception:  # noqa: BLE001 - the real call reports any failure, with context
        pass


def _load_report() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the report's own import reports any failure
        pass


_report_thread: threading.Thread | None = None


def start_report() -> None:
    """Start importing the report's charting modules (once per process)."""
    global _report_thread
    with _lock:
        if _report_thread is None:
            _report_thread = threading.Thread(target=_load_report, name="wdiff-warm-report", daemon=True)
            _report_thread.start()


def start() -> None:
    """Start loading (once per process)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_load, name="wdiff-warm-up", daemon=True)
            _thread.start()


def wait() -> None:
    """Wait until loading has finished (starting it if nobody did)."""
    start()
    assert _thread is not None
    _thread.join()
