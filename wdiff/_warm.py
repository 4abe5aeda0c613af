"""Load on side threads what a run needs later, while the main thread imports and scans.

Two threads, started together before the CLI's own imports:

- the compute kernels from the Numba cache (about 0.4 s, mostly in LLVM, which releases the GIL);
  compute waits for this one (``wait``);
- matplotlib (about 0.8 s of pure-Python import: the colour table, the report's figures and the Agg
  backend). Nobody waits for it: the colour table and the report import it again and find it loaded
  (or wait on the import lock). Started at the beginning it overlaps with the kernel loading (the
  other core) instead of running during compute, where an import holding the GIL stalls the Dask
  threads between their Numba calls (measured: compute 0.45 s -> 0.9 s on 6 x 128 MB BF16).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import threading

_kernels: threading.Thread | None = None
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

        from wdiff.scene.color import lookup_table

        lookup_table()
    except Exception:  # noqa: BLE001 - the real use reports any failure, with context
        pass


def start() -> None:
    """Start loading (once per process)."""
    global _kernels
    with _lock:
        if _kernels is None:
            _kernels = threading.Thread(target=_load_kernels, name="wdiff-warm-kernels", daemon=True)
            _kernels.start()
            threading.Thread(target=_load_plotting, name="wdiff-warm-plotting", daemon=True).start()


def wait() -> None:
    """Wait until the kernels are loaded (starting the loading if nobody did)."""
    start()
    assert _kernels is not None
    _kernels.join()
