"""Binary PLY point cloud and triangle mesh, written from numpy structured arrays.

Not Open3D's writer: it keeps only xyz and colours and drops the scalar field. Colours are ``uchar``
(float colours read as black in VTK). Both files carry the value twice, as the tools that read PLY
each keep a different property (docs/user-guide.md, section 5): ``quality`` is the one per-vertex value
MeshLab keeps (its "vertex quality", ``vertex_scalar_array()`` in pymeshlab), ``scalar_accumulated`` is
what CloudCompare turns into a scalar field by itself (any vertex property whose name contains
``scal``); Blender 4.1+ imports both as float attributes. ``quality`` follows ``x y z``: CloudCompare
takes the first property whose name ends in ``y`` for the y coordinate. The header is fixed text, so
the same points always give the same bytes.
"""

from __future__ import annotations

import os

import numpy as np

from wdiff._files import atomic_write

#: One vertex record, packed (23 bytes), little-endian, in header order.
VERTEX_DTYPE = np.dtype(
    [
        ("x", "<f4"),
        ("y", "<f4"),
        ("z", "<f4"),
        ("red", "u1"),
        ("green", "u1"),
        ("blue", "u1"),
        ("quality", "<f4"),
        ("scalar_accumulated", "<f4"),
    ]
)

COMMENT = "wdiff accumulated weight change sum_t |W(t+1)-W(t)|, one point per pooled cell"

_PLY_TYPES = {"<f4": "float", "u1": "uchar"}


#: One mesh vertex: the same record as a point, so both files list the same properties.
MESH_VERTEX_DTYPE = VERTEX_DTYPE
#: One triangle: ``property list uchar int vertex_indices`` with its count byte (always 3), packed.
FACE_DTYPE = np.dtype([("count", "u1"), ("v0", "<i4"), ("v1", "<i4"), ("v2", "<i4")])

MESH_COMMENT = "wdiff accumulated weight change sum_t |W(t+1)-W(t)|, each tensor a height field"


def ply_header(
    count: int,
    dtype: np.dtype = VERTEX_DTYPE,
    faces: int | None = None,
    comment: str = COMMENT,
) -> bytes:
    """The header for ``count`` vertices of ``dtype`` (and ``faces`` triangles), ASCII, ending with
    ``end_header\n``."""
    lines = [
        "ply",
        "format binary_little_endian 1.0",
        f"comment {comment}",
        f"element vertex {count}",
    ]
    for name in dtype.names or ():
        lines.append(f"property {_PLY_TYPES[dtype[name].str.lstrip('|')]} {name}")
    if faces is not None:
        lines += [f"element face {faces}", "property list uchar int vertex_indices"]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def vertex_records(xyz: np.ndarray, rgb: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Pack positions (N, 3), uint8 colours (N, 3) and values (N,) into ``VERTEX_DTYPE`` records (the
    value goes to ``scalar_accumulated`` and, made MeshLab-safe, to ``quality``)."""
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
    records["quality"] = meshlab_quality(value)
    return records


def meshlab_quality(value: np.ndarray) -> np.ndarray:
    """``value`` as MeshLab's vertex quality: NaN and Inf pinned to the largest finite value (0 when
    there is none), where the flag colour already marks them. MeshLab has no missing value: a NaN
    quality crashes Filters > Colorize by vertex Quality (pymeshlab 2025.7 aborts with "double free
    or corruption"), an Inf stretches its default range so every other vertex takes the bottom colour
    (tests/test_ply_tools.py). ``scalar_accumulated`` keeps the NaN/Inf: CloudCompare reads NaN as
    an invalid value."""
    value = np.asarray(value, dtype=np.float32)
    finite = np.isfinite(value)
    if finite.all():
        return value
    top = value[finite].max() if finite.any() else np.float32(0)
    return np.where(finite, value, top)


def write_ply(path: str | os.PathLike[str], records: np.ndarray) -> None:
    """Write ``records`` (``VERTEX_DTYPE``) as a binary little-endian PLY, atomically."""
    if records.dtype != VERTEX_DTYPE:
        raise ValueError(f"records must have dtype {VERTEX_DTYPE}, got {records.dtype}")
    with atomic_write(path) as f:
        f.write(ply_header(len(records)))
        f.write(np.ascontiguousarray(records).view(np.uint8))


def write_mesh_ply(path: str | os.PathLike[str], vertices: np.ndarray, triangles: np.ndarray) -> None:
    """Write a triangle mesh: ``MESH_VERTEX_DTYPE`` records and (M, 3) vertex indices, atomically.

    Refuses indices outside ``[0, len(vertices))``: a reader would crash or draw garbage.
    """
    if vertices.dtype != MESH_VERTEX_DTYPE:
        raise ValueError(f"vertices must have dtype {MESH_VERTEX_DTYPE}, got {vertices.dtype}")
    triangles = np.asarray(triangles)
    if triangles.ndim != 2 or triangles.shape[1] != 3:
        raise ValueError(f"triangles must be (M, 3), got {triangles.shape}")
    if triangles.size and (triangles.min() < 0 or triangles.max() >= len(vertices)):
        raise ValueError("triangle vertex index out of range")
    faces = np.empty(len(triangles), dtype=FACE_DTYPE)
    faces["count"] = 3
    for k in range(3):
        faces[f"v{k}"] = triangles[:, k]
    with atomic_write(path) as f:
        f.write(ply_header(len(vertices), MESH_VERTEX_DTYPE, len(faces), MESH_COMMENT))
        f.write(np.ascontiguousarray(vertices).view(np.uint8))
        f.write(faces.view(np.uint8))
