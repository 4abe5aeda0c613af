"""A run as a timeline: the intervals between its checkpoints, the training log joined to each
interval, and one row per tensor per interval (the rows of ``metrics.csv`` and of
``Results.metrics_frame``).

Reads a summary (``summary.json`` as a dict) only: no results file, no checkpoint. ``wdiff.metrics``
builds the run's other metrics on it; ``wdiff.results`` turns the rows into a pandas DataFrame or an
xarray Dataset. Formulas are in ``docs/metrics.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wdiff.naming import block_of

#: trainer_state.json log keys joined to each interval (the value logged last inside the interval).
LOG_KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss")
#: The columns of an interval row, in order (``metrics.csv``).
INTERVAL_COLUMNS = (
    "tensor", "block", "interval", "step_start", "step_end", "step_gap", "l1", "l2", "l1_per_step",
    "l2_per_step", "update_ratio", "weight_l2", "rotation", "nonfinite", *LOG_KEYS,
)  # fmt: skip


def safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b


@dataclass(frozen=True)
class Interval:
    """The pair of checkpoints (t, t+1) and its training steps; ``gap`` is None when steps are unknown."""

    index: int
    step_start: int | None
    step_end: int | None

    @property
    def gap(self) -> int | None:
        if self.step_start is None or self.step_end is None or self.step_end <= self.step_start:
            return None
        return self.step_end - self.step_start


def intervals(summary: dict[str, Any]) -> list[Interval]:
    steps = [c.get("step") for c in summary["checkpoints"]]
    return [Interval(i, a, b) for i, (a, b) in enumerate(zip(steps, steps[1:]))]


def _number(value: object) -> float | None:
    """A logged value as a float; None for anything else (strings, bools, ints too big for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _log(trainer_state: dict | None) -> list[dict]:
    """The entries of ``log_history`` that are objects: anything else in the file is ignored."""
    history = (trainer_state or {}).get("log_history") if isinstance(trainer_state, dict) else None
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def log_join(trainer_state: dict | None, spans: Sequence[Interval]) -> list[dict[str, float | None]]:
    """Loss, learning rate, grad norm and eval loss for each interval: the value logged last at a
    step in ``(step_start, step_end]``, i.e. at or just before the checkpoint that ends it. None when
    nothing was logged in the interval (or there is no ``trainer_state.json``). Entries or values of
    the wrong type are ignored."""
    history = _log(trainer_state)
    joined = []
    for span in spans:
        values: dict[str, float | None] = dict.fromkeys(LOG_KEYS)
        if span.step_end is not None:
            for entry in history:
                step = _number(entry.get("step"))
                if step is None or not step <= span.step_end:
                    continue
                if span.step_start is not None and step <= span.step_start:
                    continue
                for key in LOG_KEYS:
                    value = _number(entry.get(key))
                    if value is not None:
                        values[key] = value
        joined.append(values)
    return joined


def log_series(trainer_state: dict | None, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key of the training log, for curves (wrong types ignored)."""
    pairs = [(_number(e.get("step")), _number(e.get(key))) for e in _log(trainer_state)]
    kept = [(s, v) for s, v in pairs if s is not None and math.isfinite(s) and v is not None]
    return [p[0] for p in kept], [p[1] for p in kept]


def interval_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per tensor per interval, tensors in the summary's order, with ``INTERVAL_COLUMNS``:
    the interval's L1 and L2 change, both per training step, the update ratio ‖ΔW‖/‖W(t)‖, the
    weight norm and the rotation against W(0) at its end, NaN/Inf count at its end, and the training
    log joined to it. None where a value is unknown (steps unknown, a norm of 0, no interval_l1)."""
    spans = intervals(summary)
    log = log_join(summary.get("trainer_state"), spans)
    rows = []
    for name, t in summary["tensors"].items():
        block = block_of(name)
        interval_l1 = t.get("interval_l1")
        for span, values in zip(spans, log):
            i = span.index
            dl2 = t["interval_l2"][i]
            dl1 = interval_l1[i] if interval_l1 is not None else None
            rows.append(
                {
                    "tensor": name,
                    "block": block,
                    "interval": i,
                    "step_start": span.step_start,
                    "step_end": span.step_end,
                    "step_gap": span.gap,
                    "l1": dl1,
                    "l2": dl2,
                    "l1_per_step": safe_ratio(dl1, span.gap),
                    "l2_per_step": safe_ratio(dl2, span.gap),
                    "update_ratio": safe_ratio(dl2, t["l2"][i]),
                    "weight_l2": t["l2"][i + 1],
                    "rotation": t["rotation"][i + 1] if len(t["rotation"]) > i + 1 else None,
                    "nonfinite": t["nonfinite"][i + 1],
                    **values,
                }
            )
    return rows
