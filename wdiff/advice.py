"""What to change: at most five ranked suggestions drawn from a run's findings, each with its evidence.

Findings say what was seen; a suggestion says what a person would do about it ("lower the learning
rate of the param group holding model.layers.2"), once per cause: the findings of one kind on one
block (or at one step) are one suggestion, and a block's ``outlier_change`` tensors join its
``lr_outlier``. Ranked by the kind's severity (a run that diverged or checkpoints that cannot be
trusted before a learning rate to tune), then by the evidence (how many findings say it), then by the
earliest step. Reads findings only (``findings.json`` or ``findings.find``), so the report and the CLI
give the same list. Kinds this module does not know (added later) are suggested from their message.

    from wdiff import advice
    for s in advice.suggest(found): print(s.rank, s.text, s.findings, s.chart)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wdiff import rank_hint
from wdiff.findings import ROUNDING, Finding, is_embedding
from wdiff.naming import block_of

LIMIT = 5

#: Higher first. Broken inputs and a diverged run make every other number doubtful; a part of the
#: model that stopped or never trained wastes the run; a learning rate off for one block is next;
#: events and facts about single rows or elements last. Unknown kinds rank below all of these.
SEVERITY = {
    "nonfinite": 100,
    "duplicate_checkpoint": 90,
    "out_of_order_checkpoint": 90,
    "stopped_moving": 80,
    "expert_starved": 75,
    "frozen": 70,
    "lr_outlier": 60,
    "outlier_change": 50,
    "spike": 40,
    "unchanged_rows": 30,
    "stalled_elements": 20,
}
UNKNOWN = 10
#: The rank hint (``wdiff.rank_hint``) is information, not a problem: below every finding, and only
#: when fewer than ``limit`` findings' suggestions leave it room.
INFORMATION = 0

#: The report section that shows each kind's evidence (``report.html#<anchor>``); ``findings`` for
#: kinds without a chart.
CHART = {
    "nonfinite": "chart-curves",
    "spike": "chart-curves",
    "duplicate_checkpoint": "chart-curves",
    "out_of_order_checkpoint": "chart-curves",
    "stopped_moving": "update-size",
    "lr_outlier": "update-size",
    "outlier_change": "update-size",
    "frozen": "chart-blocks",
    "expert_starved": "experts",
    "unchanged_rows": "chart-rows",
    "stalled_elements": "movers",
}


@dataclass(frozen=True)
class Suggestion:
    rank: int  # 1 = do this first
    text: str  # what to do, and why, in one sentence
    kind: str  # the kind of the leading finding
    tensors: list[str]  # the tensors or blocks it is about ("*": the whole model)
    findings: list[int]  # indices into the findings list: report.html#finding-<i>
    chart: str  # the report section with the evidence: report.html#<chart>
    severity: int

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "text": self.text,
            "kind": self.kind,
            "tensors": self.tensors,
            "findings": self.findings,
            "chart": self.chart,
        }


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _steps(found: Sequence[Finding]) -> str:
    steps = sorted({f.steps[0] for f in found if f.steps})
    return f"step {steps[0]}" if steps else "the run"


def _factor(message: str) -> str:
    """'8.4x faster' from an lr_outlier message ('' when the message says no such thing)."""
    hit = re.search(r"(\d[\d.]*x (?:faster|slower))", message)
    return hit.group(1) if hit else ""


def _rows(f: Finding) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in f.rows or [])


def _text(kind: str, found: Sequence[Finding]) -> str:
    tensors = [f.tensor for f in found]
    first = found[0]
    if kind == "nonfinite":
        return (
            f"Lower the learning rate (or lengthen the warmup) and clip gradients: NaN/Inf from "
            f"{_steps(found)} in {_names(tensors)}; resume from the last checkpoint without them."
        )
    if kind == "duplicate_checkpoint":
        return (
            f"Check how the checkpoints were saved: {_names(tensors)} at {_steps(found)} holds the same "
            "weights as the one before (saved twice?); drop the copy before reading the run."
        )
    if kind == "out_of_order_checkpoint":
        return (
            f"Check the checkpoint at {_steps(found)}: its weights do not belong at its place in the "
            "run (a final or later model saved under an earlier step?); re-save or drop it."
        )
    if kind == "stopped_moving":
        where = "the data loader and the param group" if is_embedding(first.tensor) else "the param group"
        return (
            f"Check {where} of {first.tensor}: it stopped moving after {_steps(found)} while the rest "
            "kept training (a learning rate of 0 for its group, or no more gradient reaching it)."
        )
    if kind == "expert_starved":
        where = _names(
            [
                f"expert{'s' if ',' in _rows(f) or '-' in _rows(f) else ''} {_rows(f)} of {f.tensor}"
                for f in found
            ],
            2,
        )
        return (
            "Add a load-balancing loss (HF: output_router_logits=True, router_aux_loss_coef about 0.01) or "
            f"router noise: {where} got (almost) no tokens and barely trained (router collapse)."
        )
    if kind == "frozen" and ROUNDING in first.message:
        return (
            f"Keep fp32 master weights (mixed precision, not pure low precision): {_names(tensors)} never "
            "changed, every update rounded away."
        )
    if kind == "frozen":
        if first.tensor == "*":
            return (
                "Check that the optimizer steps at all: no tensor changed between the checkpoints (or "
                "they are copies of one checkpoint)."
            )
        return (
            f"If they should learn, add {_names(tensors)} to the optimizer (requires_grad, "
            f"param_groups): {len(tensors)} tensor{'s' if len(tensors) > 1 else ''} never changed."
        )
    if kind == "lr_outlier":
        factor = _factor(first.message)
        others = [t for t in tensors[1:] if t != first.tensor]
        also = f"; {len(others)} of its tensors are outliers too" if others else ""
        if factor.endswith("slower"):
            return (
                f"Raise the learning rate of the param group holding {first.tensor}, or check its "
                f"gradients: it moves {factor} than its peers per unit of learning rate{also}."
            )
        return (
            f"Lower the learning rate of the param group holding {first.tensor} (or give it weight "
            f"decay): it moves {factor or 'far faster'} than its peers per unit of learning rate{also}."
        )
    if kind == "outlier_change":
        block = block_of(first.tensor)
        more = " more " in first.message
        return (
            f"Check the learning rate of {block}'s param group: {_names(tensors)} moved "
            f"{'far more' if more else 'far less'} than the same tensors in the other blocks."
        )
    if kind == "spike":
        what = "the whole model" if first.tensor == "*" else _names(tensors)
        return (
            f"Clip gradients or lower the peak learning rate, and look at the batches near {_steps(found)}: "
            f"{what} took a sudden large step there."
        )
    if kind == "unchanged_rows":
        if is_embedding(first.tensor):
            return (
                f"Check the tokenizer, pad token and maximum length against the data: rows of "
                f"{_names(tensors)} never changed (tokens or positions the data never uses)."
            )
        return f"Look for dead units feeding {_names(tensors)}: some of its rows never changed."
    if kind == "stalled_elements":
        return (
            f"Keep fp32 master weights (mixed precision, not pure low precision): elements of "
            f"{len(tensors)} low-precision tensor{'s' if len(tensors) > 1 else ''} ({_names(tensors, 2)}) "
            "never moved, their updates rounded away."
        )
    head = first.message.split(". ")[0].rstrip(".")
    return f"Look at {kind} on {_names(tensors)}: {head}."


def _key(f: Finding) -> tuple:
    """Findings that share a key are one cause, hence one suggestion."""
    if f.kind in ("lr_outlier", "stopped_moving"):
        return (f.kind, f.tensor)
    if f.kind == "outlier_change":
        return (f.kind, block_of(f.tensor), " more " in f.message)
    if f.kind == "spike":
        return (f.kind, tuple(f.steps or ()))
    if f.kind == "unchanged_rows":
        return (f.kind, is_embedding(f.tensor))
    if f.kind == "frozen":
        return (f.kind, ROUNDING in f.message)
    return (f.kind,)


def suggest(found: Sequence[Finding], limit: int = LIMIT, summary: Mapping | None = None) -> list[Suggestion]:
    """At most ``limit`` suggestions, most important first. With the run's ``summary`` (its update
    spectra), the rank hint of ``wdiff.rank_hint`` comes last when there is room for it."""
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(found):
        groups.setdefault(_key(f), []).append(i)
    # a block's outlier_change tensors are the evidence of its lr_outlier (one cause, one line)
    for key in [k for k in groups if k[0] == "outlier_change" and ("lr_outlier", k[1]) in groups]:
        groups[("lr_outlier", key[1])] += groups.pop(key)
    ranked = []
    for indices in groups.values():
        members = [found[i] for i in indices]
        kind = members[0].kind
        first_step = min((f.steps[0] for f in members if f.steps), default=0)
        severity = SEVERITY.get(kind, UNKNOWN)
        ranked.append((-severity, -len(members), first_step, indices[0], kind, members, indices))
    ranked.sort(key=lambda r: r[:4])
    out = [
        Suggestion(
            rank=n,
            text=_text(kind, members),
            kind=kind,
            tensors=list(dict.fromkeys(f.tensor for f in members)),
            findings=indices,
            chart=CHART.get(kind, "findings"),
            severity=SEVERITY.get(kind, UNKNOWN),
        )
        for n, (*_, kind, members, indices) in enumerate(ranked[:limit], start=1)
    ]
    hint = rank_hint.hint(summary) if summary is not None and len(out) < limit else None
    if hint is not None:
        text, groups = hint
        out.append(
            Suggestion(
                rank=len(out) + 1,
                text=text,
                kind="update_rank",
                tensors=groups,
                findings=[],
                chart=rank_hint.ANCHOR,
                severity=INFORMATION,
            )
        )
    return out


def what_to_change(
    found: Sequence[Finding], report: str = "report.html", summary: Mapping | None = None
) -> list[str]:
    """The suggestions as the closing lines of the CLI: a heading, then one numbered line each with
    its evidence (finding numbers in findings.json, counted from 1, and the report's section); the
    rank hint (with ``summary``) links the report's section only."""
    suggestions = suggest(found, summary=summary)
    if not suggestions:
        return []
    lines = [f"what to change ({report}#what-to-change):"]
    for s in suggestions:
        if not s.findings:
            lines.append(f"  {s.rank}. {s.text} [{report}#{s.chart}]")
            continue
        numbers = ", ".join(f"#{i + 1}" for i in s.findings[:6]) + (" ..." if len(s.findings) > 6 else "")
        lines.append(f"  {s.rank}. {s.text} [findings {numbers}; {report}#{s.chart}]")
    return lines
