"""3D layout, first version: every tensor a flat grid of points, tensors stacked in depth.

A tensor is drawn as its 2-D grid (rows = first dimension, columns = the rest flattened) in element
units: x = column, y = -row (row 0 on top; every tensor top-aligned at y = 0 and centred on x = 0),
so sizes compare truthfully. Tensors stand one behind the other in the caller's (network) order: the
first at z = 0, the next ones further away (more negative z), so a camera on the +z side sees the
first tensor in front with columns running left to right. An extra gap separates blocks
(``wdiff.naming.block_of``: ``model.layers.7``) so the layer structure shows, and the depth step is
scaled so the stack is about as deep as the widest footprint: a box, not a needle or a pancake.
Zero-size tensors keep their slot but have no points.

One exception to "y = -row": a tensor far taller than the widest tensor (a 50257 x 768 token
embedding next to 768 x 3072 layers) would make the scene a needle in which every layer is a speck.
Such a tensor is folded into side-by-side panels of consecutive rows, about as wide as tall, so it
keeps its true area. ``TensorPlacement.position`` maps any element to its place either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wdiff.naming import block_of
from wdiff.scene.accumulated import AccumulatedFile, TensorInfo
from wdiff.scene.pooling import Pool, block_shape, ceil_div, coarsen, pool_factor

#: Extra empty slots between two blocks (``model.layers.6`` -> ``model.layers.7``).
BLOCK_GAP = 2.0
#: Total depth of the stack relative to the largest footprint side.
DEPTH_RATIO = 1.0
#: A tensor with more rows than this many times the widest tensor's columns is folded into panels.
FOLD_RATIO = 2.0
#: Gap between the panels of a folded tensor, as a fraction of its width (in columns).
PANEL_GAP = 0.06


@dataclass(frozen=True)
class TensorPlacement:
    """Where one tensor sits in the scene, enough to label it or to map a picked point back.

    Pooled cell (i, j) covers element rows ``[i * block[0], (i + 1) * block[0])`` and columns
    ``[j * block[1], (j + 1) * block[1])`` (clipped to the grid) and sits at their centre. Its
    points are ``scene.xyz[start : start + count]``, cells in row-major order. Rows are cut into
    ``panels`` of ``panel_rows`` rows laid side by side ``panel_pitch`` apart (one unless folded).
    """

    name: str
    shape: tuple[int, ...]  # as stored
    rows: int  # grid of elements: first dimension x the rest flattened
    cols: int
    block: tuple[int, int]  # elements per pooled cell (rows, cols)
    grid: tuple[int, int]  # pooled cells (rows, cols); (0, 0) for a zero-size tensor
    origin: tuple[float, float, float]  # position of element (0, 0)
    start: int
    nonfinite: int  # NaN/Inf elements in the tensor (before pooling)
    panels: int = 1
    panel_rows: int = 0  # rows per panel (= rows when not folded)
    panel_pitch: float = 0.0  # x distance from one panel to the next

    @property
    def count(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def width(self) -> float:
        """Extent along x in element units, gaps between panels included."""
        return (self.panels - 1) * self.panel_pitch + self.cols

    @property
    def height(self) -> int:
        return min(self.rows, self.panel_rows) if self.panels > 1 else self.rows

    def position(self, row: float, col: float) -> tuple[float, float, float]:
        """Scene position of element (row, col); fractional indices interpolate within a panel."""
        panel = min(int(row // self.panel_rows), self.panels - 1) if self.panels > 1 else 0
        x = self.origin[0] + panel * self.panel_pitch + col
        return (x, self.origin[1] - (row - panel * self.panel_rows), self.origin[2])


@dataclass(frozen=True, eq=False)
class Scene:
    """A point cloud of the accumulated change: one point per pooled cell, read-only arrays."""

    xyz: np.ndarray  # (N, 3) float32, element units
    value: np.ndarray  # (N,) float32, pooled accumulated |dW| (NaN/Inf kept)
    tensor_index: np.ndarray  # (N,) int32, index into names / placements
    names: tuple[str, ...]
    pool_factor: int
    pool: Pool
    placements: tuple[TensorPlacement, ...]

    def __len__(self) -> int:
        return int(self.value.shape[0])

    @property
    def nonfinite(self) -> int:
        """NaN/Inf elements in the whole model (before pooling)."""
        return sum(p.nonfinite for p in self.placements)

    def locate(self, point: int) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """The tensor and the element rows/columns ``[a, b)`` a point stands for (for picking)."""
        p = self.placements[int(self.tensor_index[point])]
        i, j = divmod(point - p.start, p.grid[1])
        br, bc = p.block
        return p.name, (i * br, min((i + 1) * br, p.rows)), (j * bc, min((j + 1) * bc, p.cols))

    def cells(self, index: int) -> np.ndarray:
        """Pooled values of one tensor as its (grid rows, grid cols) array (a read-only view)."""
        p = self.placements[index]
        return self.value[p.start : p.start + p.count].reshape(p.grid)


def depth_slots(names: Sequence[str], block_gap: float = BLOCK_GAP) -> np.ndarray:
    """Slot of each tensor along the stack: 1 apart, plus ``block_gap`` where the block changes."""
    slots = np.zeros(len(names), dtype=np.float64)
    for k in range(1, len(names)):
        gap = block_gap if block_of(names[k]) != block_of(names[k - 1]) else 0.0
        slots[k] = slots[k - 1] + 1.0 + gap
    return slots


def _fold(info: TensorInfo, widest: int, block_rows: int) -> tuple[int, int, float]:
    """(panels, rows per panel, panel pitch) for a tensor; rows per panel is a multiple of the
    cell height so no pooled cell straddles two panels."""
    rows, cols = info.rows, info.cols
    if rows <= FOLD_RATIO * widest or cols == 0:
        return 1, rows, 0.0
    wanted = max(1, round(math.sqrt(rows / cols)))  # about as wide as tall
    panel_rows = ceil_div(ceil_div(rows, wanted), block_rows) * block_rows
    return ceil_div(rows, panel_rows), panel_rows, cols + max(1.0, math.ceil(PANEL_GAP * cols))


def _centres(length: int, size: int) -> np.ndarray:
    """Centre of each cell of ``size`` elements along an axis of ``length`` elements."""
    first = np.arange(0, length, size, dtype=np.float64)
    last = np.minimum(first + size, length) - 1
    return (first + last) / 2.0


def _assemble(
    infos: Sequence[TensorInfo],
    factor: int,
    pool: Pool,
    cell_grids: Sequence[np.ndarray],
    nonfinite: Sequence[int],
) -> Scene:
    """Place pooled cell grids (one per tensor, in order) into a Scene."""
    widest = max((t.cols for t in infos if t.size), default=1)
    folds = [_fold(t, widest, block_shape(t.rows, factor)[0]) for t in infos]
    sides = [
        max((panels - 1) * pitch + t.cols, min(t.rows, panel_rows))
        for t, (panels, panel_rows, pitch) in zip(infos, folds, strict=True)
        if t.size
    ]
    slots = depth_slots([t.name for t in infos])
    step = DEPTH_RATIO * max(sides, default=1.0) / slots[-1] if len(slots) and slots[-1] else 0.0

    n = sum(g.size for g in cell_grids)
    xyz = np.empty((n, 3), dtype=np.float32)
    value = np.empty(n, dtype=np.float32)
    tensor_index = np.empty(n, dtype=np.int32)
    placements = []
    start = 0
    for k, (info, cells, (panels, panel_rows, pitch)) in enumerate(
        zip(infos, cell_grids, folds, strict=True)
    ):
        block = block_shape(info.rows, factor)
        width = (panels - 1) * pitch + info.cols
        origin = (-(width - 1) / 2.0, 0.0, float(-slots[k] * step))
        count = cells.size
        grid = (int(cells.shape[0]), int(cells.shape[1])) if count else (0, 0)
        if count:
            end = start + count
            row = _centres(info.rows, block[0])
            panel = np.minimum(row // panel_rows, panels - 1)
            x = origin[0] + _centres(info.cols, block[1])
            gx, gy = np.meshgrid(x, origin[1] - (row - panel * panel_rows))
            xyz[start:end, 0] = (gx + (panel * pitch)[:, None]).ravel()
            xyz[start:end, 1] = gy.ravel()  # row-major cells: y varies slowest
            xyz[start:end, 2] = origin[2]
            value[start:end] = cells.ravel()
            tensor_index[start:end] = k
        placements.append(
            TensorPlacement(
                info.name,
                info.shape,
                info.rows,
                info.cols,
                block,
                grid,
                origin,
                start,
                nonfinite[k],
                panels,
                panel_rows,
                pitch,
            )
        )
        start += count
    for array in (xyz, value, tensor_index):
        array.setflags(write=False)
    names = tuple(t.name for t in infos)
    return Scene(xyz, value, tensor_index, names, factor, pool, tuple(placements))


def layout(
    source: AccumulatedFile,
    names: Sequence[str],
    max_points: int = 1_000_000,
    pool: Pool = "max",
) -> Scene:
    """Pool every tensor of ``source`` with one global factor and place the cells.

    ``names`` gives the tensors and their depth order; at most ``max_points`` points (hard budget).
    """
    if len(set(names)) != len(names):
        raise ValueError("names contains duplicates")
    infos = [source.info(name) for name in names]
    factor = pool_factor(((t.rows, t.cols) for t in infos if t.size > 0), max_points)
    grids, nonfinite = [], []
    for t in infos:
        if t.size == 0:
            grids.append(np.zeros((0, 0), dtype=np.float32))
            nonfinite.append(0)
            continue
        cells, bad = source.pooled(t.name, block_shape(t.rows, factor), pool)
        grids.append(cells)
        nonfinite.append(bad)
    return _assemble(infos, factor, pool, grids, nonfinite)


def coarsen_scene(scene: Scene, max_points: int) -> Scene:
    """The same scene pooled further (by a multiple of its factor) to fit ``max_points``.

    Exact: equal to pooling the original elements with the new factor, without rereading the file.
    Used to draw a picture with about one point per pixel while the point cloud keeps full detail.
    """
    infos = [TensorInfo(p.name, p.shape) for p in scene.placements]
    factor = pool_factor(((t.rows, t.cols) for t in infos if t.size > 0), max_points, step=scene.pool_factor)
    if factor == scene.pool_factor:
        return scene
    grids = []
    for k, (t, p) in enumerate(zip(infos, scene.placements, strict=True)):
        if p.count == 0:
            grids.append(np.zeros((0, 0), dtype=np.float32))
            continue
        new_block = block_shape(t.rows, factor)
        grids.append(coarsen(scene.cells(k), t.rows, t.cols, p.block, new_block, scene.pool))
    return _assemble(infos, factor, scene.pool, grids, [p.nonfinite for p in scene.placements])
