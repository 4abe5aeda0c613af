"""Every tensor as a height-field surface: ``mesh.ply`` for MeshLab, CloudCompare and Blender.

One vertex per pooled cell, at the cell's place in the scene, lifted towards the viewer (+z) by its
position on the colour scale (0 at the bottom of the scale, ``relief`` at the top), so the hot parts
stand up as ridges; neighbouring cells are joined by two triangles. A tensor only one cell tall (a
bias) or wide gets a second row (column) of vertices at the cell's far edge, so it is a strip with
area, not a line. The cells of a folded tensor are joined within a panel only.

The vertex carries its colour (uchar), and its value twice: ``quality`` (MeshLab) and
``scalar_accumulated`` (CloudCompare), as a point of ``points.ply`` does. NaN/Inf cells stay at height
0 in the flag colour (``quality`` pins them to the largest finite value: ``ply.meshlab_quality``).
"""

from __future__ import annotations

import numpy as np

from wdiff.scene.color import ColorScale, normalize, point_colors
from wdiff.scene.layout import Scene, TensorPlacement, coarsen_scene
from wdiff.scene.ply import MESH_VERTEX_DTYPE, meshlab_quality

#: Height of the top of the colour scale, as a fraction of the distance between two slices.
RELIEF = 0.35


def vertex_count(scene: Scene) -> int:
    """Vertices the mesh of ``scene`` has (a one-cell-thin tensor gets a second row or column)."""
    return sum(max(p.grid[0], 2) * max(p.grid[1], 2) for p in scene.placements if p.count)


def fit(scene: Scene, max_vertices: int) -> Scene:
    """The scene pooled further until its mesh has at most ``max_vertices`` vertices."""
    nonempty = sum(1 for p in scene.placements if p.count)
    if 4 * nonempty > max_vertices:
        raise ValueError(
            f"max_points={max_vertices} is too small for a mesh of {nonempty} tensors (4 vertices each)"
        )
    budget = max(len(scene), nonempty)
    shown = scene
    while vertex_count(shown) > max_vertices:
        budget = max(nonempty, min(budget - 1, int(budget * 0.8)))
        shown = coarsen_scene(scene, budget)
    return shown


def relief(scene: Scene) -> float:
    """World height of the top of the colour scale: ``RELIEF`` of the smallest slice spacing."""
    z = sorted({b.z for b in scene.blocks})
    gaps = np.diff(z)
    if len(gaps):
        return RELIEF * float(gaps.min())
    left, right, top, bottom = scene.blocks[0].frame if scene.blocks else (0.0, 1.0, 0.0, -1.0)
    return 0.15 * max(right - left, top - bottom)


def _tensor_grid(p: TensorPlacement, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertex x, y (grid-shaped) and the cell each vertex takes its value from (flat index)."""
    gr, gc = p.grid
    x = xyz[:, 0].reshape(gr, gc).astype(np.float64)
    y = xyz[:, 1].reshape(gr, gc).astype(np.float64)
    cell = np.arange(gr * gc).reshape(gr, gc)
    left, right, top, bottom = p.bounds
    if gr == 1:  # a strip: vertices on its top and bottom edge
        x, cell = np.repeat(x, 2, axis=0), np.repeat(cell, 2, axis=0)
        y = np.stack([np.full(gc, top), np.full(gc, bottom)])
    if gc == 1:
        y, cell = np.repeat(y, 2, axis=1), np.repeat(cell, 2, axis=1)
        x = np.stack([np.full(x.shape[0], left), np.full(x.shape[0], right)], axis=1)
    return x, y, cell


def _quads(p: TensorPlacement, rows: int, cols: int) -> np.ndarray:
    """Two triangles per quad of neighbouring vertices (counter-clockwise seen from +z), (M, 3)
    local indices; rows in different panels of a folded tensor are not joined."""
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    if p.panels > 1 and p.grid[0] > 1:
        panel = np.minimum(np.arange(rows) * p.block[0] // p.panel_rows, p.panels - 1)
        keep = panel[:-1] == panel[1:]
        i, j = i[keep[i[:, 0]]], j[keep[i[:, 0]]]
    a = (i * cols + j).ravel()
    b, c = a + 1, a + cols
    d = c + 1
    return np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)])


def height_field(scene: Scene, cs: ColorScale) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (``MESH_VERTEX_DTYPE``) and triangles (int32 (M, 3)) of every tensor's surface."""
    t = normalize(cs.relative(scene.value, scene.tensor_index), cs)
    lift = np.where(np.isnan(t), 0.0, t) * relief(scene)
    rgb = point_colors(scene.value, scene.tensor_index, cs)
    vertices = np.empty(vertex_count(scene), dtype=MESH_VERTEX_DTYPE)
    triangles = []
    base = 0
    for p in scene.placements:
        if not p.count:
            continue
        sl = slice(p.start, p.start + p.count)
        x, y, cell = _tensor_grid(p, scene.xyz[sl])
        n = x.size
        out = vertices[base : base + n]
        flat = cell.ravel() + p.start
        out["x"], out["y"] = x.ravel(), y.ravel()
        out["z"] = p.origin[2] + lift[flat]
        out["red"], out["green"], out["blue"] = rgb[flat, 0], rgb[flat, 1], rgb[flat, 2]
        out["scalar_accumulated"] = scene.value[flat]
        triangles.append(_quads(p, *x.shape) + base)
        base += n
    vertices["quality"] = meshlab_quality(vertices["scalar_accumulated"])
    faces = np.concatenate(triangles).astype(np.int32) if triangles else np.zeros((0, 3), np.int32)
    return vertices, faces
