"""wdiff: see how a neural network changed during training.

Point it at a sequence of checkpoints; it computes the accumulated weight change of every weight,
``sum_t |W(t+1) - W(t)|``, out-of-core, and renders it in 3D.

The public API (``wdiff.run``, ``wdiff.scan``, ``wdiff.watch``, ``wdiff.Results``, ``wdiff.WdiffError``,
``wdiff.write_report``, ``wdiff.compare``, ``wdiff.Selection``) is imported on first use, so
``wdiff --help`` does not pay for numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Results", "Run", "WdiffError", "__version__", "compare", "run", "scan", "watch", "write_report",
    "Selection",
]  # fmt: skip

_LAZY = {
    "run": "wdiff.api",
    "Results": "wdiff.results",
    "Run": "wdiff.checkpoints",
    "scan": "wdiff.checkpoints",
    "WdiffError": "wdiff.errors",
    "write_report": "wdiff.report",
    "compare": "wdiff.report",
    "watch": "wdiff.watcher",
    "Selection": "wdiff.select",
}

if TYPE_CHECKING:
    from wdiff.api import run
    from wdiff.checkpoints import Run, scan
    from wdiff.errors import WdiffError
    from wdiff.report import compare, write_report
    from wdiff.results import Results
    from wdiff.select import Selection
    from wdiff.watcher import watch


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wdiff' has no attribute {name!r}")
