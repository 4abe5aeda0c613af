"""Update size against the learning rate: per block and interval, how far the weights moved for the
learning rate they were given, and the findings drawn from it.

Three quantities per block and interval (formulas and thresholds in ``docs/metrics.md``):

- ``update``: the update ratio per step ``‖ΔW_b‖ / ‖W_b(t)‖ / g_t`` (``metrics.block_update``);
- ``per_lr``: the same divided by the learning rate of the interval (from ``trainer_state.json``): the
  block's *effective* learning rate, in weight-norm units, which a plain schedule leaves flat;
- ``peer_factor``: how many times more the block's tensors moved per step than the same tensors in
  the other blocks (``metrics.group_of``), in the same interval, so the learning rate and its schedule
  cancel: a param group with another learning rate shows here as its multiplier.

Findings (each ``{"kind", "tensor", "message", "steps"}``, made into ``findings.Finding`` there):
``stopped_moving`` (a block that moved, then stopped while the others kept moving) and ``lr_outlier``
(a block that moves far faster or slower than its peers).

    from wdiff import indicators, metrics
    ind = indicators.block_indicators(metrics.analyse(res), res.summary.get("trainer_state"))
    ind.peer_factor[ind.blocks.index("model.layers.2")]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wdiff.metrics import Interval, RunMetrics, log_series

KINDS = ("stopped_moving", "lr_outlier")

#: lr_outlier: a block whose tensors move this many times more (or less) per step than the same
#: tensors in the other blocks, as the median over the run's intervals. Healthy runs measured: at
#: most 1.3x; a param group at 10x learning rate: 8x (docs/metrics.md).
PEER_RATIO = 3.0
#: lr_outlier needs a tensor kind present in at least this many blocks (the block and two others).
PEER_MIN_GROUP = 3
#: stopped_moving: a block's update ratio per step at most this share of the median of the other
#: blocks' in every interval from some point to the end, after moving more than that before it.
#: Healthy runs measured: the slowest block moves at least 1/10 of the others (docs/metrics.md).
STOP_SHARE = 0.01
#: The rule of thumb for the update ratio of one step: "somewhere around 1e-3" (Karpathy, CS231n
#: "Neural Networks Part 3", ratio of weights:updates). Shown beside each block's ratio, never a
#: finding: between checkpoints the ratio per step is only a lower bound of the one-step ratio (steps
#: that go back and forth cancel), and on the planted runs a 33x learning rate measured 2.8e-3, below
#: the healthy digits-gpt2 sample's 3.3e-3 (docs/metrics.md).
RULE_OF_THUMB = 1e-3


@dataclass(frozen=True)
class BlockIndicators:
    """Per block (rows, network order) and interval (columns); NaN where a value is undefined."""

    blocks: list[str]
    spans: list[Interval]
    update: np.ndarray  # ‖ΔW_b‖ / ‖W_b(t)‖ / g_t
    learning_rate: np.ndarray  # (intervals,) the learning rate of each interval, NaN when not logged
    per_lr: np.ndarray  # update / learning_rate: the block's effective learning rate
    peer_factor: np.ndarray  # ‖ΔW‖ per step against the same tensors in other blocks (geometric)
    tensor_factor: dict[str, np.ndarray]  # the same per tensor, (intervals,)

    def factor(self, block: str) -> float:
        """The block's peer factor over the run: the median over the intervals that have one."""
        row = self.peer_factor[self.blocks.index(block)]
        row = row[np.isfinite(row)]
        return float(np.exp(np.median(np.log(row)))) if row.size else math.nan


def interval_learning_rate(trainer_state: dict | None, spans: Sequence[Interval]) -> np.ndarray:
    """The mean of the learning rates logged at steps in ``(s_t, s_{t+1}]`` (the schedule moves
    inside an interval; its last value alone would make a decaying interval look faster); NaN when
    nothing was logged there."""
    steps, rates = log_series(trainer_state, "learning_rate")
    out = np.full(len(spans), np.nan)
    for span in spans:
        if span.step_end is None:
            continue
        start = -math.inf if span.step_start is None else span.step_start
        inside = [r for s, r in zip(steps, rates) if start < s <= span.step_end and math.isfinite(r)]
        if inside:
            out[span.index] = float(np.mean(inside))
    return out


def _learning_rate(m: RunMetrics, trainer_state: dict | None) -> np.ndarray:
    if trainer_state is not None:
        return interval_learning_rate(trainer_state, m.spans)
    logged = [v.get("learning_rate") for v in m.log]
    return np.array([np.nan if v is None else v for v in logged], dtype=np.float64)


def _tensor_factors(m: RunMetrics) -> dict[str, np.ndarray]:
    """Per tensor and interval, ``exp(log r - median of log r over its group)`` with ``r`` = ‖ΔW‖ per
    step: tensors of one kind have one shape, so their steps compare directly (the update *ratio*
    would understate a faster block, whose weights also grow: 3.3x instead of 8x on the planted run)."""
    bad = {t["tensor"] for t in m.tensors if t["nonfinite_first"] is not None}
    group = {t["tensor"]: t["group"] for t in m.tensors}
    cells: dict[tuple[str, int], list[tuple[str, float]]] = defaultdict(list)
    for row in m.intervals:
        name, rate = row["tensor"], row["l2_per_step"] if row["step_gap"] else row["l2"]
        if group[name] and name not in bad and rate is not None and rate > 0 and math.isfinite(rate):
            cells[(group[name], row["interval"])].append((name, math.log(rate)))
    out: dict[str, np.ndarray] = {}
    for (_, i), members in cells.items():
        if len(members) < PEER_MIN_GROUP:
            continue
        median = float(np.median([x for _, x in members]))
        for name, x in members:
            out.setdefault(name, np.full(len(m.spans), np.nan))[i] = math.exp(x - median)
    return out


def block_indicators(m: RunMetrics, trainer_state: dict | None = None) -> BlockIndicators:
    """The indicators of every block. ``trainer_state`` gives each interval's mean learning rate;
    without it, the rate logged last in the interval (``m.log``) is used."""
    lr = _learning_rate(m, trainer_state)
    tensor_factor = _tensor_factors(m)
    block_of = {t["tensor"]: t["block"] for t in m.tensors}
    peer = np.full(m.block_update.shape, np.nan)
    for b, block in enumerate(m.blocks):
        mine = [np.log(f) for name, f in tensor_factor.items() if block_of[name] == block]
        if mine:
            stack = np.array(mine)
            for i in range(stack.shape[1]):
                col = stack[:, i][np.isfinite(stack[:, i])]
                if col.size:
                    peer[b, i] = math.exp(float(np.median(col)))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_lr = np.where(lr > 0, m.block_update / lr, np.nan)
    return BlockIndicators(list(m.blocks), list(m.spans), m.block_update, lr, per_lr, peer, tensor_factor)


def _when(span: Interval) -> str:
    return f"step {span.step_start}" if span.step_start is not None else f"checkpoint {span.index}"


def _loss_text(m: RunMetrics, first: int) -> str:
    """'while the loss still fell (0.104 at step 200 -> 0.083 at step 400)' when the log says so."""
    before = m.log[first - 1].get("loss") if first >= 1 else None
    last = next((v["loss"] for v in reversed(m.log) if v.get("loss") is not None), None)
    if before is None or last is None:
        return "while the other blocks kept moving"
    trend = "still fell" if last < before else "did not fall"
    return (
        f"while the other blocks kept moving and the loss {trend} "
        f"({before:.4g} at {_when(m.spans[first])} -> {last:.4g} at step {m.spans[-1].step_end})"
    )


def _stopped(m: RunMetrics, ind: BlockIndicators) -> list[dict[str, Any]]:
    """A block that moved and then, from some interval to the end, moved less than ``STOP_SHARE``
    of the median of the other blocks in every interval (a whole-run freeze is ``frozen``)."""
    found = []
    update = np.nan_to_num(ind.update, nan=0.0)
    for b, block in enumerate(ind.blocks):
        others = np.delete(update, b, axis=0)
        if others.shape[0] == 0:
            continue
        base = np.median(others, axis=0)
        low = update[b] <= STOP_SHARE * base
        moving = (base > 0) & (update[b] > 0)
        first = len(low)
        while first > 0 and low[first - 1] and base[first - 1] > 0:
            first -= 1
        if first == len(low) or first == 0 or not moving[:first].any():
            continue
        steps = [ind.spans[first].step_start] if ind.spans[first].step_start is not None else None
        share = float(np.max(update[b, first:] / base[first:]))
        found.append(
            {
                "kind": "stopped_moving",
                "tensor": block,
                "steps": steps,
                "message": (
                    f"{block} stopped moving after {_when(ind.spans[first])} "
                    f"{_loss_text(m, first)}: from there its update per step is at most {share:.2g} of "
                    f"the other blocks' median (before: {update[b, first - 1] / base[first - 1]:.2g}). "
                    "Its param group's learning rate went to 0 (a scheduler or LR multiplier per group, "
                    "a layer frozen mid-run by a callback), or it stopped getting gradients (the data "
                    "stopped using it: check the data loader, the tokens or inputs that reach it). Check "
                    "optimizer.param_groups and requires_grad at that step."
                ),
            }
        )
    return found


def _outliers(m: RunMetrics, ind: BlockIndicators, skip: set[str]) -> list[dict[str, Any]]:
    found = []
    span = [m.spans[0].step_start, m.spans[-1].step_end] if m.spans[0].step_start is not None else None
    for b, block in enumerate(ind.blocks):
        factor = ind.factor(block)
        if block in skip or not math.isfinite(factor) or 1 / PEER_RATIO < factor < PEER_RATIO:
            continue
        faster = factor > 1
        kinds = sorted(
            (
                (float(np.exp(np.nanmedian(np.log(f)))), name)
                for name, f in ind.tensor_factor.items()
                if name.startswith(block + ".") and np.isfinite(f).any()
            ),
            reverse=faster,
        )
        most = ", ".join(f"{name[len(block) + 1 :]} {f:.2g}x" for f, name in kinds[:3])
        size = factor if faster else 1 / factor
        hint = (
            "A param group with a higher learning rate (or an LR multiplier) for this block, or a "
            "missing weight decay? Check optimizer.param_groups; lower its learning rate if that was "
            "not meant."
            if faster
            else "A param group with a lower learning rate, a partly frozen block, or gradients that "
            "vanish at this depth? Check optimizer.param_groups and its gradient norm."
        )
        found.append(
            {
                "kind": "lr_outlier",
                "tensor": block,
                "steps": span,
                "message": (
                    f"{block} moves {size:.1f}x {'faster' if faster else 'slower'} than its peers per "
                    "unit of learning rate (‖ΔW‖ per step against the same tensors in the other blocks, "
                    f"median over {np.isfinite(ind.peer_factor[b]).sum()} intervals; most: {most}). {hint}"
                ),
            }
        )
    return found


def findings(m: RunMetrics) -> list[dict[str, Any]]:
    """The update-size findings of a run, as ``findings.Finding`` keyword arguments: stopped blocks
    first, then peer outliers (a stopped block is not also called slow)."""
    if not m.spans:
        return []
    ind = block_indicators(m)
    stopped = _stopped(m, ind)
    skip = {f["tensor"] for f in stopped}
    return stopped + _outliers(m, ind, skip)
