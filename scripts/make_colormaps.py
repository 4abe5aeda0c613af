#!/usr/bin/env python3
"""Regenerate ``wdiff/scene/colormaps.npz`` from matplotlib (dev-only; run after a matplotlib upgrade).

    .venv/bin/python scripts/make_colormaps.py

The file holds the 256-entry uint8 RGB table of each colormap in ``SHIPPED``, exactly as
``matplotlib.colormaps[name].resampled(256)(np.arange(256), bytes=True)[:, :3]`` gives it, so that
``wdiff.scene.color.lookup_table`` colours points without importing matplotlib (about 0.3 s of
pure-Python import, the largest fixed cost of a ``--no-render`` run). tests/test_colormaps.py checks
every table against matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np

from wdiff.scene.color import _LUT_SIZE, SHIPPED

TARGET = Path(__file__).resolve().parent.parent / "wdiff" / "scene" / "colormaps.npz"


def main() -> None:
    tables = {
        name: matplotlib.colormaps[name].resampled(_LUT_SIZE)(np.arange(_LUT_SIZE), bytes=True)[:, :3]
        for name in SHIPPED
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **tables)
    TARGET.write_bytes(buf.getvalue())
    print(f"{TARGET}: {', '.join(tables)} ({len(buf.getvalue())} bytes, matplotlib {matplotlib.__version__})")


if __name__ == "__main__":
    main()
