"""Everything a run writes after compute, from the results on disk: ``points.ply``, the pictures,
``mesh.ply``, the film and ``scene.html``, as ``SceneOptions`` asks.

Reads ``accumulated.safetensors`` once (through ``pooled.safetensors`` when compute pooled on the
way) into the scene at full budget; every other output is made from that scene in memory. Open3D
renders in the picture worker (``wdiff.worker``) while this process does the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wdiff.scene.options import SceneOptions
from wdiff.schema import ACCUMULATED, FRAMES, POINTS, RENDER, SceneEntry, scene_entry

if TYPE_CHECKING:
    from wdiff.worker import Job

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
    pending: list[Views] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> SceneEntry:
    """Write the scene's files into ``folder``; returns what ``summary.json`` records of them.

    ``run_name`` and the checkpoints' ``steps`` title the film's frames.

    ``step(what)`` is called before each slow part ("render", "mesh", "frames", "html"). ``sizes``
    (tensor name -> RMS of its W(0), ``wdiff.scene.tensor_sizes``) is needed for
    ``normalize="relative"``. ``shapes`` (name -> shape) when the results store no map: the scene is
    then drawn from the cells pooled during compute (``wdiff.scene.build_scene``).

    Open3D renders in the picture worker (``wdiff.worker``) while this process writes the PLY files,
    the film and ``scene.html``. With ``pending``, the pictures are not finished here: their ``Views``
    is appended there, for the caller to ``finish()`` (``wdiff.run`` draws the report's charts first).
    Without, this returns once every file is written.
    """
    from wdiff import scene as sc

    folder = Path(folder)
    built = sc.build_scene(
        folder / ACCUMULATED, names, max_points=options.max_points, pool=options.pool, shapes=shapes
    )
    colors = sc.colorize_scene(built, options.color_scale, options.normalize, sizes)
    views = None
    if options.render:
        step("render")
        views = Views.start(built, colors.scale, folder, title, options)
    sc.write_points_ply(built, colors, folder / POINTS)  # meanwhile, here
    files = [POINTS, *(views.files if views is not None else ())]
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
    if views is not None:
        if pending is None:
            views.finish()
        else:
            pending.append(views)
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


class Views:
    """``render.png`` and one ``render-<view>.png`` per further view: rendered in the picture worker
    (one renderer for all) from ``start``; ``finish`` adds title, labels and colour bar here and
    writes the files."""

    def __init__(self, job: Job, pictures: list[Any], frames: list[Any], cs: Any, folder: Path) -> None:
        self.job, self.pictures, self.frames, self.cs, self.folder = job, pictures, frames, cs, folder
        self.files = [view_file(p.view, k == 0) for k, p in enumerate(pictures)]

    @classmethod
    def start(cls, scene: Any, cs: Any, folder: Path, title: str, options: SceneOptions) -> Views:
        from wdiff import worker
        from wdiff.scene.picture import Picture, render_frames

        pictures = [Picture.plan(scene, options.size, title, view) for view in options.views]
        frames = [p.frame(scene, cs) for p in pictures]
        return cls(worker.shared().submit(render_frames, pictures, frames), pictures, frames, cs, folder)

    def finish(self) -> None:
        from wdiff.scene import render

        for name, picture, frame, image in zip(self.files, self.pictures, self.frames, self.job.result()):
            render.save_png(self.folder / name, picture.finish(image, frame, self.cs))


def write_mesh(scene: Any, cs: Any, path: Path, max_points: int) -> None:
    """``mesh.ply`` of the scene, pooled further when needed so it has at most ``max_points`` vertices."""
    from wdiff.scene import mesh
    from wdiff.scene.ply import write_mesh_ply

    vertices, triangles = mesh.height_field(mesh.fit(scene, max_points), cs)
    write_mesh_ply(path, vertices, triangles)
