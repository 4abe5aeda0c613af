"""``wdiff view OUT/``: the scene in an Open3D window: orbit (drag), zoom (wheel), and Ctrl+click a
point to see its tensor, the weights it stands for and its value.

Needs a display. Without one (``DISPLAY``/``WAYLAND_DISPLAY`` unset on Linux) it raises a
``WdiffError`` that points to ``render.png`` and ``scene.html`` (the CLI: one line, exit code 2).
The scene is rebuilt from the results with the pooling and colours the run used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from wdiff.errors import WdiffError
from wdiff.results import ACCUMULATED, SUMMARY
from wdiff.scene.layout import Scene


def has_display() -> bool:
    """Whether a window can open: on Linux an X11 or Wayland display must be named."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def describe(scene: Scene, point: int) -> str:
    """What a picked point is: ``tensor  [row, col] (or rows a..b, cols c..d)  value``."""
    name, (r0, r1), (c0, c1) = scene.locate(point)
    where = f"[{r0}, {c0}]" if r1 - r0 == 1 and c1 - c0 == 1 else f"rows {r0}..{r1 - 1}, cols {c0}..{c1 - 1}"
    shape = "x".join(str(d) for d in scene.placements[int(scene.tensor_index[point])].shape) or "scalar"
    return f"{name} ({shape})  {where}  |ΔW| = {float(scene.value[point]):.4g}"


def nearest(scene: Scene, position: np.ndarray) -> int:
    """The scene point closest to a 3-D position (where the user clicked)."""
    d = np.sum((scene.xyz.astype(np.float64) - np.asarray(position, np.float64)) ** 2, axis=1)
    return int(np.argmin(d))


def load(out: str | os.PathLike[str]) -> tuple[Scene, np.ndarray, str]:
    """The scene of a results folder, its colours and a title, as the run drew them."""
    import json

    from wdiff import scene as sc

    folder = Path(out)
    if not (folder / SUMMARY).is_file() or not (folder / ACCUMULATED).is_file():
        raise WdiffError(folder, "no wdiff results here (summary.json and accumulated.safetensors)")
    summary = json.loads((folder / SUMMARY).read_text())
    options = summary.get("scene") or {}
    built = sc.build_scene(
        folder / ACCUMULATED,
        list(summary["tensors"]),
        max_points=int(options.get("max_points", 1_000_000)),
        pool=options.get("pool", "max"),
    )
    colors = sc.colorize_scene(built, options.get("color_scale", "log"), options.get("normalize", "global"))
    return built, colors.rgb, f"wdiff: {Path(summary.get('source', folder)).name}"


def view(out: str | os.PathLike[str]) -> None:
    """Open the window (blocks until it is closed)."""
    if not (Path(out) / SUMMARY).is_file():
        raise WdiffError(out, "no wdiff results here (no summary.json)")
    if not has_display():
        raise WdiffError(
            out,
            "no display here (DISPLAY is not set), so no window: open render.png or scene.html "
            "in this folder instead (scene.html rotates in any browser)",
        )
    scene, rgb, title = load(out)
    _window(scene, rgb, title)


def _window(scene: Scene, rgb: np.ndarray, title: str) -> None:  # pragma: no cover - needs a display
    import open3d as o3d
    from open3d.visualization import gui, rendering

    app = gui.Application.instance
    app.initialize()
    window = app.create_window(title, 1280, 800)
    widget = gui.SceneWidget()
    widget.scene = rendering.Open3DScene(window.renderer)
    widget.scene.set_background([0.086, 0.090, 0.110, 1.0])
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(scene.xyz.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64) / 255.0)
    material = rendering.MaterialRecord()
    material.shader = "defaultUnlit"
    material.point_size = 3.0
    widget.scene.add_geometry("accumulated", cloud, material)
    bounds = widget.scene.bounding_box
    widget.setup_camera(30.0, bounds, bounds.get_center())
    info = gui.Label("Ctrl+click a point: tensor, weights, value")
    window.add_child(widget)
    window.add_child(info)

    def on_layout(context: object) -> None:
        frame = window.content_rect
        widget.frame = frame
        info.frame = gui.Rect(frame.x + 8, frame.y + 8, frame.width - 16, 24)

    def on_mouse(event: gui.MouseEvent) -> int:
        if event.type == gui.MouseEvent.Type.BUTTON_DOWN and event.is_modifier_down(gui.KeyModifier.CTRL):
            x, y = event.x - widget.frame.x, event.y - widget.frame.y

            def picked(depth_image: o3d.geometry.Image) -> None:
                depth = np.asarray(depth_image)[y, x]
                if depth >= 1.0:  # the background
                    text = "nothing here"
                else:
                    size = (widget.frame.width, widget.frame.height)
                    world = widget.scene.camera.unproject(x, y, depth, *size)
                    text = describe(scene, nearest(scene, world))

                def show() -> None:
                    info.text = text

                app.post_to_main_thread(window, show)

            widget.scene.scene.render_to_depth_image(picked)
            return gui.Widget.EventCallbackResult.HANDLED
        return gui.Widget.EventCallbackResult.IGNORED

    window.set_on_layout(on_layout)
    widget.set_on_mouse(on_mouse)
    app.run()
