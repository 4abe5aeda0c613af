"""Findings: what in the metrics a user should look at, said in plain words with what to try.

Each rule is exact where the question is exact (frozen, unchanged rows, NaN/Inf) and uses robust
statistics with a documented threshold where it is a comparison (outlier change, spike); the
thresholds are in ``docs/metrics.md`` and were chosen with margin against healthy runs (the two
sample runs: the largest healthy ratio seen is 2.25x for outliers and 2.3x for spikes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wdiff import experts
from wdiff.checks import OptionError
from wdiff.indicators import KINDS as UPDATE_KINDS
from wdiff.indicators import findings as update_findings
from wdiff.metrics import RunMetrics, ranges
from wdiff.naming import block_of

KINDS = (
    "nonfinite", "duplicate_checkpoint", "out_of_order_checkpoint", "expert_starved", "frozen",
    "unchanged_rows", "stalled_elements", "outlier_change", "spike",
)  # fmt: skip
KINDS += UPDATE_KINDS  # update size against the learning rate (wdiff.indicators)

#: outlier_change: at least this many times more (or less) than the median of its group ...
OUTLIER_RATIO = 4.0
#: ... and a modified z-score (Iglewicz & Hoaglin: 0.6745 (x - median) / MAD, on log values) above this.
OUTLIER_Z = 3.5
#: outlier_change needs the tensor and at least this many others of its kind.
OUTLIER_MIN_GROUP = 3
#: spike: an interval's change per step at least this many times the median of its neighbours'.
SPIKE_RATIO = 5.0
#: spike: neighbours on each side that form the comparison.
SPIKE_NEIGHBOURS = 2
#: spike and nonfinite: one event (same steps) in at least this share of the tensors, and at least
#: COLLAPSE_MIN of them, is one finding for the whole model (tensor "*") instead of one per tensor.
COLLAPSE_SHARE = 0.5
COLLAPSE_MIN = 3
#: out_of_order_checkpoint: a checkpoint at least this many times closer to the last checkpoint than
#: both the checkpoint before it and one after it are (model-wide ||W(t) - W(T-1)||).
ORDER_RATIO = 2.0
#: stalled_elements: dtypes whose rounding can swallow small updates.
LOW_PRECISION = ("BF16", "F16", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Finding:
    kind: str
    tensor: str
    message: str
    rows: list[list[int]] | None = None
    steps: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _span(m: RunMetrics) -> str:
    first, last = m.spans[0].step_start, m.spans[-1].step_end
    if first is None or last is None:
        return f"{len(m.spans) + 1} checkpoints"
    return f"steps {first}-{last}"


def _rows_text(rows: list[list[int]], limit: int = 6) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in rows[:limit]]
    return ", ".join(parts) + (f" and {len(rows) - limit} more ranges" if len(rows) > limit else "")


def is_embedding(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in ("emb", "wte", "wpe", "tok", "pos"))


def _nonfinite(m: RunMetrics) -> list[Finding]:
    found = []
    for t in m.tensors:
        if t["nonfinite_first"] is None:
            continue
        bad = m.neuron_change[t["tensor"]]
        rows = ranges(np.flatnonzero(~np.isfinite(bad)))
        step = t["nonfinite_step"]
        where = f"step {step}" if step is not None else f"checkpoint {t['nonfinite_first']}"
        found.append(
            Finding(
                "nonfinite",
                t["tensor"],
                f"{t['tensor']} holds NaN/Inf from {where} on"
                + (f" (rows {_rows_text(rows)})" if rows else "")
                + ". Training diverged or overflowed at or before that step. Try: a lower learning rate "
                "or longer warmup, gradient clipping (max_grad_norm), bf16 instead of fp16 (or loss "
                "scaling), and look at the batches just before that step; resume from the last "
                "checkpoint without NaN.",
                rows=rows or None,
                steps=[step] if step is not None else None,
            )
        )
    return found


def _frozen(m: RunMetrics) -> list[Finding]:
    frozen = [t for t in m.tensors if t["numel"] and t["nonfinite_first"] is None and t["path_l1"] == 0]
    if len(frozen) == len(m.tensors) and len(frozen) > 1:
        return [
            Finding(
                "frozen",
                "*",
                f"No tensor changed at all over {_span(m)}: every checkpoint holds the same weights. "
                "Are these copies of one checkpoint, or was the optimizer never stepped (learning rate "
                "0, every parameter frozen, gradient accumulation that never completes)?",
            )
        ]
    siblings = _moved_low_precision(m)
    causes = {t["tensor"]: _rounding_cause(m, t, siblings) for t in frozen}
    # a block whose matrices are frozen too was frozen as a whole (requires_grad=False): not rounding
    held = {block_of(t["tensor"]) for t in frozen if len(t["shape"]) >= 2 and causes[t["tensor"]] is None}
    found = []
    for t in frozen:
        rounding = causes[t["tensor"]] if block_of(t["tensor"]) not in held else None
        head = f"{t['tensor']} did not change at all over {_span(m)} (every weight identical at every "
        head += "checkpoint)."
        if rounding:
            found.append(Finding("frozen", t["tensor"], f"{head} {rounding}"))
            continue
        found.append(
            Finding(
                "frozen",
                t["tensor"],
                f"{head} It was not trained: requires_grad=False, missing from the optimizer's "
                "param_groups, or a learning rate of 0 for its group. If it should learn, check "
                "model.named_parameters() and optimizer.param_groups; if freezing it was meant, all is well.",
            )
        )
    return found


#: relative spacing of representable values (2^-mantissa bits) of the low-precision dtypes
_SPACING = {"BF16": 2.0**-7, "F16": 2.0**-10, "F8_E4M3": 2.0**-3, "F8_E5M2": 2.0**-2}


#: how a ``frozen`` finding names low-precision rounding as its likely cause (advice, finding groups)
ROUNDING = "Likely cause: "


def tensor_kind(name: str) -> str:
    """What a tensor is, across blocks and outside them: every norm scale is one kind
    (``model.norm.weight`` and ``model.layers.3.input_layernorm.weight``); otherwise its group, the
    expert number counting as a block (``experts.group_key``)."""
    low = name.lower()
    parts = low.split(".")
    if "norm" in low or any(p.startswith("ln") for p in parts[:-1]):
        return "norm." + parts[-1]
    return experts.group_key(name)


def _moved_low_precision(m: RunMetrics) -> dict[tuple, list[dict]]:
    """The low-precision tensors that moved, by (dtype, shape, kind): the siblings a frozen one is
    compared with (one pass over the tensors, however many are frozen)."""
    moved: dict[tuple, list[dict]] = defaultdict(list)
    for s in m.tensors:
        if s["dtype"] in _SPACING and s["path_l1"] and s["numel"] and s["nonfinite_first"] is None:
            moved[(s["dtype"], tuple(s["shape"]), tensor_kind(s["tensor"]))].append(s)
    return moved


def _rounding_cause(m: RunMetrics, t: dict, siblings: dict[tuple, list[dict]]) -> str | None:
    """For a frozen low-precision tensor: the sentence that names rounding as the likely cause, when
    its siblings (same kind, dtype and shape: ``_moved_low_precision``) moved and either some of them
    have stalled elements or their typical update is below half the spacing of this tensor's values
    (it would be rounded away). None otherwise."""
    dtype = t["dtype"]
    if dtype not in _SPACING:
        return None
    moved = [s for s in siblings.get((dtype, tuple(t["shape"]), tensor_kind(t["tensor"])), []) if s is not t]
    if not moved:
        return None
    stalled = [s for s in moved if len(s["shape"]) == 1 and 0 < (s.get("rows_unchanged") or 0) < s["rows"]]
    spans = max(len(m.spans), 1)
    update = float(np.median([s["path_l1"] / (s["numel"] * spans) for s in moved]))
    end = t.get("l2_end")
    rms = end / math.sqrt(t["numel"]) if end is not None else 0.0
    spacing = 2.0 ** math.floor(math.log2(rms)) * _SPACING[dtype] if rms > 0 and math.isfinite(rms) else 0.0
    if not stalled and not update < spacing / 2:
        return None
    siblings = f"{len(moved)} sibling{'s' if len(moved) > 1 else ''} of the same kind"
    why = [
        f"its values (RMS {rms:.3g}) are {spacing:.2g} apart in {dtype}, so an update below half that "
        "is rounded away"
    ]
    if update < spacing / 2:
        why.append(f"its {siblings} moved only {update:.2g} per element per interval")
    if stalled:
        why.append(f"{len(stalled)} of its {siblings} have elements that never moved (stalled_elements)")
    if not spacing:
        why = why[1:]
    return (
        f"{ROUNDING}{dtype} rounding, not a frozen parameter: {'; '.join(why)}. Try: fp32 master "
        "weights (mixed precision instead of pure low precision), or stochastic rounding / Kahan "
        "summation in the optimizer. If it was meant to be frozen (requires_grad=False), all is well."
    )


def _unchanged_rows(m: RunMetrics) -> list[Finding]:
    found = []
    for t in m.tensors:
        rows = m.neuron_change[t["tensor"]]
        if len(t["shape"]) < 2 or t["path_l1"] == 0 or not t["rows_unchanged"]:
            continue
        if t["rows_unchanged"] == rows.size:
            continue
        spans = ranges(np.flatnonzero(rows == 0))
        count = t["rows_unchanged"]
        if is_embedding(t["tensor"]):
            meaning = (
                "For an embedding these are tokens or positions that never occurred in the training "
                "data, or the padding index (padding_idx, often row 0, gets no gradient). Check the "
                "tokenizer's vocabulary, pad token and max length against the data; if these rows "
                "matter, add data that uses them, otherwise the vocabulary or position table can be smaller."
            )
        else:
            meaning = (
                "These units never received a gradient: dead units (e.g. ReLU always off), masked or "
                "unused outputs, or inputs that are always zero. Check the activations feeding them; "
                "a different initialisation, a leaky activation or a lower learning rate can revive them."
            )
        found.append(
            Finding(
                "unchanged_rows",
                t["tensor"],
                f"{count} of {rows.size} rows of {t['tensor']} never changed "
                f"({'row' if count == 1 else 'rows'} {_rows_text(spans)}) "
                f"while the other rows did. {meaning}",
                rows=spans,
            )
        )
    return found


def _stalled(m: RunMetrics) -> list[Finding]:
    """1-D low-precision tensors (norm scales, biases) with elements that never moved while the
    others did: updates smaller than half a rounding step of the stored dtype are lost."""
    found = []
    for t in m.tensors:
        if len(t["shape"]) != 1 or t["dtype"] not in LOW_PRECISION or t["path_l1"] == 0:
            continue
        count = t["rows_unchanged"]
        if not count or count == t["rows"]:
            continue
        spans = ranges(np.flatnonzero(m.neuron_change[t["tensor"]] == 0))
        found.append(
            Finding(
                "stalled_elements",
                t["tensor"],
                f"{count} of {t['rows']} elements of {t['tensor']} ({t['dtype']}) never changed while "
                f"the others did (elements {_rows_text(spans)}). In {t['dtype']}, an update smaller than "
                "half the spacing between representable values is rounded away (near 1.0 that is 0.4% "
                "for BF16), so these weights are stuck, typically LayerNorm scales near 1. Try: fp32 "
                "master weights (mixed precision instead of pure low precision), or stochastic rounding "
                "/ Kahan summation in the optimizer.",
                rows=spans,
            )
        )
    return found


def _outliers(m: RunMetrics) -> list[Finding]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for t in m.tensors:
        value = t["relative_path"]
        if t["group"] and value and t["nonfinite_first"] is None and math.isfinite(value):
            groups[t["group"]].append(t)
    found = []
    for members in groups.values():
        if len(members) < OUTLIER_MIN_GROUP:
            continue
        logs = np.log([t["relative_path"] for t in members])
        median = float(np.median(logs))
        mad = float(np.median(np.abs(logs - median)))
        for t, x in zip(members, logs):
            ratio = math.exp(abs(x - median))
            z = math.inf if mad == 0 else 0.6745 * abs(x - median) / mad
            if ratio < OUTLIER_RATIO or z < OUTLIER_Z:
                continue
            more = x > median
            others = len(members) - 1
            hint = (
                "It learns much faster than its siblings: a per-layer learning rate or LR multiplier "
                "set too high, a re-initialised or newly added layer, or a missing normalisation "
                "feeding it large gradients. Check its param group's learning rate and its gradient "
                "norm; lower its learning rate or clip gradients if that was not intended."
                if more
                else "It barely trains compared with its siblings: a learning rate multiplier too low, "
                "vanishing gradients to this depth, or a layer that is partly frozen. Check its param "
                "group and gradient norm; a higher learning rate for it or better initialisation may help."
            )
            found.append(
                Finding(
                    "outlier_change",
                    t["tensor"],
                    f"{t['tensor']} moved {ratio:.1f}x {'more' if more else 'less'} than the same tensor "
                    f"in the other {others} blocks (relative path length {t['relative_path']:.3g}, "
                    f"median of its kind {math.exp(median):.3g}). {hint}",
                )
            )
    return found


@dataclass(frozen=True)
class Suite:
    """What the checkpoints themselves say about the suite: intervals where nothing changed, and
    checkpoints out of training order (all of them, or some tensors: a shard)."""

    duplicates: list[int]  # intervals t where every tensor is unchanged and a neighbour moved
    copies: dict[int, list[str]]  # checkpoint t -> tensors equal to the last checkpoint's (exact)
    whole: set[int]  # checkpoints t equal to the last one in every tensor that moved after t
    near: dict[int, float]  # checkpoint t -> ratio: much closer to the last one than its neighbours

    def skipped(self, name: str) -> set[int]:
        """Intervals of tensor ``name`` that the spike rule leaves out: those into and out of a
        checkpoint out of order (their change is the jump to another part of training and back)."""
        out = set()
        for t in self.whole | set(self.near):
            out |= {t - 1, t}
        for t, names in self.copies.items():
            if name in names:
                out |= {t - 1, t}
        return out


def _changes(m: RunMetrics) -> dict[str, list[float | None]]:
    """Per tensor, the change of each interval: sum |dW| (exact zero iff unchanged), else ||dW||."""
    per: dict[str, list[float | None]] = defaultdict(list)
    for row in m.intervals:
        per[row["tensor"]].append(row["l1"] if row["l1"] is not None else row["l2"])
    return per


def _clean(m: RunMetrics) -> dict[str, list[bool]]:
    """Per tensor and checkpoint: free of NaN/Inf. Sums leave non-finite terms out, so a change or a
    distance of 0 says "equal" only between two checkpoints that are both clean."""
    clean: dict[str, list[bool]] = {t["tensor"]: [t["nonfinite_first"] != 0] for t in m.tensors}
    for row in m.intervals:
        clean[row["tensor"]].append(not row["nonfinite"])
    return clean


def suite(m: RunMetrics) -> Suite:
    """The duplicate and out-of-order checkpoints of the run (``docs/metrics.md``, broken suites)."""
    live = [t for t in m.tensors if t["numel"]]
    n = len(m.spans)
    change = _changes(m)
    ok = _clean(m)
    zero = [
        bool(live)
        and all(change[t["tensor"]][i] == 0 and ok[t["tensor"]][i] and ok[t["tensor"]][i + 1] for t in live)
        for i in range(n)
    ]
    moved = [any((change[t["tensor"]][i] or 0) > 0 for t in live) for i in range(n)]
    duplicates = [
        i for i in range(n) if zero[i] and ((i > 0 and moved[i - 1]) or (i + 1 < n and moved[i + 1]))
    ]
    # exact: W(t) == W(T-1) for a tensor that changed somewhere between them (it cannot come back to
    # the same bits by training: checkpoint t holds the last checkpoint's values, or the reverse)
    copies: dict[int, list[str]] = {}
    whole: set[int] = set()
    for c in range(1, n):
        movers = [t for t in live if any((v or 0) > 0 for v in change[t["tensor"]][c:])]
        same = [
            t["tensor"]
            for t in movers
            if t["distance_last"][c] == 0 and ok[t["tensor"]][c] and ok[t["tensor"]][n]
        ]
        if same:
            copies[c] = same
            if len(same) == len(movers):
                whole.add(c)
    ratios = _order_ratios(m, set(copies))
    near = {c: r for c, r in ratios.items() if r >= ORDER_RATIO}
    return Suite(duplicates, copies, whole, near)


def _order_ratios(m: RunMetrics, skip: set[int]) -> dict[int, float]:
    """Per checkpoint t (1 <= t <= T-3), how many times closer it is to the last checkpoint than both
    the checkpoint before it (the last one in order) and the farthest one after it (before the last),
    model-wide: D(t) = sqrt(sum over tensors ||W(t) - W(T-1)||^2). In training order D only shrinks
    (slowly, with noise); a checkpoint much closer to the end than a later one holds later weights.
    Checkpoints in ``skip`` (already found) and those over the threshold do not become "the one before";
    a checkpoint with NaN/Inf (or a last one with them) has no ratio: its distances leave them out."""
    live = [t for t in m.tensors if t["numel"]]
    n = len(m.spans)
    clean = _clean(m)
    dist: list[float | None] = []
    for c in range(n + 1):
        values = [t["distance_last"][c] for t in live]
        ok = bool(values) and all(v is not None and math.isfinite(v) for v in values)
        ok = ok and all(clean[t["tensor"]][c] and clean[t["tensor"]][n] for t in live)
        dist.append(math.sqrt(sum(v * v for v in values)) if ok else None)
    ratios: dict[int, float] = {}
    anchor = dist[0]
    for c in range(1, n - 1):
        d = dist[c]
        later = [x for x in dist[c + 1 : n] if x is not None]
        if d is None or c in skip:
            continue
        if anchor is not None and later:
            ratios[c] = min(anchor, max(later)) / d if d > 0 else math.inf
            if ratios[c] >= ORDER_RATIO:
                continue
        anchor = d
    return ratios


def suite_ratios(m: RunMetrics) -> list[float]:
    """The ratios ``out_of_order_checkpoint`` thresholds (at ``ORDER_RATIO``), for measuring runs."""
    return list(_order_ratios(m, set()).values())


def _step_of(m: RunMetrics, c: int) -> int | None:
    """The training step of checkpoint ``c``."""
    return m.spans[c].step_start if c < len(m.spans) else m.spans[-1].step_end


def _where(m: RunMetrics, c: int) -> str:
    step = _step_of(m, c)
    return f"step {step}" if step is not None else f"checkpoint {c}"


def _duplicates(m: RunMetrics, s: Suite) -> list[Finding]:
    found = []
    for i in s.duplicates:
        if i in s.whole and i + 1 in s.whole:  # two copies of the last checkpoint: said once each below
            continue
        span = m.spans[i]
        steps = [span.step_start, span.step_end] if span.step_start is not None else None
        a, b = _where(m, i), _where(m, i + 1)
        found.append(
            Finding(
                "duplicate_checkpoint",
                "*",
                f"The checkpoints at {a} and {b} hold exactly the same weights (no tensor changed "
                "between them) while the intervals around them did: the same weights were saved twice "
                f"(a copied folder, a save that did not flush, or a resume that saved before stepping). "
                f"The change of the next interval is that of {a} to the one after {b}. Check the file "
                "times and sizes of these checkpoints, and whether training really ran between them.",
                steps=steps,
            )
        )
    return found


def _names_text(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _out_of_order(m: RunMetrics, s: Suite) -> list[Finding]:
    found = []
    last = _where(m, len(m.spans))
    for c in sorted(set(s.copies) | set(s.near)):
        step = _step_of(m, c)
        steps = [step] if step is not None else None
        here = _where(m, c)
        if c in s.whole:
            found.append(
                Finding(
                    "out_of_order_checkpoint",
                    "*",
                    f"The checkpoint at {here} holds exactly the weights of the last checkpoint ({last}), "
                    "while the checkpoints in between differ: it is not the state of training at that "
                    "step (a revision re-uploaded with the final weights, as in EleutherAI/pythia#205, or "
                    "a folder overwritten). Metrics of the intervals around it describe a jump to the end "
                    "of training and back. Check the files of this checkpoint (hashes against the last "
                    "one's) and leave it out or fetch the right one.",
                    steps=steps,
                )
            )
        elif c in s.copies:
            names = s.copies[c]
            found.append(
                Finding(
                    "out_of_order_checkpoint",
                    names[0],
                    f"In the checkpoint at {here}, {len(names)} tensors hold exactly the values of the "
                    f"last checkpoint ({last}) while the others do not: {_names_text(names)}. One file "
                    "of a sharded checkpoint was replaced by the last checkpoint's (as in "
                    "EleutherAI/pythia#206). Check the shard holding these tensors (hashes against the "
                    "last checkpoint's) and fetch the right one.",
                    steps=steps,
                )
            )
        else:
            found.append(
                Finding(
                    "out_of_order_checkpoint",
                    "*",
                    f"The checkpoint at {here} is {s.near[c]:.0f}x closer to the last checkpoint ({last}) "
                    "than the checkpoints around it are: it holds weights from later in training than "
                    "its step (a mislabelled or re-uploaded revision, as in EleutherAI/pythia#205, or "
                    "checkpoints sorted in the wrong order). Check which step it was saved at (its "
                    "trainer_state.json, file times) and fix the order or leave it out.",
                    steps=steps,
                )
            )
    return found


def _spikes(m: RunMetrics, s: Suite | None = None) -> list[Finding]:
    """Per tensor, the change per step of each interval against the median of up to
    ``SPIKE_NEIGHBOURS`` intervals on each side. The first interval is never flagged: early training
    legitimately moves fastest, and it has no interval before it to compare with.

    A duplicated checkpoint (an interval where nothing changed) is not an interval of training: its
    steps go to the next interval, whose change is that of both. The intervals into and out of a
    checkpoint out of order are left out (their change is a jump, already reported)."""
    per_tensor: dict[str, list[dict]] = defaultdict(list)
    for row in m.intervals:
        per_tensor[row["tensor"]].append(row)
    duplicates = set(s.duplicates) if s is not None else set()
    found = []
    for t in m.tensors:
        if t["nonfinite_first"] is not None or t["path_l1"] == 0:
            continue
        skipped = s.skipped(t["tensor"]) if s is not None else set()
        rows, values, carried = [], [], 0
        for i, r in enumerate(per_tensor[t["tensor"]]):
            if i in duplicates:
                carried += r["step_gap"] or 1
                continue
            gap = (r["step_gap"] or 1) + carried
            carried = 0
            if i in skipped:
                continue
            rows.append(r)
            values.append((r["l2"] or 0.0) / gap if r["l2"] is not None else np.nan)
        rate = np.array(values)
        for i in range(1, len(rate)):
            around = np.concatenate(
                [rate[max(0, i - SPIKE_NEIGHBOURS) : i], rate[i + 1 : i + 1 + SPIKE_NEIGHBOURS]]
            )
            around = around[np.isfinite(around)]
            if around.size == 0 or not np.isfinite(rate[i]) or rate[i] == 0:
                continue
            base = float(np.median(around))
            # base 0: the neighbours did not move (a tensor unfrozen or frozen mid-run), not a spike
            ratio = float(rate[i]) / base if base else 0.0  # Python floats: inf, not an overflow warning
            if ratio < SPIKE_RATIO:
                continue
            r = rows[i]
            steps = [r["step_start"], r["step_end"]] if r["step_start"] is not None else None
            when = f"steps {r['step_start']}-{r['step_end']}" if steps else f"interval {r['interval']}"
            factor = f"{ratio:.1f}x"
            found.append(
                Finding(
                    "spike",
                    t["tensor"],
                    f"{t['tensor']} changed {factor} more per step in {when} than in the neighbouring "
                    "intervals. A sudden large update: a loss spike, a bad batch, a learning-rate "
                    "schedule jump, or optimizer state lost on resume (resuming without optimizer.pt). "
                    "Check the loss and learning-rate curves at these steps; try gradient clipping, a "
                    "lower peak learning rate or a longer warmup.",
                    steps=steps,
                )
            )
    return found


def _collapse(
    found: list[Finding], total: int, say: Callable[[list[Finding], list[int]], str]
) -> list[Finding]:
    """Findings of one kind that share their steps and cover at least half of the tensors are one
    event of the whole model (a loss spike, a divergence): one finding with tensor ``*``."""
    by_steps: dict[tuple[int, ...], list[Finding]] = defaultdict(list)
    for f in found:
        by_steps[tuple(f.steps or ())].append(f)
    out = []
    for steps, group in by_steps.items():
        if steps and len(group) >= max(COLLAPSE_MIN, COLLAPSE_SHARE * total):
            out.append(Finding(group[0].kind, "*", say(group, list(steps)), steps=list(steps)))
        else:
            out.extend(group)
    return sorted(out, key=lambda f: f.steps[0] if f.steps else -1)  # earliest event first (stable)


def _model_spike(group: list[Finding], steps: list[int]) -> str:
    return (
        f"{len(group)} tensors (first: {group[0].tensor}) changed {SPIKE_RATIO:g}x or more per step in steps "
        f"{steps[0]}-{steps[-1]} than in the neighbouring intervals: the whole model took a sudden large "
        "step. A loss spike, a bad batch, a learning-rate schedule jump, or optimizer state lost on resume "
        "(resuming without optimizer.pt). Check the loss and learning-rate curves at these steps; try "
        "gradient clipping, a lower peak learning rate or a longer warmup."
    )


def _model_nonfinite(group: list[Finding], steps: list[int]) -> str:
    return (
        f"{len(group)} tensors (first: {group[0].tensor}) hold NaN/Inf from step {steps[0]} on: training "
        "diverged at or before that step. Try: a lower learning rate or longer warmup, gradient clipping "
        "(max_grad_norm), bf16 instead of fp16 (or loss scaling), and look at the batches just before that "
        "step; resume from the last checkpoint without NaN."
    )


def _starved_experts(m: RunMetrics) -> tuple[list[Finding], Callable[[Finding], bool]]:
    """One ``expert_starved`` finding per MoE layer with starved experts (``wdiff.experts``), and a
    test for the findings it explains: its experts' tensors ``frozen`` or ``outlier_change``, and
    ``unchanged_rows`` of fused expert tensors or of the router on those experts' rows only."""
    found: list[Finding] = []
    tensors: set[str] = set()
    rows_of: dict[str, set[int]] = {}
    for layer in experts.layers(m):
        starved = layer.starved
        if not starved:
            continue
        names = sorted({n for e in starved for n in layer.tensors[e]})
        if layer.fused:
            rows_of.update({n: set(starved) for n in names})
        else:
            tensors.update(names)
        which = ", ".join(map(str, starved))
        plural = len(starved) > 1
        message = (
            f"Expert{'s' if plural else ''} {which} of {layer.prefix} barely trained: "
            f"{'they' if plural else 'it'} moved "
            + ", ".join(f"{layer.change[e]:.2g}" for e in starved)
            + f" per element (accumulated |dW|) against a median of {layer.median:.2g} for the layer's "
            f"{len(layer.change)} experts"
        )
        if layer.router is not None:
            rows_of.setdefault(layer.router, set()).update(starved)
            message += (
                f", and {'their rows' if plural else 'its row'} of the router {layer.router} moved "
                + ", ".join(f"{layer.router_change[e]:.2g}" for e in starved)
                + f" against a median of {layer.router_median:.2g}"
            )
        message += (
            ". The router sends it (almost) no tokens: router collapse, a load-balancing failure. Try: a "
            "load-balancing loss (HF: output_router_logits=True, router_aux_loss_coef 0.001-0.02), router "
            "jitter noise or a z-loss, a higher capacity factor; and look at how often the router picks "
            "each expert."
        )
        found.append(Finding("expert_starved", layer.prefix, message, rows=ranges(np.array(starved))))

    def explained(f: Finding) -> bool:
        if f.kind in ("frozen", "outlier_change") and f.tensor in tensors:
            return True
        if f.kind == "unchanged_rows" and f.tensor in rows_of and f.rows:
            return all(r in rows_of[f.tensor] for a, b in f.rows for r in range(a, b + 1))
        return False

    return found, explained


def find(m: RunMetrics) -> list[Finding]:
    """Every finding of the run, most severe kind first; within a kind, earliest step first, then
    network order. Findings a starved expert explains are folded into its ``expert_starved``."""
    total = len(m.tensors)
    s = suite(m)
    starved, explained = _starved_experts(m)
    facts = [f for f in _frozen(m) + _unchanged_rows(m) if not explained(f)]
    return (
        _collapse(_nonfinite(m), total, _model_nonfinite)
        + _duplicates(m, s)
        + _out_of_order(m, s)
        + starved
        + facts
        + _stalled(m)
        + [f for f in _outliers(m) if not explained(f)]
        + _collapse(_spikes(m, s), total, _model_spike)
        + [Finding(**f) for f in update_findings(m)]  # update size against the LR: wdiff.indicators
    )


#: ``--fail-on any``: every kind.
ANY = "any"


def fail_kinds(parameter: str, text: str) -> tuple[str, ...]:
    """The kinds of a ``--fail-on`` value: comma-separated kinds of ``KINDS`` (spaces around them
    allowed) or ``any``; anything else an ``OptionError`` naming ``parameter`` and the known kinds."""
    kinds = tuple(k.strip() for k in text.split(","))
    known = (ANY, *KINDS)
    unknown = [k for k in kinds if k not in known]
    if unknown or not text.strip():
        what = f"has an unknown kind {unknown[0]!r}" if unknown and unknown[0] else "needs a kind"
        raise OptionError(parameter, f"{what}: use {', '.join(known)}")
    return tuple(dict.fromkeys(kinds))


def of_kinds(found: list[Finding], kinds: tuple[str, ...]) -> list[Finding]:
    """The findings of ``found`` whose kind is one of ``kinds`` (``fail_kinds``; ``any``: all of them)."""
    return [f for f in found if ANY in kinds or f.kind in kinds]
