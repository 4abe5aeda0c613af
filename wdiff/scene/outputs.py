"""Everything a run writes after compute, from the results on disk: ``points.ply``, the pictures,
``mesh.ply``, the film and ``scene.html``, as ``SceneOptions`` asks.

Reads ``accumulated.safetensors`` once (through ``pooled.safetensors`` when compute pooled on the
way) into the scene at full budget; every other output is made from that scene in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wdiff.scene.options import SceneOptions
from wdiff.schema import ACCUMULATED, FRAMES, POINTS, RENDER, SceneEntry, scene_entry

MESH = "mesh.ply"
HTML = "scene.html"


def view_file(view: str, first: bool) -> str:
    """``render.png`` for the first view, ``render-<view>.png`` for the others."""
    return RENDER if first else f"render-{view}.png"


def write_outputs(
    folder: str | os.PathLike[str],
    names: Sequence[str],
    title: str,
    options: SceneOptions,
    run_name: str = "",
    steps: Sequence[int | None] = (),
    step: Callable[[str], None] = lambda what: None,
    sizes: Mapping[str, float] | None = None,
) -> SceneEntry:
    """Write the scene's files into ``folder``; returns what ``summary.json`` records of them.

    ``run_name`` and the checkpoints' ``steps`` title the film's frames.

    ``step(what)`` is called before each slow part ("render", "mesh", "frames", "html"). ``sizes``
    (tensor name -> RMS of its W(0), ``wdiff.scene.tensor_sizes``) is needed for
    ``normalize="relative"``.
    """
    from wdiff import scene as sc

    folder = Path(folder)
    built = sc.build_scene(folder / ACCUMULATED, names, max_points=options.max_points, pool=options.pool)
    colors = sc.colorize_scene(built, options.color_scale, options.normalize, sizes)
    sc.write_points_ply(built, colors, folder / POINTS)
    files = [POINTS]
    if options.render:
        step("render")
        files += render_views(built, colors.scale, folder, title, options)
    if options.mesh:
        step("mesh")
        write_mesh(built, colors.scale, folder / MESH, options.max_points)
        files.append(MESH)
    if options.frames and (folder / FRAMES).is_file():
        step("frames")
        from wdiff.scene.film import write_film

        files += write_film(folder, folder / FRAMES, built, run_name, steps, options, sizes)
    if options.html:
        step("html")
        from wdiff.scene.webview import write_html

        write_html(built, colors.scale, folder / HTML, title, options.html_points)
        files.append(HTML)
    return scene_entry(
        points=len(built),
        max_points=options.max_points,
        pool_factor=built.pool_factor,
        pool=options.pool,
        color_scale=options.color_scale,
        normalize=options.normalize,
        color_range=[colors.scale.vmin, colors.scale.vmax],
        blocks=[b.label for b in built.blocks],
        files=files,
    )


def render_views(scene: Any, cs: Any, folder: Path, title: str, options: SceneOptions) -> list[str]:
    """``render.png`` and one ``render-<view>.png`` per further view, one renderer for all."""
    from wdiff.scene import render
    from wdiff.scene.picture import Picture

    files = []
    pictures = [Picture.plan(scene, options.size, title, view) for view in options.views]
    with render.Offscreen(pictures[0].view_size) as renderer:
        for k, (view, picture) in enumerate(zip(options.views, pictures)):
            name = view_file(view, k == 0)
            render.save_png(folder / name, picture.draw(renderer, scene, cs))
            files.append(name)
    return files


def write_mesh(scene: Any, cs: Any, path: Path, max_points: int) -> None:
    """``mesh.ply`` of the scene, pooled further when needed so it has at most ``max_points`` vertices."""
    from wdiff.scene import mesh
    from wdiff.scene.ply import write_mesh_ply

    vertices, triangles = mesh.height_field(mesh.fit(scene, max_points), cs)
    write_mesh_ply(path, vertices, triangles)
