"""Every choice about the 3D outputs in one frozen object, passed as ``wdiff.run(..., scene=...)``.

The CLI builds one from its options; a notebook builds one directly::

    wdiff.run("runs/x", "out/", scene=SceneOptions(max_points=200_000, pool="mean", mesh=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wdiff.checks import OptionError
from wdiff.scene.color import SCALES, Scale
from wdiff.scene.pooling import POOLS, Pool

Normalize = Literal["global", "tensor", "relative"]
NORMALIZE: tuple[str, ...] = ("global", "tensor", "relative")
#: Camera directions (azimuth, elevation in degrees) for ``views``; the first view is ``render.png``.
VIEWS: dict[str, tuple[float, float]] = {
    "oblique": (30.0, 28.0),  # front right, above: the input end in front, the stack receding
    "back": (-150.0, 28.0),  # the mirror of oblique from behind: the heads in front
    "side": (90.0, 12.0),  # the stack from its right side: depth runs left to right
    "top": (20.0, 70.0),  # from above: the top rows of every block
    "front": (0.0, 0.0),  # straight on: the first block
}
#: Where the input end of the network is in each view (the pictures' footers say it).
FACING = {
    "oblique": "input end in front",
    "back": "output end in front",
    "side": "input end on the left",
    "top": "input end in front",
    "front": "input end in front",
}


@dataclass(frozen=True)
class SceneOptions:
    """How the accumulated change is drawn.

    - ``max_points``: hard budget of points over the whole scene (``points.ply``, ``render.png``,
      ``mesh.ply``); one global pooling factor shrinks every tensor alike.
    - ``pool``: what a pooled cell shows, the ``max`` of its weights (hot spots stay visible) or the
      ``mean`` (the typical change).
    - ``color_scale``: ``log`` (change spans decades) or ``linear``.
    - ``normalize``: ``global`` (one scale for the whole model: which tensors moved most), ``tensor``
      (each tensor against its own maximum: where inside each tensor change concentrates) or
      ``relative`` (each weight's change over the RMS of its tensor's weights at the first checkpoint:
      how much a tensor moved for its size, so a norm scale near 1 and a matrix near 0.02 compare).
    - ``render``: write ``render.png`` (and one ``render-<view>.png`` per further view).
    - ``size``: (width, height) of every picture in pixels; ``views``: names from ``VIEWS``.
    - ``mesh``: also write ``mesh.ply``, every tensor as a height field with triangle faces.
    - ``frames``: also write ``frames.gif`` (and ``frames.mp4`` when an ffmpeg encoder is installed),
      one frame per interval; needs the per-interval maps the compute step writes.
    - ``html``: write ``scene.html`` (a self-contained WebGL viewer) with at most ``html_points``.
    - ``frame_points``: point budget of each frame.
    """

    max_points: int = 1_000_000
    pool: Pool = "max"
    color_scale: Scale = "log"
    normalize: Normalize = "global"
    render: bool = True
    size: tuple[int, int] = (1280, 800)
    views: tuple[str, ...] = ("oblique",)
    mesh: bool = False
    frames: bool = False
    html: bool = True
    html_points: int = 200_000
    frame_points: int = 200_000

    def __post_init__(self) -> None:
        # Errors name the parameter (a notebook's words); the CLI shows its flag (``--max-points``).
        _choice("pool", self.pool, POOLS)
        _choice("color_scale", self.color_scale, SCALES)
        _choice("normalize", self.normalize, NORMALIZE)
        for name in ("max_points", "html_points", "frame_points"):
            n = getattr(self, name)
            if int(n) < 1:
                raise OptionError(name, f"must be at least 1, got {n}")
        width, height = self.size
        if width < 320 or height < 240 or width > 8192 or height > 8192:
            raise OptionError("size", f"{width}x{height}: width 320..8192 and height 240..8192 pixels")
        if not self.views:
            raise OptionError("views", "needs at least one view")
        for view in self.views:
            _choice("views", view, tuple(VIEWS))
        if len(set(self.views)) != len(self.views):
            raise OptionError("views", f"names a view twice: {','.join(self.views)}")


def _choice(parameter: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OptionError(parameter, f"must be one of {', '.join(allowed)}; got {value!r}")


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x800"`` -> (1280, 800); an ``OptionError`` naming ``size`` for anything else."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise OptionError("size", f"must look like 1280x800, got {text!r}")
    return int(width), int(height)


def parse_views(text: str) -> tuple[str, ...]:
    """``"oblique,back"`` -> ("oblique", "back") (checked by ``SceneOptions``)."""
    return tuple(v.strip() for v in text.split(",") if v.strip())
