"""``scene.html``: the scene as one self-contained HTML file with a small WebGL viewer.

No network and no libraries: the page (``assets/viewer.html``), the viewer (``assets/viewer.js``,
about 250 lines) and the data are inlined, so the file opens by double-click and can be mailed to a
colleague. Data are base64 in a JSON block: positions quantized to uint16 over the model's
bounding box (sub-cell precision for up to 65,535 cells a side), colours as uint8 RGB, values as
float32 (shown on hover), the tensor of each point as uint32, and per tensor the name, shape and
pooling needed to say which weights a point stands for. Size: about 15 bytes a point before
base64, so 4 MB for the default 200,000 points.
"""

from __future__ import annotations

import base64
import html
import json
import os
import string
from importlib import resources

import numpy as np

from wdiff._files import atomic_write
from wdiff.scene.color import ColorScale, lookup_table, point_colors
from wdiff.scene.layout import Scene, coarsen_scene
from wdiff.scene.options import VIEWS
from wdiff.scene.render import BACKGROUND, FRAME_RGB, short_block_name


def script_json(data: object) -> str:
    """JSON to inline in a ``<script>`` element, whatever strings it holds (tensor names are the
    checkpoint's): ``<``, ``>`` and ``&`` as ``\\u`` escapes, so no ``</script>``, ``<!--`` or
    ``<script`` can end the element or switch the HTML parser into its escaped states; U+2028 and
    U+2029 too (line terminators to older JavaScript parsers). ``JSON.parse`` gives back the same
    strings."""
    text = json.dumps(data, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                          ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escaped)
    return text


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _gradient(cs: ColorScale) -> str:
    table = lookup_table(cs.cmap)
    stops = [table[int(k)] for k in np.linspace(0, len(table) - 1, 17)]
    return ", ".join(f"rgb({r},{g},{b}) {100 * i / 16:.1f}%" for i, (r, g, b) in enumerate(stops))


def _ticks(cs: ColorScale) -> str:
    if cs.scale == "log":
        lo, hi = np.log10(cs.vmin), np.log10(cs.vmax)
        marks = [(10**e, (e - lo) / (hi - lo)) for e in range(int(np.ceil(lo)), int(np.floor(hi)) + 1)]
        marks = marks or [(cs.vmin, 0.0), (cs.vmax, 1.0)]
    else:
        marks = [(cs.vmin + f * (cs.vmax - cs.vmin), f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return "".join(f'<span style="bottom:{100 * f:.1f}%">{v:.3g}</span>' for v, f in marks)


def scene_data(scene: Scene, cs: ColorScale, view: str = "oblique") -> dict:
    """The JSON the viewer reads: quantized positions, colours, values and what each point is."""
    xyz = scene.xyz.astype(np.float64)
    lo = xyz.min(axis=0) if len(scene) else np.zeros(3)
    extent = np.maximum(np.ptp(xyz, axis=0), 1e-6) if len(scene) else np.ones(3)
    quantized = np.round((xyz - lo) / extent * 65535).astype("<u2")
    azimuth, elevation = VIEWS[view]
    return {
        "positions": _b64(quantized),
        "colors": _b64(point_colors(scene.value, scene.tensor_index, cs).astype(np.uint8)),
        "values": _b64(scene.value.astype("<f4")),
        "tensor_index": _b64(scene.tensor_index.astype("<u4")),
        "box_min": lo.tolist(),
        "box_extent": extent.tolist(),
        "cell": float(scene.pool_factor),
        "camera": {"azimuth": azimuth, "elevation": elevation},
        "background": list(BACKGROUND),
        "frame_rgb": list(FRAME_RGB),
        "quantity": cs.quantity,
        "tensors": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "rows": p.rows,
                "cols": p.cols,
                "block": list(p.block),
                "grid": list(p.grid),
                "start": p.start,
            }
            for p in scene.placements
        ],
        "blocks": [
            {
                "label": " + ".join(short_block_name(s) for s in b.label.split(" + ")),
                "frame": list(b.frame),
                "z": b.z,
            }
            for b in scene.blocks
        ],
    }


def write_html(
    scene: Scene,
    cs: ColorScale,
    path: str | os.PathLike[str],
    title: str = "",
    max_points: int = 200_000,
) -> None:
    """Write the viewer with at most ``max_points`` points (the scene pooled further, exactly)."""
    shown = coarsen_scene(scene, max_points)
    s = shown.pool_factor
    cell = "one weight" if s == 1 else f"the {shown.pool} of {s}x{s} weights"
    subtitle = f"{len(shown.names)} tensors in {len(shown.blocks)} blocks; {len(shown):,} points, each {cell}"
    assets = resources.files("wdiff.scene").joinpath("assets")
    script = assets.joinpath("viewer.js").read_text(encoding="utf-8")
    template = string.Template(assets.joinpath("viewer.html").read_text(encoding="utf-8"))
    data = script_json(scene_data(shown, cs))
    page = template.substitute(
        title=html.escape(title or "wdiff scene"),
        subtitle=html.escape(f"{subtitle}; {cs.legend}"),
        bg="rgb({},{},{})".format(*(round(255 * c) for c in BACKGROUND)),
        gradient=_gradient(cs),
        ticks=_ticks(cs),
        bar_label=html.escape(cs.label),
        data=data,
        script=script,
    )
    with atomic_write(path) as f:
        f.write(page.encode("utf-8"))
