"""Load on a side thread what a run needs later, while the main thread imports and scans.

Loading the compute kernels from the Numba cache (about 0.3 s, mostly in LLVM, which releases the GIL)
and building the colour table (matplotlib's import, about 0.2 s) would otherwise stand in line before
the first checkpoint is read. Nothing heavy is imported at module level: the CLI starts the thread
before its own imports.
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
