"""Import PLY files into Blender (bpy, Blender as a Python module) and write what it read as JSON; run
by tests/test_ply_tools.py with the Python of ``.venv-3d``, one process per tool.

``blender_read.py OUT.json PLY [PLY ...]``. Each file goes through File > Import > Stanford PLY
(``bpy.ops.wm.ply_import``) into an empty scene. Per file: the object and its mesh's counts, every
attribute Blender created (name, domain, type) with the values of the float and colour ones (colours as
``color_srgb``: Blender keeps linear floats, the file's bytes are sRGB), and the triangles' corners.
"""

from __future__ import annotations

import json
import sys

import bpy
import numpy as np

_WIDTH = {"FLOAT": 1, "FLOAT_COLOR": 4, "BYTE_COLOR": 4, "FLOAT_VECTOR": 3}


def read(path: str) -> dict:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    status = bpy.ops.wm.ply_import(filepath=path)
    objects = list(bpy.context.scene.objects)
    ob = objects[0]
    me = ob.data
    corners = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", corners)
    starts = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_start", starts)
    sizes = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_total", sizes)
    out: dict = {
        "status": sorted(status),
        "objects": [o.name for o in objects],
        "type": ob.type,
        "vertices": len(me.vertices),
        "faces": len(me.polygons),
        "face_sizes": sorted(set(sizes.tolist())),
        "face_indices": corners.reshape(-1, 3).tolist() if len(sizes) and set(sizes) == {3} else [],
        "face_starts_in_order": bool(np.array_equal(starts, 3 * np.arange(len(starts)))),
        "color_attributes": [c.name for c in me.color_attributes],
        "attributes": {},
    }
    for a in me.attributes:
        if a.name.startswith("."):  # Blender's internal topology (.corner_vert, .edge_verts ...)
            continue
        info = {"domain": a.domain, "data_type": a.data_type, "length": len(a.data)}
        width = _WIDTH.get(a.data_type)
        if width is not None:
            field = {"FLOAT": "value", "FLOAT_VECTOR": "vector"}.get(a.data_type, "color_srgb")
            values = np.empty(len(a.data) * width, np.float32)
            a.data.foreach_get(field, values)
            info["values"] = values.reshape(-1, width).tolist() if width > 1 else values.tolist()
        out["attributes"][a.name] = info
    return out


def main() -> None:
    target, *paths = sys.argv[1:]
    result = {"blender": bpy.app.version_string, "files": {p: read(p) for p in paths}}
    with open(target, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
