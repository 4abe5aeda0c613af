"""3D layout that shows the architecture: one block per depth slice, its tensors side by side.

A tensor is drawn as its 2-D grid (rows = first dimension, columns = the rest flattened, so a conv
kernel is out x (in*kh*kw)) in element units: x = column, y = -row (row 0 on top), so sizes compare
truthfully. The tensors of one block (``wdiff.naming.block_of``: ``transformer.h.7``) share one depth
slice: each module (``attn.c_attn``) is a column, its weight on top and its bias (a one-row strip)
under it, and the columns stand side by side left to right, wrapping onto a second shelf only when a
block would be more than ``MAX_ASPECT`` times wider than tall. The embeddings form the first slice,
heads and final norms the last (``wdiff.naming.role_of``); every slice is centred on x = 0 and
top-aligned at y = 0. The first slice sits at z = 0, the next ones further away (more negative z), so a
camera on the +z side sees the input end in front. Slices are spaced so the stack is about as deep as
the widest slice: a box, not a needle or a pancake; ``Scene.blocks`` holds each slice's frame.

A mixture-of-experts layer (``wdiff.experts``: ``<moe>.experts.<E>.*``) keeps its experts together:
each expert is a tile of its modules side by side (w1, w3, w2 in data-flow order), and the tiles form a
grid about ``EXPERT_ASPECT`` times wider than tall after the layer's other columns, so 8 or 64 experts
read as one block and an expert that never moved stands out as one dark tile.

A one-row tensor (bias, norm) pools 1 x s, so it is given one cell (s elements) of height: the
renderer draws every cell as an s x s square. Zero-size tensors keep their place but have no points.

One exception to "y = -row": a tensor far taller than the widest tensor (a 50257 x 768 token
embedding next to 768 x 3072 layers) would make the scene a needle in which every layer is a speck.
Such a tensor is folded into side-by-side panels of consecutive rows, about as wide as tall, so it
keeps its true area. ``TensorPlacement.position`` maps any element to its place either way.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wdiff.experts import expert_of
from wdiff.naming import BODY, block_of, role_of
from wdiff.scene.accumulated import AccumulatedFile, PooledCells, TensorInfo
from wdiff.scene.pooling import Pool, block_shape, ceil_div, coarsen, pool_factor

#: Extra empty slots in depth where the role changes (embeddings | layers | heads).
ROLE_GAP = 0.6
#: Depth of the stack relative to the widest slice: at least DEPTH_RATIO, at most MAX_DEPTH.
DEPTH_RATIO = 1.0
MAX_DEPTH = 3.0
#: Wanted distance between two slices, relative to the median slice height.
SPACING = 1.2
#: A tensor with more rows than this many times the widest tensor's columns is folded into panels.
FOLD_RATIO = 2.0
#: Gap between the panels of a folded tensor, as a fraction of its width (in columns).
PANEL_GAP = 0.06
#: A block wider than this many times its height wraps its modules onto shelves ...
MAX_ASPECT = 6.0
#: ... about this many times wider than tall.
SHELF_ASPECT = 3.0
#: Gap between the modules of a block, and between shelves, as a fraction of the block's height.
COLUMN_GAP = 0.08
#: Margin of a block's frame around its tensors, as a fraction of the block's larger side.
FRAME_MARGIN = 0.03
#: A MoE layer's experts form a grid about this many times wider than tall ...
EXPERT_ASPECT = 1.5
#: ... with this gap between experts, as a fraction of an expert's larger side.
EXPERT_GAP = 0.08


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
    slice: int = 0  # index into ``Scene.blocks``

    @property
    def count(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def width(self) -> float:
        """Extent along x in element units, gaps between panels included."""
        return (self.panels - 1) * self.panel_pitch + self.cols

    @property
    def height(self) -> float:
        """Extent along y in element units: a one-row tensor is drawn one cell (``block[1]``) tall."""
        if self.rows == 1:
            return float(self.block[1])
        return float(min(self.rows, self.panel_rows) if self.panels > 1 else self.rows)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, right, top, bottom) outer edges of the drawn cells."""
        left = self.origin[0] - 0.5
        top = self.origin[1] + (self.block[1] / 2.0 if self.rows == 1 else 0.5)
        return left, left + self.width, top, top - self.height

    def position(self, row: float, col: float) -> tuple[float, float, float]:
        """Scene position of element (row, col); fractional indices interpolate within a panel."""
        panel = min(int(row // self.panel_rows), self.panels - 1) if self.panels > 1 else 0
        x = self.origin[0] + panel * self.panel_pitch + col
        return (x, self.origin[1] - (row - panel * self.panel_rows), self.origin[2])


@dataclass(frozen=True)
class BlockSlice:
    """One depth slice: a block of the network (or all embeddings, or all heads) and its frame."""

    label: str  # the block's name, shortened for display (``h.7``, ``wpe + wte``)
    role: int  # wdiff.naming.EMBEDDING, BODY or HEAD
    first: int  # its tensors are placements[first:end]
    end: int
    z: float
    frame: tuple[float, float, float, float]  # (left, right, top, bottom), a margin around the tensors


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
    blocks: tuple[BlockSlice, ...] = ()

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


def _slice_key(name: str) -> tuple[int, str]:
    """Tensors with equal keys share a slice: every embedding together, every head together
    (within an encoder or decoder), each other block on its own."""
    role = role_of(name)
    if role == BODY:
        return role, block_of(name)
    return role, "encoder" if "encoder" in name.split(".") else ""


def slices(names: Sequence[str]) -> list[tuple[int, int, int]]:
    """Runs of consecutive tensors that share a depth slice: [(role, first, end)]."""
    runs: list[tuple[int, int, int]] = []
    last = None
    for k, name in enumerate(names):
        key = _slice_key(name)  # once per name: it runs regular expressions (100,000 names in a MoE)
        if runs and last == key:
            runs[-1] = (runs[-1][0], runs[-1][1], k + 1)
        else:
            runs.append((key[0], k, k + 1))
        last = key
    return runs


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


#: Where a module goes inside its block, so a layer reads in the order data flows through it:
#: (pattern on the module path inside the block, rank). First match wins; unknown modules keep their
#: order after the known ones.
_MODULE_RANKS = [
    (re.compile(r"(^|\.)(ln_1|input_layernorm|norm1|attention_norm|layernorm_before|ln1|pre_norm)$"), 0),
    (re.compile(r"(^|\.)(q|q_proj|query|wq)$"), 1),
    (re.compile(r"(^|\.)(k|k_proj|key|wk)$"), 2),
    (re.compile(r"(^|\.)(v|v_proj|value|wv)$"), 3),
    (re.compile(r"(attn|attention)\.(c_attn|qkv|query_key_value|in_proj|Wqkv)$"), 1),
    (re.compile(r"(attn|attention)(\.|$)"), 4),  # the output projection and anything else in attention
    (re.compile(r"(^|\.)(ln_2|post_attention_layernorm|norm2|ffn_norm|layernorm_after|ln2)$"), 5),
    (re.compile(r"(^|\.)(gate_proj|w1|gate)$"), 6),
    (re.compile(r"(^|\.)(up_proj|w3|c_fc|fc1|dense_h_to_4h|intermediate\.dense|wi)$"), 7),
    (re.compile(r"(^|\.)(down_proj|w2|fc2|dense_4h_to_h|wo)$|mlp\.c_proj$|^output\.dense$"), 8),
    (re.compile(r"(mlp|ffn|feed_forward|intermediate|^output)(\.|$)"), 9),
]


def module_rank(module: str) -> int:
    """Data-flow rank of a module path inside its block (``self_attn.q_proj`` -> 1, ``mlp`` -> 9)."""
    for pattern, rank in _MODULE_RANKS:
        if pattern.search(module):
            return rank
    return len(_MODULE_RANKS)


def _columns(names: Sequence[str], members: Sequence[int], infos: Sequence[TensorInfo]) -> list[list[int]]:
    """The modules of a slice in data-flow order (norm, q, k, v, attention output, norm, MLP; unknown
    modules after them in order of appearance), each its tensors: matrices first, then one-row
    tensors, a ``weight`` before its ``bias``."""
    modules: dict[str, list[int]] = {}
    block = block_of(names[members[0]]) if len(members) else ""
    for k in members:
        modules.setdefault(_module(names[k]), []).append(k)
    order = sorted(modules, key=lambda m: module_rank(m[len(block) + 1 :] if m.startswith(block) else m))
    return [
        sorted(modules[m], key=lambda k: (infos[k].rows == 1, names[k].endswith("bias"), k)) for m in order
    ]


def _experts(names: Sequence[str], members: range) -> tuple[list[int], list[list[int]]]:
    """A slice's tensors split into the rest and one list per routed expert (``<moe>.experts.<E>.*``,
    ``wdiff.experts``), experts in number order; no experts: ``(members, [])``."""
    rest: list[int] = []
    by_expert: dict[tuple[str, int], list[int]] = {}
    for k in members:
        one = expert_of(names[k])
        if one is None:
            rest.append(k)
        else:
            by_expert.setdefault(one[:2], []).append(k)
    if len(by_expert) < 2:
        return list(members), []
    return rest, [by_expert[key] for key in sorted(by_expert)]


def _expert_grid(
    tiles: list[list[list[int]]], extents: Sequence[tuple[float, float]], factor: int
) -> tuple[dict[int, tuple[float, float]], float, float]:
    """The experts of a block as a grid of tiles (each an expert's modules side by side), about
    ``EXPERT_ASPECT`` times wider than tall: corners relative to the grid's top-left, its size."""
    placed = [_place_slice(columns, extents, factor) for columns in tiles]
    tile_w = max(w for _, w, _ in placed)
    tile_h = max(h for _, _, h in placed)
    gap = max(2.0 * factor, EXPERT_GAP * max(tile_w, tile_h))
    n = len(placed)
    across = max(1, min(n, round(math.sqrt(n * EXPERT_ASPECT * (tile_h + gap) / (tile_w + gap)))))
    corners: dict[int, tuple[float, float]] = {}
    for e, (inner, _, _) in enumerate(placed):
        row, col = divmod(e, across)
        x0, y0 = col * (tile_w + gap), -row * (tile_h + gap)
        corners.update({k: (x0 + x, y0 + y) for k, (x, y) in inner.items()})
    down = math.ceil(n / across)
    return corners, across * tile_w + (across - 1) * gap, down * tile_h + (down - 1) * gap


def _shelves(sizes: Sequence[tuple[float, float]], gap: float) -> list[list[int]]:
    """Columns (width, height) in order onto shelves: one shelf unless that is wider than
    ``MAX_ASPECT`` times its height, else shelves about as wide as the packed block is tall."""
    widths = [w for w, _ in sizes]
    tall = max((h for _, h in sizes), default=1.0)
    if sum(widths) + gap * (len(sizes) - 1) <= MAX_ASPECT * tall:
        return [list(range(len(sizes)))]
    area = sum((w + gap) * (h + gap) for w, h in sizes)
    target = max(max(widths), math.sqrt(area * SHELF_ASPECT))
    shelves: list[list[int]] = [[]]
    used = 0.0
    for k, w in enumerate(widths):
        if shelves[-1] and used + gap + w > target:
            shelves.append([])
            used = 0.0
        used += (gap if shelves[-1] else 0.0) + w
        shelves[-1].append(k)
    return shelves


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


def _extent(info: TensorInfo, fold: tuple[int, int, float], factor: int) -> tuple[float, float]:
    """(width, height) a tensor takes in its slice, in element units."""
    panels, panel_rows, pitch = fold
    if info.size == 0:
        return 0.0, 0.0
    height = float(factor) if info.rows == 1 else float(min(info.rows, panel_rows))
    return (panels - 1) * pitch + info.cols, height


def _place_slice(
    columns: list[list[int]],
    extents: Sequence[tuple[float, float]],
    factor: int,
    tiles: list[list[list[int]]] | None = None,
) -> tuple[dict[int, tuple[float, float]], float, float]:
    """Top-left corner (x, y) of every tensor of a slice, relative to the slice's top-left corner,
    and the slice's (width, height). ``tiles``: a MoE layer's experts, each its columns, placed as one
    grid (``_expert_grid``) after the other columns."""
    size = []
    for col in columns:
        shown = [extents[k] for k in col if extents[k][0] > 0]
        stack = sum(h for _, h in shown) + factor * max(len(shown) - 1, 0)
        size.append((max((w for w, _ in shown), default=0.0), stack))
    grid: dict[int, tuple[float, float]] = {}
    if tiles:
        grid, grid_w, grid_h = _expert_grid(tiles, extents, factor)
        size.append((grid_w, grid_h))  # the grid is one more column, the last
    tall = max((h for _, h in size), default=1.0)
    gap = max(2.0 * factor, COLUMN_GAP * tall)
    corners: dict[int, tuple[float, float]] = {}
    y, width = 0.0, 0.0
    for shelf in _shelves(size, gap):
        x, shelf_height = 0.0, 0.0
        for c in shelf:
            if tiles and c == len(columns):
                corners.update({k: (x + gx, y + gy) for k, (gx, gy) in grid.items()})
                shelf_height = max(shelf_height, size[c][1])
                x += size[c][0] + gap
                continue
            if size[c][0] == 0:
                for k in columns[c]:
                    corners[k] = (x, y)
                continue
            top = y
            for k in columns[c]:
                corners[k] = (x, top)
                if extents[k][0] > 0:
                    top -= extents[k][1] + factor
            shelf_height = max(shelf_height, size[c][1])
            x += size[c][0] + gap
        width = max(width, x - gap)
        y -= shelf_height + gap
    return corners, width, -(y + gap)


def _label(names: Sequence[str]) -> str:
    """The slice's block name(s) (``transformer.wpe + transformer.wte``); the renderer shortens it."""
    return " + ".join(dict.fromkeys(block_of(n) for n in names))


def place_cells(
    infos: Sequence[TensorInfo],
    factor: int,
    pool: Pool,
    cell_grids: Sequence[np.ndarray],
    nonfinite: Sequence[int],
) -> Scene:
    """Place pooled cell grids (one per tensor, in order) into a Scene."""
    names = [t.name for t in infos]
    widest = max((t.cols for t in infos if t.size), default=1)
    folds = [_fold(t, widest, block_shape(t.rows, factor)[0]) for t in infos]
    extents = [_extent(t, f, factor) for t, f in zip(infos, folds)]

    runs = slices(names)
    corners: dict[int, tuple[float, float]] = {}
    sizes = []
    for _, first, end in runs:
        rest, by_expert = _experts(names, range(first, end))
        tiles = [_columns(names, members, infos) for members in by_expert]
        placed, w, h = _place_slice(_columns(names, rest, infos), extents, factor, tiles)
        corners.update(placed)
        sizes.append((w, h))
    # depth: one slot per slice, plus ROLE_GAP where embeddings end and heads begin
    slots = [0.0]
    for k in range(1, len(runs)):
        slots.append(slots[-1] + 1.0 + (ROLE_GAP if runs[k][0] != runs[k - 1][0] else 0.0))
    # The stack is about DEPTH_RATIO times as deep as the widest slice, and (when that is not too
    # deep) slices stand at least SPACING times the typical slice height apart, so the camera
    # above the stack sees most of every block over the one in front of it.
    widest_slice = max((max(w, h) for w, h in sizes), default=1.0)
    typical = float(np.median([h for _, h in sizes])) if sizes else 1.0
    step = 0.0
    if slots[-1]:
        step = max(DEPTH_RATIO * widest_slice, min(SPACING * typical * slots[-1], MAX_DEPTH * widest_slice))
        step /= slots[-1]

    centres = functools.cache(_centres)  # tensors of one shape share their cell centres (read-only)
    n = sum(g.size for g in cell_grids)
    xyz = np.empty((n, 3), dtype=np.float32)
    value = np.empty(n, dtype=np.float32)
    tensor_index = np.empty(n, dtype=np.int32)
    placements: list[TensorPlacement] = []
    blocks = []
    start = 0
    for s, (role, first, end) in enumerate(runs):
        z = float(-slots[s] * step)
        w, h = sizes[s]
        margin = FRAME_MARGIN * max(w, h, factor) + factor / 2.0
        blocks.append(
            BlockSlice(
                _label(names[first:end]),
                role,
                first,
                end,
                z,
                (-w / 2 - margin, w / 2 + margin, margin, -h - margin),
            )
        )
        for k in range(first, end):
            info, cells, (panels, panel_rows, pitch) = infos[k], cell_grids[k], folds[k]
            block = block_shape(info.rows, factor)
            cx, cy = corners[k]
            top = cy - (factor / 2.0 if info.rows == 1 else 0.5)
            origin = (-w / 2 + cx + 0.5, top, z)
            count = cells.size
            grid = (int(cells.shape[0]), int(cells.shape[1])) if count else (0, 0)
            if count:
                stop = start + count
                row = centres(info.rows, block[0])
                panel = np.minimum(row // panel_rows, panels - 1)
                x = origin[0] + centres(info.cols, block[1])
                cells_xyz = xyz[start:stop].reshape(grid[0], grid[1], 3)  # row-major: y varies slowest
                cells_xyz[:, :, 0] = x[None, :] + (panel * pitch)[:, None]
                cells_xyz[:, :, 1] = (origin[1] - (row - panel * panel_rows))[:, None]
                cells_xyz[:, :, 2] = z
                value[start:stop] = cells.ravel()
                tensor_index[start:stop] = k
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
                    s,
                )
            )
            start += count
    for array in (xyz, value, tensor_index):
        array.setflags(write=False)
    return Scene(xyz, value, tensor_index, tuple(names), factor, pool, tuple(placements), tuple(blocks))


def layout(
    source: AccumulatedFile | PooledCells,
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
    return place_cells(infos, factor, pool, grids, nonfinite)


def coarsen_scene(scene: Scene, max_points: int) -> Scene:
    """The same scene pooled further (by a multiple of its factor) to fit ``max_points``.

    Exact: equal to pooling the original elements with the new factor, without rereading the file.
    Used to draw a picture with about one point per pixel while the point cloud keeps full detail.
    Every non-empty tensor keeps at least one point, whatever ``max_points`` asks.
    """
    max_points = max(max_points, sum(1 for p in scene.placements if p.count))
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
    return place_cells(infos, factor, scene.pool, grids, [p.nonfinite for p in scene.placements])
