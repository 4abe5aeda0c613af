"""One run's analysis files: ``findings.json``, ``metrics.csv``, ``tensors.csv`` and ``report.html``.

Reads only the results folder, so it runs at the end of ``wdiff run`` (inside the temporary folder,
before it is renamed into place) and again on demand with ``wdiff report OUT``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from wdiff import advice, experts, finding_groups, rank_hint
from wdiff._files import atomic_write
from wdiff.checks import NO_MAP
from wdiff.errors import WdiffError
from wdiff.findings import Finding, find, is_embedding
from wdiff.indicators import RULE_OF_THUMB, block_indicators
from wdiff.marker import read_small, regular_file
from wdiff.metrics import RunMetrics, analyse
from wdiff.report import figures
from wdiff.report import html as h
from wdiff.results import Results, json_text
from wdiff.schema import FINDINGS_SCHEMA, findings_entries, float32_map_bytes
from wdiff.terminal import human_bytes
from wdiff.timeline import INTERVAL_COLUMNS

FINDINGS = "findings.json"
METRICS = "metrics.csv"
TENSORS = "tensors.csv"
REPORT = "report.html"

METRIC_COLUMNS = INTERVAL_COLUMNS  # one row per tensor per interval (wdiff.timeline)
TENSOR_COLUMNS = (
    "tensor", "block", "group", "shape", "dtype", "numel", "path_l1", "path_l2", "net_l2",
    "relative_change", "relative_path", "straightness", "mean_change", "rotation", "l2_start", "l2_end",
    "rows", "rows_unchanged", "nonfinite_step",
)  # fmt: skip
TOP = 10  # tensors in the top-movers and least-moved tables
PROFILES = 4  # per-row charts at most
MAX_FINDINGS_BYTES = 1 << 30


@dataclass(frozen=True)
class Report:
    """What ``write_report`` wrote, for the caller to print."""

    path: Path  # report.html
    findings: list[Finding]
    metrics: RunMetrics


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write beside ``path`` and rename (``atomic_write``): a reader never sees half a file, a failure
    leaves the old one. Text is UTF-8; a lone surrogate (a file name that was not UTF-8, or a JSON
    ``\\ud800`` in a summary) is written as its escape, ``\\udcff``, which UTF-8 cannot hold."""
    with atomic_write(path) as f:
        f.write(data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data)


def write_json_atomic(path: Path, data: Any) -> None:
    """``results.write_json`` (NaN/Infinity as null, which strict readers need), atomically."""
    write_atomic(path, json_text(data))


def csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # what DictWriter writes, without a dict per row
    writer.writerow(columns)
    writer.writerows([("" if v is None else v) for v in map(row.get, columns)] for row in rows)
    return buf.getvalue()


def short_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix every name shares (``transformer.h.0`` -> ``h.0``)."""
    if len(names) < 2:
        return list(names)
    split = [n.split(".") for n in names]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return [".".join(s[common:]) for s in split]


def load(out: str | os.PathLike[str]) -> Results:
    """The results in ``out``, checked (``Results.load``: one-line errors)."""
    return Results.load(out)


MAX_PICTURE_BYTES = 256 << 20


def _drawn(out: Path, before: Callable[[], None] | None) -> list[tuple[str, bytes, str]]:
    if before is not None:
        before()
    return renders(out)


def renders(out: Path) -> list[tuple[str, bytes, str]]:
    """The 3D pictures present in ``out``: every ``render*.png``, then ``frames.gif``; regular files
    directly inside ``out`` only (a symlinked picture is never followed, so never embedded)."""
    names = sorted(p.name for p in out.glob("render*.png")) + ["frames.gif"]
    found = []
    for name in names:
        path = regular_file(out, name)
        if path is None:
            continue
        try:
            data = read_small(path, MAX_PICTURE_BYTES)
        except OSError as e:
            raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
        found.append((name, data, "image/gif" if name.endswith(".gif") else "image/png"))
    return found


def write_report(
    out: str | os.PathLike[str], *, charts: bool = True, before_pictures: Callable[[], None] | None = None
) -> Report:
    """Analyse the results in ``out`` and write findings.json, metrics.csv, tensors.csv, report.html.

    ``charts=False`` (``wdiff run --no-render``) leaves the matplotlib charts out of report.html, which
    then says so in one line: the page is written without importing matplotlib (about 0.3 s to import
    and 0.4 s to draw). ``wdiff report OUT`` draws them.

    ``before_pictures()`` is called before the 3D pictures in ``out`` are read into the page, after
    everything else is drawn: ``wdiff.run`` waits there for the pictures its worker is drawing.
    """
    out = Path(out)
    res = load(out)
    m = analyse(res)
    found = find(m)
    write_json_atomic(out / FINDINGS, findings_document(found))
    write_atomic(out / METRICS, csv_text(METRIC_COLUMNS, m.intervals))
    tensor_rows = [{**t, "shape": "x".join(map(str, t["shape"])) or "scalar"} for t in m.tensors]
    write_atomic(out / TENSORS, csv_text(TENSOR_COLUMNS, tensor_rows))
    page = run_page(res, m, found, lambda: _drawn(out, before_pictures), charts=charts)
    write_atomic(out / REPORT, page)
    return Report(out / REPORT, found, m)


def findings_document(found: Sequence[Finding]) -> dict[str, Any]:
    """What ``findings.json`` holds: ``{"schema": FINDINGS_SCHEMA, "findings": [...]}`` (wdiff before
    the schema wrote the bare list; ``read_findings`` takes both)."""
    return {"schema": FINDINGS_SCHEMA, "findings": [f.to_json() for f in found]}


_FINDING_KEYS = tuple(f.name for f in fields(Finding))


def read_findings(out: str | os.PathLike[str]) -> list[Finding]:
    """The findings a run wrote (``findings.json``, a list of schema 1 or the object of schema 2), or
    an empty list when there is none; a file of a newer schema or another shape is one ``WdiffError``
    line. Keys this wdiff does not know are left out."""
    path = Path(out) / FINDINGS
    if not path.is_file():
        return []
    try:
        data = json.loads(read_small(path, MAX_FINDINGS_BYTES))
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    except RecursionError:
        raise WdiffError(path, "not wdiff's findings: nested too deep") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise WdiffError(path, f"not wdiff's findings: {e}") from None
    return [Finding(**{k: e[k] for k in _FINDING_KEYS if k in e}) for e in findings_entries(data, path)]


def _summary_section(res: Results, m: RunMetrics) -> str:
    s = res.summary
    steps = [c.get("step") for c in s["checkpoints"]]
    dtypes = sorted({t["dtype"] for t in m.tensors})
    timing = s.get("timing") or {}
    log = m.log[-1] if m.log else {}
    rows: list[tuple[str, Any]] = [
        ("source", s.get("source", "")),
        ("checkpoints", f"{len(steps)} (steps {', '.join(str(x) for x in steps)})"),
        (
            "tensors",
            f"{len(m.tensors):,} ({sum(t['numel'] for t in m.tensors):,} weights, {', '.join(dtypes)})",
        ),
        ("skipped tensors", len(s.get("skipped") or [])),
        (
            "data read",
            f"{timing.get('read_bytes', 0) / 1e6:.1f} MB in {timing.get('compute_seconds', 0):.1f} s",
        ),
        ("wdiff", f"{s.get('wdiff_version', '')}, {s.get('created', '')}, update: {s.get('update', 'full')}"),
        ("accumulated map", _map_storage(s)),
    ]
    if log.get("loss") is not None:
        first = next((v["loss"] for v in m.log if v.get("loss") is not None), None)
        rows.append(("train loss at the checkpoints", f"{first:.4g} -> {log['loss']:.4g}"))
    if log.get("eval_loss") is not None:
        rows.append(("eval loss at the last checkpoint", f"{log['eval_loss']:.4g}"))
    return h.section("Run", h.table(["", ""], rows))


def _findings_section(found: Sequence[Finding]) -> str:
    if not found:
        return h.section(
            "Findings",
            h.paragraph(
                "No findings: nothing frozen, no NaN/Inf, no unchanged rows, no outlier or spike.", "ok"
            ),
            anchor="findings",
        )
    groups = finding_groups.group(found)

    def member_row(i: int) -> tuple:
        f = found[i]
        return (
            f'<span id="finding-{i}" class="kind {h.esc(f.kind)}">{h.esc(f.kind)}</span>',
            f"<code>{h.esc(f.tensor)}</code>",
            h.esc(", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in f.rows or [])),
            h.esc("-".join(str(s) for s in f.steps or [])),
            h.esc(f.message),
        )

    rows = []
    for g in groups:
        if len(g.members) == 1:
            rows.append(member_row(g.members[0]))
            continue
        members = h.table(
            ["kind", "tensor", "rows", "steps", "message"], [member_row(i) for i in g.members], raw=[True] * 5
        )
        rows.append(
            (
                f'<span class="kind {h.esc(g.kind)}">{h.esc(g.kind)}</span>',
                f"<b>{h.esc(g.headline)}</b>",
                "",
                "",
                h.esc(g.hint)
                + f"<details><summary>the {len(g.members)} findings</summary>{members}</details>",
            )
        )
    counts = ", ".join(f"{k}: {n}" for k, n in _count(found).items())
    plural = "s" if len(groups) > 1 else ""
    grouped = f", in {len(groups)} group{plural}" if len(groups) < len(found) else ""
    return h.section(
        "Findings",
        h.paragraph(f"{len(found)} findings ({counts}){grouped}; most severe first."),
        h.table(["kind", "tensor", "rows", "steps", "what it may mean, what to try"], rows, raw=[True] * 5),
        anchor="findings",
    )


def _map_storage(summary: dict) -> str:
    map_dtype = summary.get("map_dtype", "float32")
    if map_dtype == NO_MAP:  # asked for, or the default's choice for a big map (wdiff.update.MAP_AUTO_BYTES)
        size = human_bytes(float32_map_bytes(summary))
        return f"not stored ({size} in float32: --map-dtype float32 stores it)"
    stored = "bfloat16 (rounded from float32 sums)" if map_dtype == "bfloat16" else "float32"
    return f"accumulated.safetensors, {stored}"


def _count(found: Sequence[Finding]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in found:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return counts


def _movers(m: RunMetrics) -> str:
    moving = [t for t in m.tensors if t["relative_path"] is not None and t["path_l1"]]
    ranked = sorted(moving, key=lambda t: t["relative_path"], reverse=True)
    cols = ["tensor", "shape", "relative path", "relative change", "straightness", "rotation", "mean |ΔW|"]

    def row(t: dict) -> tuple:
        return (
            t["tensor"], "x".join(map(str, t["shape"])) or "scalar", t["relative_path"],
            t["relative_change"], t["straightness"], t["rotation"], t["mean_change"],
        )  # fmt: skip

    frozen = [t for t in m.tensors if t["numel"] and t["path_l1"] == 0]
    parts = [
        h.paragraph(
            "Relative path = path length ‖ΔW‖ summed over intervals / mean ‖W‖; straightness = net "
            "‖W_T - W_0‖ / path length (1 = straight line); rotation = 1 - cos(W_T, W_0). Formulas: "
            "docs/metrics.md."
        ),
        "<h3>Top movers</h3>",
        h.table(cols, [row(t) for t in ranked[:TOP]]),
        "<h3>Least moved</h3>",
        h.table(cols, [row(t) for t in ranked[::-1][:TOP]]),
        "<h3>Frozen</h3>",
        h.paragraph(
            f"{len(frozen)} tensors never changed: " + ", ".join(t["tensor"] for t in frozen)
            if frozen
            else "No tensor is frozen: every tensor changed."
        ),
    ]
    partial = [t for t in m.tensors if t["rows_unchanged"] and t["path_l1"] and len(t["shape"]) >= 1]
    if partial:
        parts.append(
            h.table(
                ["tensor", "rows that never changed", "of rows"],
                [(t["tensor"], t["rows_unchanged"], t["rows"]) for t in partial],
            )
        )
    return h.section("Top movers and frozen parts", *parts, anchor="movers")


def _profiles(m: RunMetrics, found: Sequence[Finding]) -> str:
    flagged = [f.tensor for f in found if f.kind == "unchanged_rows"]
    embeddings = [
        t["tensor"]
        for t in m.tensors
        if len(t["shape"]) == 2 and is_embedding(t["tensor"]) and t["tensor"] not in flagged and t["rows"] > 1
    ]
    chosen = (flagged + embeddings)[:PROFILES]
    if not chosen:
        return ""
    pictures = [
        h.image(figures.row_profile(n, m.neuron_change[n]), "image/png", f"per-row change of {n}")
        for n in chosen
    ]
    return h.section(
        "Per-row change",
        h.paragraph(
            "Accumulated |ΔW| summed over each row (token, position or output unit); red: never changed."
        ),
        *pictures,
        anchor="chart-rows",
    )


CHARTS_SKIPPED = "Charts skipped (--no-render): `wdiff report` on this results folder draws them."


def run_page(
    res: Results,
    m: RunMetrics,
    found: Sequence[Finding],
    pictures: Callable[[], Sequence[tuple]],
    *,
    charts: bool = True,
) -> str:
    """The page; ``pictures()`` (name, bytes, MIME type of each 3D picture) is called last, once
    every other section is drawn."""
    s = res.summary
    name = Path(s.get("source") or res.path).name
    steps = [c.get("step") for c in s["checkpoints"]]
    sections = [_summary_section(res, m), _findings_section(found)]
    if charts:
        sections += _charts(m, s, steps)
    else:
        sections.append(h.paragraph(CHARTS_SKIPPED, "sub"))
    sections.append(_update_size(m, s.get("trainer_state"), found))
    sections.append(_movers(m))
    if charts:
        sections.append(_profiles(m, found))
    sections.append(_rank_section(s))
    sections.append(_experts_section(m))
    anchors = {a for part in sections for a in _ANCHOR.findall(part)}
    sections.insert(0, _advice_section(found, anchors, s))
    drawn = pictures()
    if drawn:
        sections.append(h.section("3D view", *(h.image(data, mime, n, n) for n, data, mime in drawn)))
    subtitle = f"wdiff report: {len(steps)} checkpoints, {len(m.tensors)} tensors, {len(found)} findings"
    return h.page(f"{name}: what happened in training", subtitle, sections)


def _charts(m: RunMetrics, s: dict, steps: Sequence[int | None]) -> list[str]:
    """The training curves and the block x interval heatmap (matplotlib)."""
    return [
        h.section(
            "Training curves",
            h.image(
                figures.training_curves(m, s.get("trainer_state"), steps),
                "image/png",
                "training curves",
                "From trainer_state.json when present (loss, eval loss, learning rate, grad norm); bottom: "
                "the whole model's ‖ΔW‖/‖W‖ per step in each interval. Grey lines: checkpoints.",
            )
            + (
                ""
                if s.get("trainer_state")
                else h.paragraph("No trainer_state.json in this run: no loss curve.")
            ),
            anchor="chart-curves",
        ),
        h.section(
            "Change per block and interval",
            h.image(
                figures.block_heatmap(m, short_names(m.blocks)),
                "image/png",
                "block x interval heatmap",
                "‖ΔW‖/‖W‖ of each block per training step, log colour scale; rows in network order.",
            ),
            anchor="chart-blocks",
        ),
    ]


_ANCHOR = re.compile(r'<section id="([^"]+)"')


def _advice_section(found: Sequence[Finding], anchors: set[str], summary: dict | None = None) -> str:
    """The "what to change" box at the top: ``advice.suggest``, each item linked to its findings
    and to the section that shows the evidence (the findings table when that section is not drawn);
    the rank hint, when it is the only item, under "nothing calls for a change"."""
    suggestions = advice.suggest(found, summary=summary)
    if not any(s.findings for s in suggestions):
        hints = [
            f'<li data-kind="{h.esc(s.kind)}">{h.esc(s.text)}<br><span class="why">'
            f'<a href="#{h.esc(s.chart)}">{h.esc(_SECTION_NAMES.get(s.chart, s.chart))}</a></span></li>'
            for s in suggestions
        ]
        return h.section(
            "What to change",
            h.paragraph("Nothing: no finding calls for a change.", "ok"),
            ("<ol>" + "".join(hints) + "</ol>") if hints else "",
            anchor="what-to-change",
        )
    items = []
    for s in suggestions:
        links = [
            f'<a href="#finding-{i}">{h.esc(found[i].kind)} <code>{h.esc(found[i].tensor)}</code></a>'
            for i in s.findings[:4]
        ]
        if len(s.findings) > 4:
            links.append(f"and {len(s.findings) - 4} more")
        if not s.findings:
            links.append("information, not a finding")
        chart = s.chart if s.chart in anchors else "findings"
        items.append(
            f'<li data-kind="{h.esc(s.kind)}">{h.esc(s.text)}<br><span class="why">evidence: '
            + ", ".join(links)
            + f'; <a href="#{h.esc(chart)}">{h.esc(_SECTION_NAMES.get(chart, chart))}</a></span></li>'
        )
    return (
        '<div class="advice">'
        + h.section(
            "What to change",
            h.paragraph(f"{len(suggestions)} suggestions, most important first, drawn from the findings."),
            "<ol>" + "".join(items) + "</ol>",
            anchor="what-to-change",
        )
        + "</div>"
    )


_SECTION_NAMES = {
    "findings": "findings table",
    "chart-curves": "training curves",
    "chart-blocks": "block x interval heatmap",
    "chart-rows": "per-row change",
    "update-size": "update size per block",
    "movers": "top movers",
    rank_hint.ANCHOR: "rank of the update",
}


def _experts_section(m: RunMetrics) -> str:
    """Per MoE layer (``wdiff.experts``): how much its experts moved (per element, accumulated), the
    spread between them, its router's change and the starved experts. Empty for a dense model."""
    moe = experts.layers(m)
    if not moe:
        return ""

    def g(value: float | None) -> str:
        return "" if value is None else f"{value:.3g}"

    rows = []
    for layer in moe:
        values = list(layer.change.values())
        rows.append(
            (
                layer.prefix,
                len(values),
                g(min(values)),
                g(layer.median),
                g(max(values)),
                g(layer.spread) if layer.spread is not None else "inf",
                g(layer.router_median) if layer.router else "",
                ", ".join(map(str, layer.starved)),
            )
        )
    return h.section(
        "Experts",
        h.paragraph(
            "Per mixture-of-experts layer: each expert's accumulated change per element (smallest, "
            f"median, largest), the largest over the smallest, the median change of a router row, and the "
            f"experts that moved at most {experts.STARVED:g}x the median (starved: the router sends them "
            "almost no tokens). Formulas: docs/metrics.md."
        ),
        h.table(["layer", "experts", "least", "median", "most", "spread", "router row", "starved"], rows),
        anchor="experts",
    )


def _rank_section(summary: dict) -> str:
    """Per tensor group: the median ranks that hold 50/90/99% of the update ``W(T) - W(0)``
    (``wdiff.rank_hint``); for a LoRA run, r configured against the rank the adapters use. Empty when
    no tensor has an ``update_spectrum``."""
    rows = rank_hint.groups(summary)
    if not rows:
        return ""
    lora = rank_hint.is_lora(rows)

    def rank(g: rank_hint.GroupRank, f: str) -> Any:
        value = g.energy[f]
        return f"> {g.k}" if value == float("inf") else value

    headers = ["group", "tensors", "shape", "rank for 50%", "rank for 90%", "rank for 99%", "effective rank"]
    table = [
        (g.label, len(g.tensors), g.shape, *(rank(g, f) for f in rank_hint.ENERGIES), g.effective_rank)
        + ((g.r, g.rank_held) if lora else ())
        for g in rows
    ]
    return h.section(
        "Rank of the update",
        h.paragraph(
            "Per group of tensors (the same tensor in every block), medians over its tensors: the least "
            "rank r whose top r singular values hold 50%, 90%, 99% of the squared total update "
            "W(T) - W(0) (the LoRA rank that would hold that share), and the effective rank."
            + (
                " LoRA: r configured against the rank that holds 99% of an adapter's own weight"
                " B(T) A(T) (the largest in the group)."
                if lora
                else ""
            )
            + " Information, not a finding. Formulas: docs/metrics.md."
        ),
        h.table(headers + (["r", "rank holding 99%"] if lora else []), table),
        anchor=rank_hint.ANCHOR,
    )


def _update_size(m: RunMetrics, trainer_state: dict | None, found: Sequence[Finding]) -> str:
    """Per block: the update ratio per step, the effective learning rate and the peer factor
    (``wdiff.indicators``), the blocks named by a finding marked."""
    if not m.spans:
        return ""
    ind = block_indicators(m, trainer_state)
    flagged = {f.tensor: f.kind for f in found if f.kind in ("lr_outlier", "stopped_moving")}
    names = short_names(ind.blocks)
    rows = []
    for b, block in enumerate(ind.blocks):
        update = ind.update[b][np.isfinite(ind.update[b])]
        per_lr = ind.per_lr[b][np.isfinite(ind.per_lr[b])]
        median = float(np.median(update)) if update.size else None
        rows.append(
            (
                names[b],
                median,
                median / RULE_OF_THUMB if median is not None else None,
                float(np.median(per_lr)) if per_lr.size else None,
                ind.factor(block) if np.isfinite(ind.factor(block)) else None,
                flagged.get(block, ""),
            )
        )
    return h.section(
        "Update size against the learning rate",
        h.paragraph(
            "Per block, medians over the intervals: the update ratio ‖ΔW‖/‖W‖ per step (the rule of thumb "
            "for one step is about 1e-3, Karpathy's CS231n notes; between checkpoints this is a lower "
            "bound), the same per unit of learning rate (the block's effective learning rate; empty "
            "without a logged learning rate) and how many times more its tensors moved per step than the "
            "same tensors in the other blocks (peer factor). Formulas and thresholds: docs/metrics.md."
        ),
        h.table(
            ["block", "update ratio / step", "x 1e-3", "per unit of LR", "peer factor", "finding"],
            rows,
        ),
        anchor="update-size",
    )
