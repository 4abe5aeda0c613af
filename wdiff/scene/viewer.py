"""``wdiff view OUT/``: the scene in an Open3D window: orbit (drag), zoom (wheel), and Ctrl+click a
point to see its tensor, the weights it stands for and its value.

Needs a display. Without a usable one it raises a ``WdiffError`` that points to ``render.png`` and
``scene.html`` (the CLI: one line, exit code 2). Usable is checked, not assumed from the environment:
``DISPLAY`` naming no running X server made Open3D fall back to headless mode and never return, and
``WAYLAND_DISPLAY`` alone made it spin; so before Open3D starts, a child process opens the X display
with Xlib (``XOpenDisplay``: connection and authorisation), under a time limit (``probe_display``).
The scene is rebuilt from the results with the pooling and colours the run used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wdiff.errors import WdiffError
from wdiff.scene.layout import Scene
from wdiff.schema import read_results

PROBE_SECONDS = 5.0
# Run in a child so that a display that hangs the handshake cannot hang wdiff (it is killed).
_X_PROBE = (
    "import ctypes, ctypes.util, sys\n"
    "name = ctypes.util.find_library('X11')\n"
    "if name is None: sys.exit(3)\n"
    "x = ctypes.CDLL(name)\n"
    "x.XOpenDisplay.restype = ctypes.c_void_p\n"
    "d = x.XOpenDisplay(None)\n"
    "sys.exit(0 if d else 1)\n"
)


def probe_display() -> str | None:
    """Why no window can open here (None: it can). Open3D's windows (GLFW) need an X server, XWayland
    on Wayland: ``DISPLAY`` must name one that accepts a connection within ``PROBE_SECONDS``."""
    if not sys.platform.startswith("linux"):
        return None
    display = os.environ.get("DISPLAY")
    if not display:
        if os.environ.get("WAYLAND_DISPLAY"):
            return "no display: DISPLAY is not set (WAYLAND_DISPLAY alone is not enough: it needs XWayland)"
        return "no display here (DISPLAY is not set)"
    import subprocess

    try:
        p = subprocess.run(
            [sys.executable, "-c", _X_PROBE],
            capture_output=True,
            timeout=PROBE_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"no display: the X server at DISPLAY={display} did not answer within {PROBE_SECONDS:g} s"
    except OSError as e:
        return f"cannot check the display: {e.strerror or e}"
    if p.returncode == 3:
        return "no display: libX11 is not installed, and the window needs it"
    if p.returncode != 0:
        return f"no display: cannot open the X display DISPLAY={display} (no X server there, or not allowed)"
    return None


def has_display() -> bool:
    """Whether a window can open here (``probe_display``)."""
    return probe_display() is None


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


def unproject(
    view: np.ndarray,
    projection: np.ndarray,
    pixel: tuple[float, float],
    depth: float,
    size: tuple[int, int],
) -> np.ndarray:
    """World position of a pixel (x right, y down) whose view-space depth is ``depth``.

    Open3D 0.20's ``Scene.render_to_depth_image`` gives view-space distances along the view axis
    (infinity where nothing was drawn), not the [0, 1] buffer ``Camera.unproject`` expects (seen).
    """
    w, h = size
    ndc_x, ndc_y = 2.0 * pixel[0] / w - 1.0, 1.0 - 2.0 * pixel[1] / h
    eye = np.array([ndc_x * depth / projection[0, 0], ndc_y * depth / projection[1, 1], -depth, 1.0])
    return (np.linalg.inv(view) @ eye)[:3]


def load(out: str | os.PathLike[str]) -> tuple[Scene, np.ndarray, str]:
    """The scene of a results folder, its colours and a title, as the run drew them."""

    from wdiff import scene as sc

    folder, summary = read_results(out)  # checked: marker, summary's shape, the maps; regular files only
    options = summary.get("scene") or {}
    built = sc.drawn_scene(folder, summary)
    colors = sc.colorize_scene(
        built, options.get("color_scale", "log"), options.get("normalize", "global"), sc.tensor_sizes(summary)
    )
    return built, colors.rgb, f"wdiff: {Path(summary.get('source', folder)).name}"


def view(out: str | os.PathLike[str]) -> None:
    """Open the window (blocks until it is closed)."""
    read_results(out)  # before the display: a folder that is not results is said first
    problem = probe_display()
    if problem is not None:
        raise WdiffError(
            out,
            f"{problem}, so no window: open render.png or scene.html in this folder instead "
            "(scene.html rotates in any browser)",
        )
    scene, rgb, title = load(out)
    Window(scene, rgb, title).run()


class Window:
    """The Open3D window of a scene. ``run()`` blocks until it is closed; ``pick(x, y, done)`` finds
    the point under a pixel of the 3-D view (what Ctrl+click does) and calls ``done(text)``."""

    def __init__(self, scene: Scene, rgb: np.ndarray, title: str, size: tuple[int, int] = (1280, 800)):
        import open3d as o3d
        from open3d.visualization import gui, rendering

        self.scene = scene
        self.app = gui.Application.instance
        self.app.initialize()
        self.window = self.app.create_window(title, *size)
        self.widget = gui.SceneWidget()
        self.widget.scene = rendering.Open3DScene(self.window.renderer)
        self.widget.scene.set_background([0.086, 0.090, 0.110, 1.0])
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(scene.xyz.astype(np.float64)))
        cloud.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64) / 255.0)
        material = rendering.MaterialRecord()
        material.shader = "defaultUnlit"
        material.point_size = 3.0
        self.widget.scene.add_geometry("accumulated", cloud, material)
        bounds = self.widget.scene.bounding_box
        self.widget.setup_camera(30.0, bounds, bounds.get_center())
        self.info = gui.Label("Ctrl+click a point: tensor, weights, value")
        self.window.add_child(self.widget)
        self.window.add_child(self.info)
        self.window.set_on_layout(self._layout)
        self.widget.set_on_mouse(self._mouse)

    def _layout(self, context: object) -> None:
        from open3d.visualization import gui

        frame = self.window.content_rect
        self.widget.frame = frame
        self.info.frame = gui.Rect(frame.x + 8, frame.y + 8, frame.width - 16, 24)

    def _mouse(self, event: Any) -> Any:
        from open3d.visualization import gui

        if event.type == gui.MouseEvent.Type.BUTTON_DOWN and event.is_modifier_down(gui.KeyModifier.CTRL):
            self.pick(event.x - self.widget.frame.x, event.y - self.widget.frame.y, self._show)
            return gui.Widget.EventCallbackResult.HANDLED
        return gui.Widget.EventCallbackResult.IGNORED

    def _show(self, text: str) -> None:
        def update() -> None:
            self.info.text = text

        self.app.post_to_main_thread(self.window, update)

    def pick(self, x: int, y: int, done: Callable[[str], None]) -> None:
        """Read the depth under pixel (x, y), turn it into a world position, name the nearest point."""
        camera = self.widget.scene.camera
        size = (self.widget.frame.width, self.widget.frame.height)

        def picked(depth_image: Any) -> None:
            depth = float(np.asarray(depth_image)[y, x])
            if not np.isfinite(depth) or depth <= 0:  # the background
                done("nothing here")
                return
            view = np.asarray(camera.get_view_matrix())
            projection = np.asarray(camera.get_projection_matrix())
            world = unproject(view, projection, (x, y), depth, size)
            done(describe(self.scene, nearest(self.scene, world)))

        self.widget.scene.scene.render_to_depth_image(picked)

    def run(self) -> None:
        self.app.run()
