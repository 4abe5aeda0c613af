"""What an export logs, for every writer alike: a results folder as named series over training steps.

``RunSeries.load(OUT)`` reads the results (``summary.json``, ``rows.safetensors`` through
``wdiff.metrics.analyse``, ``findings.json``, ``render*.png``, ``frames.gif``), never a checkpoint, and
holds:

- ``scalars``: tag -> one value per checkpoint (None where the quantity has no value there: a
  per-interval quantity at the first checkpoint, a ratio whose denominator is 0). A per-interval
  quantity sits at the checkpoint that ends its interval.
- ``pictures`` at the last checkpoint (``render.png``, ``render-<view>.png``) and ``frames(first)``:
  each interval's frame of ``frames.gif`` at the checkpoint that ends it.
- ``texts`` at the last checkpoint: the run in one line, the findings, what to change (markdown).

Tags are ``<level>.<metric>/<subject>``: TensorBoard and W&B both group charts by what comes before
the first ``/`` (TensorBoard's time series: ``tag.split("/", 1)[0]``), so each group is one quantity
and holds one chart per block (``block.update_ratio_per_step/model.layers.7``) or per tensor
(``tensor.l2_per_step/model.layers.7.mlp.up_proj.weight``), in network order. The names and formulas
are in ``docs/integrations.md``; each is one of ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wdiff.errors import WdiffError
from wdiff.findings import Finding

#: The x axis of every series (also the W&B step metric): the training step of each checkpoint, named
#: as the Hugging Face Trainer's W&B integration names it, so that wdiff's charts and the training
#: run's share their x axis in one W&B project.
STEP_KEY = "train/global_step"


@dataclass(frozen=True)
class Metric:
    level: str  # "model", "block" or "tensor"
    name: str
    per: str  # "interval": at the checkpoint that ends it; "checkpoint": at every checkpoint
    description: str  # what it is, for TensorBoard's card and the docs

    def tag(self, subject: str = "") -> str:
        return f"model/{self.name}" if self.level == "model" else f"{self.level}.{self.name}/{subject}"


#: Every scalar an export logs. Notation of docs/metrics.md: dW_t = W(t+1) - W(t) over the interval
#: ending at this step, g_t its gap in training steps (1 when the steps are unknown).
METRICS = (
    Metric(
        "model", "update_ratio_per_step", "interval",
        "||dW|| / ||W(t)|| / g over every tensor together: the whole model's relative update per "
        "training step (wdiff metrics.analyse: model_update).",
    ),
    Metric(
        "model", "l1_per_step", "interval",
        "sum |dW| / g over every tensor: how much all weights moved per training step.",
    ),
    Metric(
        "block", "update_ratio_per_step", "interval",
        "sqrt(sum ||dW||^2) / sqrt(sum ||W(t)||^2) / g over the block's tensors: the block's relative "
        "update per training step (block_update, the report's heatmap).",
    ),
    Metric(
        "block", "l1_per_step", "interval",
        "sum |dW| / g over the block's tensors: how much the block's weights moved per training step.",
    ),
    Metric(
        "tensor", "l2_per_step", "interval",
        "||dW|| / g: the tensor's L2 change per training step (metrics.csv l2_per_step).",
    ),
    Metric(
        "tensor", "update_ratio", "interval",
        "||dW|| / ||W(t)||: the tensor's relative update over the interval (metrics.csv update_ratio).",
    ),
    Metric(
        "tensor", "relative_change", "checkpoint",
        "||W(t) - W(0)|| / ||W(0)||: how far the tensor is from where it started, against its size "
        "(summary.json distance_l2[t] / l2[0]; the last value is relative_change).",
    ),
    Metric(
        "tensor", "rotation", "checkpoint",
        "1 - cos(W(t), W(0)): layer rotation since the start (summary.json rotation[t]).",
    ),
    Metric(
        "tensor", "weight_l2", "checkpoint",
        "||W(t)||: the tensor's weight norm (summary.json l2[t]).",
    ),
)  # fmt: skip

RUN_TEXT = "wdiff/run"
FINDINGS_TEXT = "wdiff/findings"
ADVICE_TEXT = "wdiff/what_to_change"
FRAMES_TAG = "frames/change_per_interval"
RENDER_GROUP = "render"


def steps_of(summary: dict[str, Any]) -> list[int]:
    """The x of each checkpoint: its training step, or its index (0, 1, ...) when a step is unknown
    or the steps do not increase (an explicit list without numbers in the names)."""
    steps = [c.get("step") for c in summary["checkpoints"]]
    if all(type(s) is int for s in steps) and all(a < b for a, b in zip(steps, steps[1:])):
        return steps  # type: ignore[return-value]
    return list(range(len(steps)))


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(a: Any, b: Any) -> float | None:
    a, b = _finite(a), _finite(b)
    return None if a is None or b is None or b == 0 else _finite(a / b)


@dataclass
class RunSeries:
    """One results folder as the series an export logs (see the module's docstring)."""

    out: Path
    summary: dict[str, Any] = field(repr=False)
    steps: list[int]
    scalars: dict[str, list[float | None]] = field(repr=False)
    descriptions: dict[str, str] = field(repr=False)
    pictures: list[tuple[str, Path]]  # (tag, file) at the last checkpoint
    texts: dict[str, str]  # tag -> markdown, at the last checkpoint
    tensors: list[dict[str, Any]] = field(repr=False)  # metrics.analyse(...).tensors: tensors.csv's rows
    findings: list[Finding]
    advice: list[str]  # the lines of "what to change"
    frames_gif: Path | None  # frames.gif when it holds one frame per interval

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> RunSeries:
        from wdiff.advice import what_to_change
        from wdiff.marker import regular_file
        from wdiff.metrics import analyse
        from wdiff.report.build import load, read_findings

        res = load(out)  # checked: one-line errors for anything that is not results
        m = analyse(res)
        summary = res.summary
        steps = steps_of(summary)
        count = len(steps)
        scalars: dict[str, list[float | None]] = {}
        descriptions: dict[str, str] = {}

        def put(metric: Metric, subject: str, values: list[float | None]) -> None:
            tag = metric.tag(subject)
            scalars[tag] = values
            descriptions[tag] = metric.description

        def per_interval(values: Any) -> list[float | None]:
            return [None, *(_finite(v) for v in values)]

        by = {(m_.level, m_.name): m_ for m_ in METRICS}
        put(by["model", "update_ratio_per_step"], "", per_interval(m.model_update))
        with np.errstate(invalid="ignore"):
            model_l1 = m.block_l1.sum(axis=0) if len(m.blocks) else np.full(count - 1, np.nan)
        put(by["model", "l1_per_step"], "", per_interval(model_l1))
        for b, block in enumerate(m.blocks):
            put(by["block", "update_ratio_per_step"], block, per_interval(m.block_update[b]))
            put(by["block", "l1_per_step"], block, per_interval(m.block_l1[b]))
        rows = iter(m.intervals)  # tensor by tensor, interval by interval (metrics.analyse)
        for name, t in summary["tensors"].items():
            spans = [next(rows) for _ in range(count - 1)]
            put(by["tensor", "l2_per_step"], name, per_interval(r["l2_per_step"] for r in spans))
            put(by["tensor", "update_ratio"], name, per_interval(r["update_ratio"] for r in spans))
            start = t["l2"][0]
            put(by["tensor", "relative_change"], name, [_ratio(d, start) for d in t["distance_l2"]])
            put(by["tensor", "rotation"], name, [_finite(r) for r in t["rotation"]])
            put(by["tensor", "weight_l2"], name, [_finite(v) for v in t["l2"]])

        folder = res.path
        renders = sorted(p.name for p in folder.glob("render*.png") if regular_file(folder, p.name))
        pictures = [(f"{RENDER_GROUP}/{name}", folder / name) for name in renders]
        try:
            found = read_findings(folder)
        except (ValueError, TypeError) as e:  # not JSON, or entries that are not findings
            raise WdiffError(folder / "findings.json", f"not findings as wdiff writes them: {e}") from None
        lines = what_to_change(found, "report.html", summary)
        gif = regular_file(folder, "frames.gif")
        series = cls(
            out=folder,
            summary=summary,
            steps=steps,
            scalars=scalars,
            descriptions=descriptions,
            pictures=pictures,
            texts={},
            tensors=m.tensors,
            findings=found,
            advice=lines,
            frames_gif=gif if gif is not None and _frame_count(gif) == count - 1 else None,
        )
        series.texts = {
            RUN_TEXT: series.run_line(),
            FINDINGS_TEXT: findings_markdown(found),
            ADVICE_TEXT: advice_markdown(lines),
        }
        return series

    def run_line(self) -> str:
        s = self.summary
        steps = [c.get("step") for c in s["checkpoints"]]
        span = f"steps {steps[0]} .. {steps[-1]}" if None not in steps else f"{len(steps)} checkpoints"
        return (
            f"`{s['source']}`: {len(s['tensors'])} tensors over {len(steps)} checkpoints ({span}); "
            f"results in `{self.out}`, report `{self.out / 'report.html'}` (wdiff {s['wdiff_version']})."
        )

    def points(self, first: int = 0) -> Iterator[tuple[int, int, dict[str, float]]]:
        """(checkpoint index, step, {tag: value}) for every checkpoint from ``first`` on; tags
        without a value there are left out."""
        for i in range(first, len(self.steps)):
            values = {tag: v[i] for tag, v in self.scalars.items() if v[i] is not None}
            yield i, self.steps[i], values  # type: ignore[misc]

    def frames(self, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(checkpoint index, RGB uint8 picture) of each interval's frame of ``frames.gif`` whose
        interval ends at or after checkpoint ``first``: interval t ends at checkpoint t + 1."""
        if self.frames_gif is None:
            return
        import imageio.v3 as iio

        for t, picture in enumerate(iio.imiter(self.frames_gif, extension=".gif")):
            if t + 1 >= first:
                yield t + 1, np.ascontiguousarray(picture[..., :3])

    def identity(self) -> list[dict[str, Any]]:
        """What says which run this is: each checkpoint's step and fingerprint."""
        return [
            {"step": c.get("step"), "fingerprint": c.get("fingerprint")} for c in self.summary["checkpoints"]
        ]


def _frame_count(path: Path) -> int:
    """Frames of a GIF, read from its headers (no frame is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e}") from None


def _cell(text: object) -> str:
    """Text for one markdown table cell: one line, no column break."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")


def findings_markdown(found: list[Finding]) -> str:
    if not found:
        return "no findings"
    lines = ["| # | kind | tensor | steps | message |", "|---|---|---|---|---|"]
    for i, f in enumerate(found, start=1):
        steps = ", ".join(map(str, f.steps or []))
        lines.append(f"| {i} | {_cell(f.kind)} | {_cell(f.tensor)} | {steps} | {_cell(f.message)} |")
    return "\n".join(lines)


def advice_markdown(lines: list[str]) -> str:
    """``advice.what_to_change``'s lines as markdown: the heading, then its numbered lines."""
    if not lines:
        return "nothing to change"
    head, *items = lines
    return "\n".join([_cell(head), "", *(_cell(item) for item in items)])
