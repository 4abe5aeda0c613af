"""Binary PLY point cloud, written from a numpy structured array.

Not Open3D's writer: it keeps only xyz and colours and drops the scalar field (FORMATS.md). Colours
are ``uchar`` (float colours read as black in VTK); the value is ``scalar_accumulated`` because
CloudCompare turns ``scalar_*`` properties into scalar fields by itself. The header is fixed text,
so the same points always give the same bytes.
"""

from __future__ import annotations

import os

import numpy as np

from wdiff.scene._files import atomic_write

#: One vertex record, packed (19 bytes), little-endian, in header order.
VERTEX_DTYPE = np.dtype(
    [
        ("x", "<f4"),
        ("y", "<f4"),
        ("z", "<f4"),
        ("red", "u1"),
        ("green", "u1"),
        ("blue", "u1"),
        ("scalar_accumulated", "<f4"),
    ]
)

COMMENT = "wdiff accumulated weight change sum_t |W(t+1)-W(t)|, one point per pooled cell"

_PLY_TYPES = {"<f4": "float", "u1": "uchar"}


def ply_header(count: int) -> bytes:
    """The header for ``count`` vertices (ASCII, ends with ``end_header\\n``)."""
    lines = [
        "ply",
        "format binary_little_endian 1.0",
        f"comment {COMMENT}",
        f"element vertex {count}",
    ]
    for name in VERTEX_DTYPE.names or ():
        lines.append(f"property {_PLY_TYPES[VERTEX_DTYPE[name].str.lstrip('|')]} {name}")
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def vertex_records(xyz: np.ndarray, rgb: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Pack positions (N, 3), uint8 colours (N, 3) and values (N,) into ``VERTEX_DTYPE`` records."""
    n = len(value)
    if xyz.shape != (n, 3) or rgb.shape != (n, 3):
        raise ValueError(f"xyz {xyz.shape} and rgb {rgb.shape} must both be ({n}, 3)")
    if rgb.dtype != np.uint8:
        raise ValueError(f"colours must be uint8, got {rgb.dtype}")
    records = np.empty(n, dtype=VERTEX_DTYPE)
    for k, axis in enumerate(("x", "y", "z")):
        records[axis] = xyz[:, k]
    for k, channel in enumerate(("red", "green", "blue")):
        records[channel] = rgb[:, k]
    records["scalar_accumulated"] = value
    return records


def write_ply(path: str | os.PathLike[str], records: np.ndarray) -> None:
    """Write ``records`` (``VERTEX_DTYPE``) as a binary little-endian PLY, atomically."""
    if records.dtype != VERTEX_DTYPE:
        raise ValueError(f"records must have dtype {VERTEX_DTYPE}, got {records.dtype}")
    with atomic_write(path) as f:
        f.write(ply_header(len(records)))
        f.write(np.ascontiguousarray(records).view(np.uint8))
