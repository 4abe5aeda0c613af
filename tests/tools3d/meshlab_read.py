"""Open PLY files in MeshLab (pymeshlab) and write what it read as JSON; run by tests/test_ply_tools.py
with the Python of ``.venv-3d``, one process per tool (bpy and pymeshlab bundle clashing libraries).

``meshlab_read.py OUT.json PLY [PLY ...]``. Per file: counts, positions, colours, the vertex quality
(pymeshlab 2025 calls it the vertex *scalar*: ``vertex_scalar_array``), faces, MeshLab's own statistics
of the quality, and two filters run on it: "Select by Vertex Quality" above a threshold (the midpoint
between two values of the file, so ``>`` and ``>=`` agree) and "Colorize by vertex Quality" with its
default parameters.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import numpy as np
import pymeshlab


def read(path: str) -> dict:
    ms = pymeshlab.MeshSet()
    ms.load_new_mesh(path)
    m = ms.current_mesh()
    out: dict = {
        "vertices": m.vertex_number(),
        "faces": m.face_number(),
        "has_color": m.has_vertex_color(),
        "has_quality": m.has_vertex_scalar(),
        "xyz": m.vertex_matrix().tolist(),
        "rgba": m.vertex_color_matrix().tolist(),
        "face_indices": m.face_matrix().tolist(),
    }
    if not m.has_vertex_scalar():
        return out
    q = m.vertex_scalar_array()
    out["quality"] = q.tolist()
    out["statistics"] = {k: float(v) for k, v in ms.get_scalar_statistics_per_vertex().items()}
    values = np.unique(q[np.isfinite(q)])
    threshold = float((values[-len(values) // 10] + values[-len(values) // 10 - 1]) / 2)
    ms.compute_selection_by_scalar_per_vertex(minq=threshold, maxq=float(values[-1]))
    out["threshold"] = threshold
    out["selected"] = m.selected_vertex_number()
    out["selection"] = np.flatnonzero(m.vertex_selection_array()).tolist()
    ms.compute_color_from_scalar_per_vertex()  # as the menu offers it: the range is the quality's min..max
    out["quality_rgba"] = m.vertex_color_matrix().tolist()
    return out


def main() -> None:
    target, *paths = sys.argv[1:]
    result = {"pymeshlab": version("pymeshlab"), "files": {p: read(p) for p in paths}}
    with open(target, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
