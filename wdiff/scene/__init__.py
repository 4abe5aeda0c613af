"""The 3D scene of the accumulated change: layout, colours, PLY point cloud and mesh, pictures, the
film of the training, the HTML viewer.

Reads only the results files the compute step wrote (``accumulated.safetensors``, and the cells it
pooled on the way as ``wdiff.detail`` planned them), never a checkpoint.
``wdiff.scene.outputs.write_outputs`` does what a run needs, as ``SceneOptions`` asks; the pieces, for a
notebook::

    scene = build_scene(out / "accumulated.safetensors", names)   # the one pass over the file
    colors = colorize_scene(scene, "log", "global")               # rgb + the scale used
    write_points_ply(scene, colors, out / "points.ply")
    render_scene(scene, out / "render.png", title="run, steps 50..400", color_scale=colors.scale)

``build_scene`` is the only step that reads the (possibly huge) file; everything after works on the
scene in memory, whose size is bounded by ``max_points``. Modules: ``layout`` (blocks as depth
slices), ``color``, ``ply``, ``mesh``, ``render`` (Open3D, headless), ``picture`` (camera, labels,
legend), ``film``, ``html``, ``viewer`` (``wdiff view``), ``options``, ``outputs``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from wdiff.naming import network_order
from wdiff.scene import color
from wdiff.scene.accumulated import CHUNK_ELEMENTS, POOLED, AccumulatedFile, PooledCells
from wdiff.scene.color import Colors, ColorScale, Scale, colorize
from wdiff.scene.layout import Scene, TensorPlacement, layout
from wdiff.scene.options import VIEWS, SceneOptions
from wdiff.scene.ply import vertex_records, write_ply
from wdiff.scene.pooling import Pool
from wdiff.schema import ACCUMULATED, stored_shapes

__all__ = [
    "POOLED",
    "ColorScale",
    "Colors",
    "Scene",
    "TensorPlacement",
    "build_scene",
    "colorize",
    "colorize_scene",
    "SceneOptions",
    "VIEWS",
    "render_scene",
    "write_points_ply",
]


def build_scene(
    accumulated_path: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    max_points: int = 1_000_000,
    pool: Pool = "max",
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Scene:
    """Read ``accumulated.safetensors`` once, in blocks of ``chunk_elements`` values, into a Scene.

    ``names`` is the depth order (network order from the caller; default: every tensor of the file
    in ``wdiff.naming.network_order``). ``max_points`` is a hard budget: one global pooling factor,
    the smallest that fits, shrinks every tensor alike (``pool`` = "max" keeps hot spots visible,
    "mean" shows the typical change). Raises ValueError when the budget is below the number of
    non-empty tensors, ``WdiffError`` when the file is unreadable or lacks a name.

    ``shapes`` (name -> shape, from the summary) for results that store no map (``--map-dtype none``,
    ``wdiff.schema.map_stored``): the scene is then made of the cells pooled during compute, and only
    the run's own ``max_points`` and ``pool`` can be drawn (``PooledCells``).
    """
    source: AccumulatedFile | PooledCells = (
        AccumulatedFile(accumulated_path, chunk_elements=chunk_elements)
        if shapes is None
        else PooledCells(accumulated_path, shapes)
    )
    with source:
        order = network_order(source.names()) if names is None else list(names)
        return layout(source, order, max_points=max_points, pool=pool)


def drawn_scene(folder: str | os.PathLike[str], summary: Mapping) -> Scene:
    """The scene of a results folder as its run drew it: the budget and pool its summary records
    (``summary["scene"]``), from the map, or from the cells pooled during compute when the run stored
    no map (``wdiff.schema.stored_shapes``)."""
    options = summary.get("scene") or {}
    return build_scene(
        os.path.join(folder, ACCUMULATED),
        list(summary["tensors"]),
        max_points=int(options.get("max_points", 1_000_000)),
        pool=options.get("pool", "max"),
        shapes=stored_shapes(summary),
    )


def colorize_scene(
    scene: Scene, scale: Scale = "log", normalize: str = "global", sizes: Mapping[str, float] | None = None
) -> Colors:
    """Point colours of a scene on one global scale, with each tensor against its own max, or relative
    to each tensor's size (``sizes``: tensor name -> RMS of its W(0), ``tensor_sizes(summary)``)."""
    ordered = [sizes.get(n, 0.0) for n in scene.names] if sizes is not None else None
    cs = color.scene_scale(scene.value, scene.tensor_index, len(scene.names), scale, normalize, sizes=ordered)
    return Colors(color.point_colors(scene.value, scene.tensor_index, cs), cs)


def tensor_sizes(summary: Mapping) -> dict[str, float]:
    """Each tensor's size as ``normalize="relative"`` divides by it: the RMS of its weights at the first
    checkpoint, ``l2[0] / sqrt(numel)`` from ``summary.json`` (0 when unknown or zero)."""
    out = {}
    for name, t in (summary.get("tensors") or {}).items():
        l2 = (t.get("l2") or [None])[0]
        numel = t.get("numel") or 0
        out[name] = float(l2) / math.sqrt(numel) if l2 is not None and numel and math.isfinite(l2) else 0.0
    return out


def write_points_ply(scene: Scene, colors: Colors | np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write the scene as a binary PLY: xyz, uchar RGB and the value as ``quality`` (MeshLab) and
    ``scalar_accumulated`` (CloudCompare); Blender reads all (docs/user-guide.md). ``colors``: from
    ``colorize``, or uint8 (N, 3)."""
    rgb = colors.rgb if isinstance(colors, Colors) else colors
    write_ply(path, vertex_records(scene.xyz, rgb, scene.value))


def render_scene(
    scene: Scene,
    path: str | os.PathLike[str],
    title: str = "",
    size: tuple[int, int] = (1280, 800),
    scale: Scale = "log",
    *,
    color_scale: ColorScale | None = None,
    max_render_points: int | None = None,
    view: str = "oblique",
) -> None:
    """Render the scene headless to a PNG of exactly ``size`` with a colour bar, ``title`` and one
    label per block, seen from ``view`` (a name of ``VIEWS``) with the whole model in the frame.

    Pass the ``color_scale`` used for the PLY so both share bounds (default: computed from the scene
    with ``scale``, globally). A picture cannot show more than about one cell per pixel, so the scene
    is pooled further, exactly, to ``max_render_points`` (default: a quarter of the pixels): cells
    stay legible as squares and the software renderer stays fast.
    """
    from wdiff.scene import render
    from wdiff.scene.picture import Picture

    cs = color_scale or color.scene_scale(scene.value, scene.tensor_index, len(scene.names), scale)
    picture = Picture.plan(scene, size, title, view, max_render_points)
    with render.Offscreen(picture.view_size) as renderer:
        image = picture.draw(renderer, scene, cs)
    render.save_png(path, image)
