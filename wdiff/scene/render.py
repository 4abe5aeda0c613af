"""The picture: Open3D renders the cloud headless, matplotlib adds title, colour bar and legend.

Open3D (about 2 s to import) and matplotlib are imported inside the functions, so importing wdiff
stays fast. Choices, each checked by looking at the output:

- ``defaultUnlit`` with post-processing off: the pixels are exactly the point colours, so they
  match the colour bar (post-processing tone-maps them: 0.5 grey comes out as 201, not 128).
- A dark background: the bright, high-change end of viridis stands out, the dark low end recedes.
- An oblique 3/4 view from the front right and above: the first tensor faces the camera and the
  stack recedes to the back right, so the top edge of every layer shows, labelled by block.
- The camera distance is solved so every tensor's corners are in the frame, and the point size is
  the on-screen size of one pooled cell, so layers read as surfaces, not as dust.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wdiff._files import atomic_write
from wdiff.scene.color import ColorScale
from wdiff.scene.layout import Scene

BACKGROUND = (0.086, 0.090, 0.110)  # dark blue-grey
FOREGROUND = (0.90, 0.91, 0.93)
MUTED = (0.62, 0.64, 0.68)
FRAME_RGB = (0.30, 0.32, 0.37)  # block frames: visible against the background, quieter than any data
FOV_DEG = 20.0  # vertical; mild perspective, so the far side of a wide block is not squeezed
AZIMUTH_DEG = 38.0  # camera to the right of the stack axis: it recedes to the right
ELEVATION_DEG = 24.0  # and above it
MAX_POINT_SIZE = 16.0
LABEL_CHAR_PX = 7.5  # about one character of the 9-point label font at 100 dpi
TITLE_EM = 0.6  # average character width of the title font, in em


@dataclass(frozen=True)
class Camera:
    """A pinhole camera looking at ``center`` from ``eye``, vertical field of view in degrees.

    ``near``/``far`` enclose the scene: set explicitly because ``OffscreenRenderer.setup_camera``
    derives the far plane from the camera's previous position, which culls small or flat scenes
    (a single point rendered nothing in Open3D 0.20).
    """

    center: np.ndarray
    eye: np.ndarray
    up: np.ndarray
    fov_deg: float
    near: float
    far: float

    def _basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        forward = self.center - self.eye
        forward = forward / np.linalg.norm(forward)
        right = np.cross(forward, self.up)
        right /= np.linalg.norm(right)
        return forward, right, np.cross(right, forward)

    def project(self, points: np.ndarray, width: int, height: int) -> np.ndarray:
        """Pixel coordinates (x right, y down) of world points, as Open3D's renderer draws them."""
        forward, right, up = self._basis()
        rel = np.asarray(points, dtype=np.float64) - self.eye
        depth = rel @ forward
        focal = (height / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)
        x = width / 2.0 + focal * (rel @ right) / depth
        y = height / 2.0 - focal * (rel @ up) / depth
        return np.stack([x, y], axis=-1)


def fit_camera(
    points: np.ndarray,
    aspect: float,
    *,
    fov_deg: float = FOV_DEG,
    azimuth_deg: float = AZIMUTH_DEG,
    elevation_deg: float = ELEVATION_DEG,
    margin: float = 0.94,
) -> Camera:
    """The closest camera in the given direction whose frame holds every point, centred on them.

    ``points`` is a silhouette (the corners of every tensor's rectangle), not the whole cloud. A
    point's need is its offset along the view axis plus its sideways offset over the half-angle
    tangent; the largest need sets the distance. The aim point is then moved so the projected
    extent is centred (perspective makes it lopsided), and the distance solved again.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    back = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    world_up = np.array([0.0, 1.0, 0.0])
    right = np.cross(-back, world_up)
    right /= np.linalg.norm(right)
    up = np.cross(right, -back)
    tan_v = math.tan(math.radians(fov_deg) / 2.0) * margin
    tan_h = tan_v * aspect
    center = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    extent = max(float(np.ptp(pts, axis=0).max()), 1.0)

    def distance(c: np.ndarray) -> float:
        rel = pts - c
        need = rel @ back + np.maximum(np.abs(rel @ right) / tan_h, np.abs(rel @ up) / tan_v)
        return max(float(need.max()), 1e-3 * extent)

    for _ in range(4):
        d = distance(center)
        rel = pts - center
        depth = d - rel @ back
        xn, yn = (rel @ right) / (depth * tan_h), (rel @ up) / (depth * tan_v)
        center = center + right * (xn.max() + xn.min()) / 2 * d * tan_h
        center = center + up * (yn.max() + yn.min()) / 2 * d * tan_v
    d = distance(center)
    radius = float(np.linalg.norm(pts - center, axis=1).max()) + 1e-3 * extent
    near = max(d - radius * 1.05, d * 1e-3)
    return Camera(center, center + d * back, world_up, fov_deg, near, d + radius * 1.05)


def silhouette(scene: Scene) -> np.ndarray:
    """The four corners of every block's frame (or tensor, without frames), (4 * k, 3)."""
    corners = []
    for b in scene.blocks:
        left, right, top, bottom = b.frame
        corners += [(left, top, b.z), (right, top, b.z), (left, bottom, b.z), (right, bottom, b.z)]
    for p in scene.placements if not scene.blocks else ():
        if p.count:
            left, right, top, bottom = p.bounds
            z = p.origin[2]
            corners += [(left, top, z), (right, top, z), (left, bottom, z), (right, bottom, z)]
    if not corners:  # nothing to draw: frame the origin
        corners = [(-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)]
    return np.array(corners, dtype=np.float64)


def _focal_px(camera: Camera, height: int) -> float:
    return (height / 2.0) / math.tan(math.radians(camera.fov_deg) / 2.0)


def _nearest_depth(camera: Camera, points: np.ndarray) -> float:
    forward = (camera.center - camera.eye) / np.linalg.norm(camera.center - camera.eye)
    return max(float(((np.asarray(points) - camera.eye) @ forward).min()), camera.near)


def limit_zoom(camera: Camera, cell: float, height: int, points: np.ndarray) -> Camera:
    """Back the camera off so one cell of the nearest layer spans at most ``MAX_POINT_SIZE`` pixels.

    A tiny model (a few cells) would otherwise fill the frame with cells far larger than any point
    can be drawn, leaving dots with wide gaps. Moving the eye back along the view axis by ``shift``
    adds ``shift`` to every depth.
    """
    wanted = cell * _focal_px(camera, height) / MAX_POINT_SIZE
    shift = wanted - _nearest_depth(camera, points)
    if shift <= 0:
        return camera
    back = (camera.eye - camera.center) / np.linalg.norm(camera.eye - camera.center)
    return replace(camera, eye=camera.eye + shift * back, near=camera.near + shift, far=camera.far + shift)


def point_size(camera: Camera, cell: float, height: int, points: np.ndarray) -> float:
    """Pixels covered by one pooled cell (``cell`` world units) on the layer nearest the camera.

    Sized for the nearest layer so it shows no gaps (which would mix in the layers behind it);
    farther layers then overlap their neighbours slightly, which costs nothing.
    """
    px = cell * _focal_px(camera, height) / _nearest_depth(camera, points)
    return float(np.clip(math.ceil(px - 1e-6), 1.0, MAX_POINT_SIZE))


def _linear_to_srgb(rgb: Sequence[float]) -> list[float]:
    c = np.asarray(rgb, dtype=np.float64)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055).tolist()


@contextlib.contextmanager
def _quiet_native_stdout() -> Iterator[None]:
    """Hold back what native code prints to stdout (Filament's 8-line engine banner).

    Open3D's renderer prints from C++, so ``contextlib.redirect_stdout`` cannot catch it, and the
    CLI's stdout must carry only its one-line summary. The text goes to a temporary file and is
    replayed on stderr only if rendering fails, where it helps diagnose a broken Vulkan setup.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as held:
        try:
            os.dup2(held.fileno(), 1)
            yield
        except BaseException:
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


_kept: dict[tuple[int, int], Any] = {}  # size -> the one renderer kept (``keep_renderer``)
_keeping = False


def keep_renderer() -> None:
    """Keep the last renderer between pictures of the same size in this process (the picture
    worker does, ``wdiff.worker``): a new renderer costs about 0.05 s and its first frame 0.1-0.15 s
    more than the next ones (Filament's render targets and pipelines on the Vulkan software device).
    Elsewhere every ``Offscreen`` releases its renderer, so code that makes its own never has two."""
    global _keeping
    _keeping = True


def release_renderer() -> None:
    """Drop the renderer ``keep_renderer`` kept, and hand the memory it held back to the system.

    A kept renderer grows with the frames it draws (Filament's buffers for each frame's points, on
    the Vulkan software device): about 300 MiB after render.png, 600 MiB after four film frames of
    200,000 points. The film calls this in the picture worker after its last frame: nothing renders
    after it in a run, and the next picture (``wdiff watch``'s next update) makes a new renderer."""
    from wdiff import _heap

    _kept.clear()
    _heap.give_back_memory()


def _renderer(size: tuple[int, int]) -> Any:
    from open3d.visualization import rendering

    if size in _kept:
        return _kept[size]
    _kept.clear()  # release the engine before the next renderer is made (one at a time is safe)
    with _quiet_native_stdout():
        renderer = rendering.OffscreenRenderer(*size)
    if _keeping:
        _kept[size] = renderer
    return renderer


class Offscreen:
    """One headless Open3D renderer for several pictures of the same size (the frames of a film).

    ``with Offscreen((w, h)) as r: image = r.draw(xyz, rgb, camera, point_px)``; uint8 (h, w, 3).
    """

    def __init__(self, size: tuple[int, int], background: Sequence[float] = BACKGROUND) -> None:
        self.size = size
        self.background = background
        self._renderer: Any = None
        self._level: Any = None

    def __enter__(self) -> Offscreen:
        import open3d as o3d

        self._level = o3d.utility.get_verbosity_level()
        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)  # no "X11 GLFW init failed"
        self._renderer = _renderer(self.size)
        scene = self._renderer.scene
        # Filament takes the clear colour as sRGB and stores it linear; with post-processing
        # off nothing converts it back, so pre-encode it (0.5 grey would come out as 55).
        scene.set_background([*_linear_to_srgb(self.background), 1.0])
        scene.view.set_post_processing(False)
        return self

    def __exit__(self, *exc: object) -> None:
        import open3d as o3d

        self._renderer = None  # released unless kept (``keep_renderer``)
        o3d.utility.set_verbosity_level(self._level)

    def draw(
        self,
        xyz: np.ndarray,
        rgb: np.ndarray,
        camera: Camera,
        point_px: float,
        lines: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Render coloured points (and grey line segments: block frames) seen by ``camera``."""
        import open3d as o3d
        from open3d.visualization import rendering

        width, height = self.size
        scene = self._renderer.scene
        scene.clear_geometry()
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.astype(np.float64)))
        cloud.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64) / 255.0)
        material = rendering.MaterialRecord()
        material.shader = "defaultUnlit"
        material.point_size = float(point_px)
        scene.add_geometry("accumulated", cloud, material)
        if lines is not None and len(lines[1]):
            segments = o3d.geometry.LineSet(
                o3d.utility.Vector3dVector(lines[0]), o3d.utility.Vector2iVector(lines[1])
            )
            segments.paint_uniform_color(FRAME_RGB)
            line_material = rendering.MaterialRecord()
            line_material.shader = "unlitLine"
            line_material.line_width = 1.0
            scene.add_geometry("frames", segments, line_material)
        view = scene.camera
        view.set_projection(
            camera.fov_deg, width / height, camera.near, camera.far, rendering.Camera.FovType.Vertical
        )
        view.look_at(
            camera.center.astype(np.float32), camera.eye.astype(np.float32), camera.up.astype(np.float32)
        )
        with _quiet_native_stdout():
            image = np.asarray(self._renderer.render_to_image())
        return np.ascontiguousarray(image[:, :, :3])


@dataclass(frozen=True)
class Label:
    """Text drawn over the render at a pixel position (x right, y down)."""

    text: str
    x: float
    y: float


def block_labels(scene: Scene, camera: Camera, size: tuple[int, int], *, top: float = 0.0) -> list[Label]:
    """One label per depth slice (``h.0``, ``wpe + wte``...) at the top corner of its frame that is
    on the left in the picture (the frame's right edge when seen from behind).

    A label that would overlap the last one drawn is skipped, so deep stacks stay readable. ``top``
    shifts y into the figure.
    """
    labels: list[Label] = []
    last: tuple[float, float, float, float] | None = None  # text box: left, right, top, bottom
    for b in scene.blocks:
        if not any(p.count for p in scene.placements[b.first : b.end]):
            continue
        corners = np.array([[b.frame[0], b.frame[2], b.z], [b.frame[1], b.frame[2], b.z]])
        x, y = min(camera.project(corners, *size), key=lambda c: c[0])  # the top corner on the left
        y = max(y, 17.0)  # the text (16 px tall, above its corner) stays inside the picture
        text = " + ".join(short_block_name(part) for part in b.label.split(" + "))
        box = (x - LABEL_CHAR_PX * len(text) - 6.0, x, y - 16.0, y)
        if last is None or not _overlap(box, last):
            labels.append(Label(text, float(x) - 3.0, float(y) + top - 1.0))
            last = box
    return labels


def short_block_name(block: str) -> str:
    """A block's name as people say it: ``layer.0`` for ``bert.encoder.layer.0``, ``wte`` for
    ``transformer.wte``; ``encoder.``/``decoder.`` stay when present (``decoder.block.3``)."""
    parts = block.split(".")
    if parts[-1].isdigit() and len(parts) >= 2:
        short = parts[-2:]
        side = [p for p in parts[:-2] if p in ("encoder", "decoder")]
        return ".".join(side[-1:] + short)
    return parts[-1]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def frame_lines(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The rectangle around every slice as line segments: points (4k, 3) and index pairs (4k, 2)."""
    points, pairs = [], []
    for b in scene.blocks:
        left, right, top, bottom = b.frame
        base = len(points)
        points += [(left, top, b.z), (right, top, b.z), (right, bottom, b.z), (left, bottom, b.z)]
        pairs += [(base + i, base + (i + 1) % 4) for i in range(4)]
    return np.array(points, np.float64).reshape(-1, 3), np.array(pairs, np.int32).reshape(-1, 2)


def compose(
    image: np.ndarray,
    cs: ColorScale,
    *,
    size: tuple[int, int],
    top: int = 0,
    title: str = "",
    footer: str = "",
    labels: Sequence[Label] = (),
    flagged: int = 0,
) -> np.ndarray:
    """The render with colour bar, title, labels and legend as one uint8 RGB picture of exactly
    ``size``.

    The render goes at the left, ``top`` pixels below the top edge (room for the title).
    """
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    width, height = size
    img_h, img_w = image.shape[:2]
    # A Figure with its own Agg canvas: no pyplot, no global backend switch, nothing left open.
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor=BACKGROUND)
    FigureCanvasAgg(fig)
    # Given RGB, matplotlib stacks a float64 alpha plane on it and resamples the whole image in
    # float64 (about 85 MiB for a 1110 x 738 render); given opaque RGBA uint8, in float32 (about
    # 50 MiB). The pixels are the same.
    opaque = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    fig.figimage(opaque, xo=0, yo=height - top - img_h, origin="upper")
    outline = [patheffects.withStroke(linewidth=2.5, foreground=BACKGROUND)]
    for label in labels:
        # Right-aligned at the corner; near the left edge (no room for the text) left-aligned.
        room = label.x > LABEL_CHAR_PX * len(label.text) + 2
        fig.text(
            (label.x if room else 2.0) / width,
            1 - label.y / height,
            label.text,
            color=FOREGROUND,
            fontsize=9,
            ha="right" if room else "left",
            va="bottom",
            path_effects=outline,
        )
    if title:  # 14 pt, smaller when the picture is too narrow for the whole title
        size_pt = min(14.0, (width - 24) / (len(title) * TITLE_EM * 100 / 72))
        fig.text(12 / width, 1 - 10 / height, title, color=FOREGROUND, fontsize=size_pt, ha="left", va="top")
    if footer:
        fig.text(12 / width, 8 / height, footer, color=MUTED, fontsize=8, ha="left", va="bottom")

    norm = LogNorm(cs.vmin, cs.vmax) if cs.scale == "log" else Normalize(cs.vmin, cs.vmax)
    bar_left = (img_w + 24) / width
    bar_bottom = 0.14
    cax = fig.add_axes((bar_left, bar_bottom, 18 / width, img_h / height * 0.78 - 0.02))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cs.cmap), cax=cax, extend="min")
    bar.set_label(cs.label, color=FOREGROUND, fontsize=10)
    bar.outline.set_edgecolor(MUTED)
    cax.tick_params(colors=FOREGROUND, labelsize=8, which="both")
    if flagged:
        flag = tuple(c / 255 for c in cs.flag_rgb)
        fig.legend(
            handles=[Patch(color=flag, label=f"NaN/Inf\n({flagged:,} points)")],
            loc="lower left",
            bbox_to_anchor=(bar_left - 6 / width, 0.02),
            frameon=False,
            labelcolor=FOREGROUND,
            fontsize=8,
            handlelength=1.0,
        )
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def save_png(path: str | os.PathLike[str], picture: np.ndarray) -> None:
    """Write a uint8 RGB picture as PNG, atomically. zlib's default level, not Pillow's ``optimize``
    (level 9 and more filter passes): a 1280 x 800 render encodes in 0.05 s instead of 0.35 s, for a
    file 1% bigger."""
    from PIL import Image

    with atomic_write(path) as f:
        Image.fromarray(picture).save(f, format="png")
