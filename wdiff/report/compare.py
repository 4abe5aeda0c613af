"""Compare two runs of the same architecture (different learning rates, seeds, data): per-tensor and
per-block ratios B / A, a side-by-side 3D render on one shared colour scale, and a report.

Writes into ``CMP/``: ``compare.csv`` (one row per tensor), ``compare.json`` (its ``schema``, runs,
tensors, blocks), ``side_by_side.png`` (unless ``render=False``) and ``report.html``.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wdiff.errors import WdiffError
from wdiff.metrics import RunMetrics, analyse, log_series, safe_ratio
from wdiff.report import figures
from wdiff.report import html as h
from wdiff.report.build import REPORT, csv_text, load, short_names, write_atomic, write_json_atomic
from wdiff.results import Results
from wdiff.schema import ACCUMULATED, COMPARE_SCHEMA, map_stored

if TYPE_CHECKING:
    from wdiff.scene.layout import Scene

COMPARE_CSV = "compare.csv"
COMPARE_JSON = "compare.json"
SIDE_BY_SIDE = "side_by_side.png"
#: per-tensor quantities compared; the ratio columns are ``<key>_ratio`` = B / A.
COMPARED = ("path_l1", "path_l2", "net_l2", "relative_change", "relative_path", "straightness", "rotation")
TOP = 10


@dataclass(frozen=True)
class Comparison:
    path: Path  # report.html
    tensors: list[dict[str, Any]]
    blocks: list[dict[str, Any]]


def check_same_architecture(a: Results, b: Results) -> None:
    """Same tensor names with the same shapes, or one line that says what differs."""
    ta, tb = a.summary["tensors"], b.summary["tensors"]
    only_a = [n for n in ta if n not in tb]
    only_b = [n for n in tb if n not in ta]
    shapes = [n for n in ta if n in tb and ta[n]["shape"] != tb[n]["shape"]]
    if not (only_a or only_b or shapes):
        return
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} tensors only in {a.path} (first: {only_a[0]})")
    if only_b:
        parts.append(f"{len(only_b)} tensors only in {b.path} (first: {only_b[0]})")
    if shapes:
        n = shapes[0]
        parts.append(f"{len(shapes)} with different shapes (first: {n} {ta[n]['shape']} vs {tb[n]['shape']})")
    raise WdiffError(b.path, "runs are not of the same architecture: " + "; ".join(parts))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise WdiffError(out, "output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / COMPARE_JSON).is_file():
        raise WdiffError(out, "output folder is not empty and holds no wdiff comparison; choose another -o")


def tensor_ratios(ma: RunMetrics, mb: RunMetrics) -> list[dict[str, Any]]:
    rows = []
    b_by_name = mb.by_name
    for ta in ma.tensors:
        tb = b_by_name[ta["tensor"]]
        row: dict[str, Any] = {"tensor": ta["tensor"], "block": ta["block"]}
        for key in COMPARED:
            row[f"a_{key}"] = ta[key]
            row[f"b_{key}"] = tb[key]
            row[f"{key}_ratio"] = safe_ratio(tb[key], ta[key])
        rows.append(row)
    return rows


def block_ratios(ma: RunMetrics, mb: RunMetrics) -> list[dict[str, Any]]:
    """Per block: summed L1 path length (sum of the accumulated map) of A and B, and B / A."""
    sums: dict[str, list[float]] = {block: [0.0, 0.0] for block in ma.blocks}
    b_by_name = mb.by_name
    for ta in ma.tensors:
        sums[ta["block"]][0] += ta["path_l1"]
        sums[ta["block"]][1] += b_by_name[ta["tensor"]]["path_l1"]
    return [
        {"block": block, "a_path_l1": a, "b_path_l1": b, "path_l1_ratio": safe_ratio(b, a)}
        for block, (a, b) in sums.items()
    ]


def _scene_of(res: Results, max_points: int) -> Scene:
    """The scene of one run at ``max_points``, max-pooled from its map; for results that store no map,
    the run's own scene (its cells pooled during compute) pooled further to ``max_points``."""
    from wdiff import scene
    from wdiff.scene.layout import coarsen_scene

    if map_stored(res.summary):
        return scene.build_scene(res.path / ACCUMULATED, res.names, max_points=max_points)
    return coarsen_scene(scene.drawn_scene(res.path, res.summary), max_points)


def side_by_side(a: Results, b: Results, labels: tuple[str, str], max_points: int = 200_000) -> bytes:
    """Both runs' scenes rendered on one shared colour scale (so equal colours mean equal change),
    next to each other."""
    from matplotlib.image import imread, imsave

    from wdiff import scene
    from wdiff.scene import color

    scenes = [_scene_of(r, max_points) for r in (a, b)]
    shared = color.color_scale(np.concatenate([s.value for s in scenes]), "log")
    pictures = []
    with tempfile.TemporaryDirectory(prefix="wdiff-compare-") as tmp:
        for s, label in zip(scenes, labels):
            path = Path(tmp) / "render.png"
            scene.render_scene(s, path, title=label, size=(960, 640), color_scale=shared)
            pictures.append(imread(path))
    joined = np.concatenate(pictures, axis=1)
    buf = io.BytesIO()
    imsave(buf, joined, format="png", metadata={"Software": None})
    return buf.getvalue()


def _curves(a: Results, b: Results, labels: tuple[str, str]) -> bytes | None:
    series = []
    for key in ("loss", "learning_rate"):
        pair = [log_series(r.summary.get("trainer_state"), key) for r in (a, b)]
        if any(x for x, _ in pair):
            series.append((key, pair))
    if not series:
        return None
    fig = figures.new_figure(9, 2.4 * len(series))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, pair) in zip(axes, series):
        for (x, y), label in zip(pair, labels):
            if x:
                ax.plot(x, y, label=label)
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    return figures.png_bytes(fig)


def compare(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    render: bool = True,
    max_points: int = 200_000,
) -> Comparison:
    """Compare the results folders ``run_a`` and ``run_b`` (two ``wdiff run`` outputs) into ``out``."""
    out = Path(out)
    a, b = load(run_a), load(run_b)
    check_same_architecture(a, b)
    _check_out(out)
    ma, mb = analyse(a), analyse(b)
    labels = (f"A: {a.path.name}", f"B: {b.path.name}")
    if a.path.name == b.path.name:
        labels = (f"A: {a.path}", f"B: {b.path}")
    tensors = tensor_ratios(ma, mb)
    blocks = block_ratios(ma, mb)
    out.mkdir(parents=True, exist_ok=True)
    picture = side_by_side(a, b, labels, max_points) if render else None
    if picture is not None:
        write_atomic(out / SIDE_BY_SIDE, picture)
    else:
        (out / SIDE_BY_SIDE).unlink(missing_ok=True)  # a stale picture from an earlier compare
    columns = (
        ["tensor", "block"]
        + [f"{p}_{k}" for k in COMPARED for p in ("a", "b")]
        + [f"{k}_ratio" for k in COMPARED]
    )
    write_atomic(out / COMPARE_CSV, csv_text(columns, tensors))
    document = {
        "schema": COMPARE_SCHEMA,
        "a": str(a.path),
        "b": str(b.path),
        "tensors": tensors,
        "blocks": blocks,
    }
    write_json_atomic(out / COMPARE_JSON, document)
    write_atomic(out / REPORT, _page(a, b, labels, tensors, blocks, picture))
    return Comparison(out / REPORT, tensors, blocks)


def _page(
    a: Results,
    b: Results,
    labels: tuple[str, str],
    tensors: list[dict],
    blocks: list[dict],
    picture: bytes | None,
) -> str:
    def run_row(label: str, r: Results) -> tuple:
        steps = [c.get("step") for c in r.summary["checkpoints"]]
        return (label, str(r.path), len(steps), f"{steps[0]}-{steps[-1]}", len(r.names))

    total_a = sum(t["a_path_l1"] for t in tensors)
    total_b = sum(t["b_path_l1"] for t in tensors)
    ranked = sorted((t for t in tensors if t["path_l1_ratio"] is not None), key=lambda t: t["path_l1_ratio"])
    cols = ["tensor", "A path L1", "B path L1", "B / A", "relative path B / A", "rotation A", "rotation B"]

    def row(t: dict) -> tuple:
        return (
            t["tensor"], t["a_path_l1"], t["b_path_l1"], t["path_l1_ratio"], t["relative_path_ratio"],
            t["a_rotation"], t["b_rotation"],
        )  # fmt: skip

    sections = [
        h.section(
            "Runs",
            h.table(
                ["", "results", "checkpoints", "steps", "tensors"], [run_row(*p) for p in zip(labels, (a, b))]
            ),
            h.paragraph(
                f"Total accumulated |ΔW|: A {total_a:.4g}, B {total_b:.4g}, B / A = "
                f"{(total_b / total_a if total_a else float('nan')):.3g}."
            ),
        )
    ]
    curves = _curves(a, b, labels)
    if curves is not None:
        sections.append(h.section("Training curves", h.image(curves, "image/png", "loss and learning rate")))
    sections.append(
        h.section(
            "Change per block, B / A",
            h.image(
                figures.ratio_bars(
                    short_names([x["block"] for x in blocks]),
                    [x["path_l1_ratio"] for x in blocks],
                    "accumulated |ΔW| of each block, B / A",
                ),
                "image/png",
                "per-block ratio",
            ),
        )
    )
    sections.append(
        h.section(
            "Tensors that differ most",
            "<h3>B moved most relative to A</h3>",
            h.table(cols, [row(t) for t in ranked[::-1][:TOP]]),
            "<h3>B moved least relative to A</h3>",
            h.table(cols, [row(t) for t in ranked[:TOP]]),
            h.paragraph(f"All {len(tensors)} tensors: {COMPARE_CSV} and {COMPARE_JSON} beside this report."),
        )
    )
    if picture is not None:
        sections.append(
            h.section(
                "3D view, one colour scale",
                h.image(picture, "image/png", "side-by-side render", "Both runs coloured on the same scale."),
            )
        )
    return h.page(f"{labels[0]} vs {labels[1]}", "wdiff compare: ratios are B / A", sections)
