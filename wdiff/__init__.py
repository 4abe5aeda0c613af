"""wdiff: see how a neural network changed during training.

Point it at a sequence of checkpoints; it computes the accumulated weight change of every weight,
``sum_t |W(t+1) - W(t)|``, out-of-core, and renders it in 3D.
"""

from __future__ import annotations

__version__ = "0.1.0"

from wdiff.api import run  # noqa: E402
from wdiff.errors import WdiffError  # noqa: E402
from wdiff.results import Results  # noqa: E402
from wdiff.scan import Run, scan  # noqa: E402

__all__ = ["Results", "Run", "WdiffError", "__version__", "run", "scan"]
