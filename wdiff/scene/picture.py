"""A picture of a scene: level of detail, camera, labels and legend, shared by ``render.png``, the
extra views and every frame of the film (which must all use one camera and one colour scale).

``Picture.plan`` decides once, from a scene's layout, what the picture shows; ``Picture.draw`` then
renders any scene of that layout (the accumulated change, or one interval of it) with a given scale.
Its three steps can run in two processes: ``frame`` (what to render, numpy) and ``finish`` (title,
labels, colour bar: matplotlib) here, ``render_frames`` (Open3D) in the picture worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wdiff.scene import render
from wdiff.scene.color import ColorScale, point_colors
from wdiff.scene.layout import Scene, coarsen_scene
from wdiff.scene.options import FACING, VIEWS

PANEL_WIDTH = 170  # pixels right of the render: colour bar, its label, the NaN/Inf legend
TITLE_HEIGHT = 40  # pixels above the render when there is a title
FOOTER_HEIGHT = 22  # pixels below it: what a point stands for, which end is in front


@dataclass(frozen=True)
class Picture:
    """What one picture shows and from where; ``draw`` renders scenes of the planned layout."""

    size: tuple[int, int]
    title: str
    top: int
    view_size: tuple[int, int]
    budget: int  # points drawn at most: about one per 4 pixels
    camera: render.Camera
    point_px: float
    labels: tuple[render.Label, ...]
    view: str = "oblique"

    @classmethod
    def plan(
        cls,
        scene: Scene,
        size: tuple[int, int] = (1280, 800),
        title: str = "",
        view: str = "oblique",
        max_render_points: int | None = None,
    ) -> Picture:
        """Fit the camera of ``view`` to the whole model (every block's frame in the picture)."""
        width, height = size
        top = TITLE_HEIGHT if title else 0
        img_w, img_h = width - PANEL_WIDTH, height - top - FOOTER_HEIGHT
        if img_w < 64 or img_h < 64:
            raise ValueError(f"size {size} is too small for the picture")
        budget = max_render_points or img_w * img_h // 4
        shown = coarsen_scene(scene, budget)
        azimuth, elevation = VIEWS[view]
        outline = render.silhouette(shown)
        camera = render.fit_camera(outline, img_w / img_h, azimuth_deg=azimuth, elevation_deg=elevation)
        camera = render.limit_zoom(camera, shown.pool_factor, img_h, outline)
        point_px = render.point_size(camera, shown.pool_factor, img_h, outline)
        labels = render.block_labels(shown, camera, (img_w, img_h), top=top)
        return cls(size, title, top, (img_w, img_h), budget, camera, point_px, tuple(labels), view)

    def frame(self, scene: Scene, cs: ColorScale) -> Frame:
        """What this picture renders of ``scene`` coloured on ``cs``, and the legend's facts."""
        shown = coarsen_scene(scene, self.budget)
        s = shown.pool_factor
        cell = "one weight" if s == 1 else f"the {shown.pool} of {s}x{s} weights"
        footer = (
            f"{len(scene.names)} tensors in {len(scene.blocks)} blocks, {FACING[self.view]}; "
            f"{len(shown):,} points, each {cell}"
        )
        if scene.nonfinite:
            footer += f"; {scene.nonfinite:,} NaN/Inf weights"
        return Frame(
            shown.xyz,
            point_colors(shown.value, shown.tensor_index, cs),
            render.frame_lines(shown),
            footer,
            int(np.count_nonzero(~np.isfinite(shown.value))),
        )

    def render(self, renderer: render.Offscreen, frame: Frame) -> np.ndarray:
        """The Open3D render of ``frame`` (uint8 RGB of ``view_size``)."""
        return renderer.draw(frame.xyz, frame.rgb, self.camera, self.point_px, frame.lines)

    def finish(self, image: np.ndarray, frame: Frame, cs: ColorScale, *, stamp: str = "") -> np.ndarray:
        """The finished picture (uint8 RGB of ``size``): the render of ``frame`` with title, labels,
        colour bar and legend; ``stamp`` (a film frame's steps) is added to the title."""
        return render.compose(
            image,
            cs,
            size=self.size,
            title=f"{self.title}, {stamp}" if stamp else self.title,
            footer=frame.footer,
            top=self.top,
            labels=self.labels,
            flagged=frame.flagged,
        )

    def draw(
        self,
        renderer: render.Offscreen,
        scene: Scene,
        cs: ColorScale,
        *,
        stamp: str = "",
    ) -> np.ndarray:
        """The finished picture (uint8 RGB of ``size``) of ``scene`` coloured on ``cs``, rendered by
        ``renderer``; ``stamp`` (a film frame's steps) is added to the title."""
        frame = self.frame(scene, cs)
        return self.finish(self.render(renderer, frame), frame, cs, stamp=stamp)


@dataclass(frozen=True)
class Frame:
    """What a picture renders (its scene pooled to the picture's budget, coloured; the block frames
    as lines) and what its legend says of it."""

    xyz: np.ndarray  # (N, 3) float32
    rgb: np.ndarray  # (N, 3) uint8
    lines: tuple[np.ndarray, np.ndarray]  # points (4k, 3), index pairs (4k, 2)
    footer: str
    flagged: int  # NaN/Inf points drawn in the flag colour


def render_frames(pictures: Sequence[Picture], frames: Sequence[Frame]) -> list[np.ndarray]:
    """The Open3D render of each frame seen by its picture, with one renderer (the picture worker
    runs this: ``wdiff.scene.outputs``)."""
    with render.Offscreen(pictures[0].view_size) as renderer:
        return [p.render(renderer, f) for p, f in zip(pictures, frames)]
