"""The report's charts, drawn with matplotlib's object API (no pyplot state) into PNG bytes.

PNG rather than SVG: the SVG writer puts the w3.org namespace URL in the file, and a report that
must open offline is checked for having no URL at all. The PNG has no "Software" tag (matplotlib's
``savefig`` writes its home page there) for the same reason.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from wdiff.metrics import RunMetrics, log_series, ranges

DPI = 110
PROFILE_BINS = 2000  # per-row charts: at most this many bars


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_bytes(fig) -> bytes:
    """``fig`` as PNG: drawn once on an Agg canvas (its constrained layout with it), the pixels encoded
    by Pillow at the figure's dpi. The same bytes as ``savefig`` (checked on every chart of the
    sample and the LLM-shaped run), which lays the figure out twice more and draws it twice (once
    without rendering, to place the layout, once for the file): 10-15% of the chart's time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png", dpi=(fig.dpi, fig.dpi))
    return buf.getvalue()


def _checkpoint_lines(ax, steps: Sequence[int | None]) -> None:
    for s in steps:
        if s is not None:
            ax.axvline(s, color="0.85", lw=0.8, zorder=0)


def training_curves(m: RunMetrics, trainer_state: dict | None, steps: Sequence[int | None]) -> bytes:
    """Loss (train and eval), learning rate and grad norm from the training log, and beside them the
    whole model's update ratio per step at each interval (always available). Grey lines: checkpoints."""
    panels = [(k, *log_series(trainer_state, k)) for k in ("loss", "eval_loss", "learning_rate", "grad_norm")]
    have = {k: (x, y) for k, x, y in panels if x}
    n = 1 + (("loss" in have) or ("eval_loss" in have)) + ("learning_rate" in have) + ("grad_norm" in have)
    fig = new_figure(9, 2.2 * n)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    i = 0
    if "loss" in have or "eval_loss" in have:
        ax = axes[i]
        for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
            if key in have:
                ax.plot(*have[key], style, label=label, ms=3)
        ax.set_ylabel("loss")
        ax.legend(loc="upper right", fontsize=8)
        i += 1
    for key, label in (("learning_rate", "learning rate"), ("grad_norm", "grad norm")):
        if key in have:
            axes[i].plot(*have[key], "-", color="tab:green" if key == "learning_rate" else "tab:red")
            axes[i].set_ylabel(label)
            i += 1
    ax = axes[i]
    known = all(s.gap for s in m.spans)
    edges = [s.step_start for s in m.spans] + [m.spans[-1].step_end] if known else range(len(m.spans) + 1)
    ax.stairs(m.model_update, edges, color="tab:purple", lw=1.5, baseline=None)
    ax.set_ylabel("‖ΔW‖/‖W‖ per step" if known else "‖ΔW‖/‖W‖ per interval")
    if np.all(m.model_update > 0):
        ax.set_yscale("log")
    for a in axes:
        _checkpoint_lines(a, steps if known else [])
        a.grid(alpha=0.3)
    axes[-1].set_xlabel("training step" if known else "interval")
    return png_bytes(fig)


def block_heatmap(m: RunMetrics, short: Sequence[str]) -> bytes:
    """Blocks (rows, network order) x intervals (columns): ``||dW_block|| / ||W_block|| per step``,
    log colour scale, value written in each cell when the grid is small enough to read."""
    from matplotlib.colors import LogNorm

    data = m.block_update
    finite = data[np.isfinite(data) & (data > 0)]
    b, n = data.shape
    fig = new_figure(min(3 + 0.9 * n, 14), min(1.2 + 0.32 * b, 40))
    ax = fig.add_subplot()
    norm = (
        LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() < finite.max() else None
    )
    image = ax.imshow(np.where(data > 0, data, np.nan), aspect="auto", cmap="viridis", norm=norm)
    labels = [f"{s.step_start}-{s.step_end}" if s.step_start is not None else str(s.index) for s in m.spans]
    ticks = list(range(0, n, max(1, math.ceil(n / 30))))  # at most ~30 interval labels
    rotate = {"rotation": 45, "ha": "right"} if n > 6 else {}
    ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=8, **rotate)
    ax.set_yticks(range(b), short, fontsize=8)
    ax.set_xlabel("interval (steps)")
    if b * n <= 400 and finite.size:
        mid = math.sqrt(finite.min() * finite.max())
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w" if v < mid else "k")
    fig.colorbar(image, ax=ax, label="‖ΔW‖/‖W‖ per step")
    return png_bytes(fig)


def row_profile(name: str, rows: np.ndarray) -> bytes:
    """Per-row accumulated change of one tensor; rows that never changed marked in red."""
    fig = new_figure(9, 2.0)
    ax = fig.add_subplot()
    # A picture ~1000 pixels wide cannot show more rows: above PROFILE_BINS rows, draw the maximum
    # of each bin of rows (a 150k-token vocabulary drew for minutes as bars, 10 s as a filled path).
    values = np.where(np.isfinite(rows), rows, 0)
    width = max(1, math.ceil(rows.size / PROFILE_BINS))
    if width > 1:
        values = np.pad(values, (0, -values.size % width)).reshape(-1, width).max(axis=1)
    edges = np.minimum(np.arange(values.size + 1) * width, rows.size) - 0.5
    ax.stairs(values, edges, fill=True, color="tab:blue")
    zero = ranges(np.flatnonzero(rows == 0))
    if zero:  # one collection of red spans under the rows that never changed
        spans = [(first - 0.5, last - first + 1) for first, last in zero]
        ax.broken_barh(spans, (0, 1), transform=ax.get_xaxis_transform(), color="tab:red", alpha=0.35)
        ax.plot([], [], color="tab:red", alpha=0.35, lw=6, label="never changed")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("row (token / position / output unit)")
    ax.set_ylabel("accumulated |ΔW|")
    ax.set_xlim(-0.5, rows.size - 0.5)
    return png_bytes(fig)


def ratio_bars(labels: Sequence[str], ratios: Sequence[float], title: str) -> bytes:
    """Horizontal bars on a log axis centred on 1 (compare: run B / run A per block)."""
    fig = new_figure(8, 1.0 + 0.3 * len(labels))
    ax = fig.add_subplot()
    values = np.array([r if r and math.isfinite(r) and r > 0 else np.nan for r in ratios], dtype=float)
    y = np.arange(len(labels))
    ax.barh(y, np.log2(values), color=np.where(values >= 1, "tab:orange", "tab:blue"))
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ticks = ax.get_xticks()
    ax.set_xticks(ticks, [f"{2.0**t:.3g}x" for t in ticks])
    ax.set_xlabel("B / A (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return png_bytes(fig)
