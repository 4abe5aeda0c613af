"""Results on disk: ``accumulated.safetensors`` laid out before compute writes into it, and
``summary.json``. Everything downstream (scene, report, notebooks) reads these files, never checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ACCUMULATED = "accumulated.safetensors"
SUMMARY = "summary.json"
POINTS = "points.ply"
POOLED = "pooled.safetensors"  # the scene's cells, pooled during compute (see wdiff.scene.cell_plan)
RENDER = "render.png"


@dataclass(frozen=True)
class OutputLayout:
    """Where each tensor's float32 values live in ``accumulated.safetensors``."""

    header: bytes
    offsets: dict[str, int]  # absolute byte offset of each tensor's data
    size: int  # total file size


def layout_accumulated(tensors: Iterable[tuple[str, Sequence[int]]]) -> OutputLayout:
    """Plan a safetensors file of float32 tensors in the given order (header padded to 8 bytes)."""
    entries: dict[str, Any] = {}
    relative: dict[str, int] = {}
    pos = 0
    for name, shape in tensors:
        nbytes = 4 * math.prod(shape)
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        relative[name] = pos
        pos += nbytes
    entries["__metadata__"] = {"format": "pt", "producer": "wdiff", "content": "accumulated |dW|"}
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the official writer pads with spaces to a multiple of 8
    header = len(text).to_bytes(8, "little") + text
    base = len(header)
    return OutputLayout(header, {k: base + v for k, v in relative.items()}, base + pos)


def create_accumulated(path: str | os.PathLike[str], layout: OutputLayout) -> None:
    """Write the header and size the file; compute tasks then fill the data with ``pwrite``."""
    with open(path, "wb") as f:
        f.write(layout.header)
        f.truncate(layout.size)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null so every JSON reader can load the summary."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    Path(path).write_text(json.dumps(_finite_or_none(data), indent=1, allow_nan=False) + "\n")


@dataclass(frozen=True)
class Results:
    """A finished ``wdiff`` output folder, for notebooks: the summary and the accumulated maps."""

    path: Path
    summary: dict[str, Any]

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> Results:
        path = Path(out)
        return cls(path, json.loads((path / SUMMARY).read_text()))

    @property
    def names(self) -> list[str]:
        """Computed tensors, network order."""
        return list(self.summary["tensors"])

    def accumulated(self, name: str) -> np.ndarray:
        """The accumulated change map of one tensor (float32, the tensor's shape)."""
        from safetensors import safe_open

        with safe_open(self.path / ACCUMULATED, framework="numpy") as f:
            return f.get_tensor(name)

    def table(self) -> list[dict[str, Any]]:
        """One row per tensor with the scalar metrics: easy to pass to ``pandas.DataFrame``."""
        rows = []
        for name, t in self.summary["tensors"].items():
            row = {"tensor": name}
            row.update({k: v for k, v in t.items() if not isinstance(v, (list, dict))})
            rows.append(row)
        return rows
