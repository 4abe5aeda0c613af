"""Derived metrics of a finished run: per tensor, per block and per interval, with the training log.

Everything here reads the results folder (``summary.json``, ``rows.safetensors`` or, for folders
written before it existed, ``accumulated.safetensors``), never a checkpoint, so ``wdiff report OUT``
rebuilds it in seconds. Formulas are in ``docs/metrics.md``; the names below follow it. The intervals,
the training log joined to them and the per-interval rows are ``wdiff.timeline``'s (re-exported here).

    from wdiff.results import Results
    from wdiff import metrics
    m = metrics.analyse(Results.load("out/"))
    m.tensors[0]["straightness"], m.intervals[0]["update_ratio"], m.neuron_change["transformer.wte.weight"]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wdiff.naming import block_of
from wdiff.results import Results
from wdiff.timeline import LOG_KEYS as LOG_KEYS  # re-exported: the names metrics always offered
from wdiff.timeline import Interval as Interval
from wdiff.timeline import interval_rows, intervals, log_join
from wdiff.timeline import log_series as log_series
from wdiff.timeline import safe_ratio as safe_ratio


def group_of(name: str) -> str | None:
    """Tensors of the same kind in different blocks share a group: the block number becomes ``*``
    (``model.layers.7.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``). A tensor
    outside numbered blocks (embeddings, final norm, head) has no group."""
    block = block_of(name)
    head, _, number = block.rpartition(".")
    if not number.isdigit() or not name.startswith(block + "."):
        return None
    return f"{head}.*{name[len(block) :]}" if head else f"*{name[len(block) :]}"


def neuron_change(res: Results, name: str) -> np.ndarray:
    """The per-neuron change of one tensor: its accumulated map summed over each row (float64, length
    shape[0]; a 1-D tensor's rows are its elements, a scalar has one row): ``rows.safetensors`` when
    the run wrote it, else summed from the map."""
    shape = res.summary["tensors"][name]["shape"]
    if math.prod(shape) == 0:  # zero-size: nothing stored, every row unchanged by definition
        return np.zeros(shape[0] if shape else 1)
    try:
        return np.asarray(res.neuron_change(name), dtype=np.float64)
    except FileNotFoundError:  # results written before rows.safetensors existed: sum the map
        pass
    return _sum_rows(res.accumulated(name))


def neuron_changes(res: Results, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``neuron_change`` of every tensor in ``names``, opening ``rows.safetensors`` (or the map) once."""
    stored = [n for n in names if math.prod(res.summary["tensors"][n]["shape"])]
    try:
        found = res.neuron_change_of(stored)
    except FileNotFoundError:  # results written before rows.safetensors existed: sum the maps
        found = {n: _sum_rows(a) for n, a in res.accumulated_of(stored).items()}
    return {n: np.asarray(found[n], dtype=np.float64) if n in found else neuron_change(res, n) for n in names}


def _sum_rows(acc: np.ndarray) -> np.ndarray:
    acc = np.asarray(acc, dtype=np.float64)
    return acc.reshape(1) if acc.ndim == 0 else acc.reshape(acc.shape[0], -1).sum(axis=1)


@dataclass
class RunMetrics:
    """All derived metrics of one run (plain Python lists/dicts; the per-neuron change as numpy arrays)."""

    spans: list[Interval]
    tensors: list[dict[str, Any]]  # one entry per tensor, network order of the results
    intervals: list[dict[str, Any]]  # one entry per tensor per interval (the rows of metrics.csv)
    blocks: list[str]  # block names in network order
    block_update: np.ndarray  # (blocks, intervals): ||dW_block|| / ||W_block(t)|| per step
    block_l1: np.ndarray  # (blocks, intervals): sum |dW| of the block per step (nan without interval_l1)
    model_update: np.ndarray  # (intervals,): ||dW|| / ||W(t)|| per step over every tensor together
    log: list[dict[str, float | None]]  # the training log joined to each interval
    neuron_change: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # ``neuron_changes``

    @property
    def rows(self) -> dict[str, np.ndarray]:
        """Deprecated: ``neuron_change`` (the old name; "rows" also names a tensor's first dimension
        and table rows)."""
        warnings.warn("RunMetrics.rows is deprecated: use RunMetrics.neuron_change", DeprecationWarning, 2)
        return self.neuron_change

    @property
    def by_name(self) -> dict[str, dict[str, Any]]:
        return {t["tensor"]: t for t in self.tensors}


def _tensor_entry(name: str, t: dict[str, Any], steps: Sequence[int | None], rows: np.ndarray) -> dict:
    interval_l2 = [v if v is not None else math.nan for v in t["interval_l2"]]
    l2 = [v if v is not None else math.nan for v in t["l2"]]
    path_l2 = float(np.sum(interval_l2))
    mean_l2 = float(np.mean(l2)) if l2 else math.nan
    rotation = [r for r in t.get("rotation") or [] if r is not None]
    counts = t.get("nonfinite") or []
    first_bad = next((i for i, c in enumerate(counts) if c), None)
    finite_rows = rows[np.isfinite(rows)]
    return {
        "tensor": name,
        "block": block_of(name),
        "group": group_of(name),
        "shape": t["shape"],
        "dtype": t["dtype"] if isinstance(t["dtype"], str) else "/".join(t["dtype"]),
        "numel": t["numel"],
        "path_l1": t["accumulated_l1"],
        "path_l2": path_l2,
        "net_l2": t["net_l2"],
        "relative_change": t["relative_change"],
        "relative_path": safe_ratio(path_l2, mean_l2),
        "straightness": safe_ratio(t["net_l2"], path_l2),
        "mean_change": safe_ratio(t["accumulated_l1"], t["numel"]),
        "rotation": rotation[-1] if rotation else None,
        "l2_start": l2[0] if l2 else None,
        "l2_end": l2[-1] if l2 else None,
        "rows": int(rows.size),
        "rows_unchanged": int(np.count_nonzero(rows == 0)),
        "row_max": float(finite_rows.max()) if finite_rows.size else None,
        "nonfinite_first": first_bad,
        "nonfinite_step": steps[first_bad] if first_bad is not None else None,
        # ||W(t) - W(T-1)|| per checkpoint; None where not computed (an incremental pass, older results)
        "distance_last": list(t.get("distance_last_l2") or [None] * len(l2)),
    }


def analyse(res: Results) -> RunMetrics:
    """Derive every metric of ``docs/metrics.md`` from a results folder."""
    summary = res.summary
    spans = intervals(summary)
    steps = [c.get("step") for c in summary["checkpoints"]]
    log = log_join(summary.get("trainer_state"), spans)
    names = res.names
    change = neuron_changes(res, names)
    tensors = []
    per_interval = interval_rows(summary)  # the rows of metrics.csv (wdiff.timeline)
    blocks: list[str] = []
    dw_sq: dict[str, np.ndarray] = {}
    w_sq: dict[str, np.ndarray] = {}
    l1: dict[str, np.ndarray] = {}
    for name in names:
        t = summary["tensors"][name]
        entry = _tensor_entry(name, t, steps, change[name])
        tensors.append(entry)
        block = entry["block"]
        if block not in dw_sq:
            blocks.append(block)
            dw_sq[block] = np.zeros(len(spans))
            w_sq[block] = np.zeros(len(spans))
            l1[block] = np.zeros(len(spans))
        interval_l1 = t.get("interval_l1")
        for i in range(len(spans)):
            dl2 = t["interval_l2"][i] or 0.0
            wl2 = t["l2"][i] or 0.0
            dl1 = interval_l1[i] if interval_l1 is not None else None
            dw_sq[block][i] += dl2 * dl2  # not ** 2: 1e200 squared is inf, not an OverflowError
            w_sq[block][i] += wl2 * wl2
            l1[block][i] += dl1 if dl1 is not None else math.nan
    gaps = np.array([s.gap or 1 for s in spans], dtype=np.float64)  # steps unknown: per interval
    with np.errstate(invalid="ignore", divide="ignore"):
        update = np.array([np.sqrt(dw_sq[b]) / np.sqrt(w_sq[b]) for b in blocks]).reshape(len(blocks), -1)
        block_l1 = np.array([l1[b] for b in blocks]).reshape(len(blocks), -1)
        model = np.sqrt(sum(dw_sq.values(), np.zeros(len(spans)))) / np.sqrt(
            sum(w_sq.values(), np.zeros(len(spans)))
        )
    return RunMetrics(
        spans, tensors, per_interval, blocks, update / gaps, block_l1 / gaps, model / gaps, log, change
    )


def ranges(indices: np.ndarray) -> list[list[int]]:
    """Sorted indices -> inclusive ``[first, last]`` runs: [0, 1, 2, 7] -> [[0, 2], [7, 7]]."""
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate([[indices[0]], indices[breaks + 1]])
    ends = np.concatenate([indices[breaks], [indices[-1]]])
    return [[int(a), int(b)] for a, b in zip(starts, ends)]
