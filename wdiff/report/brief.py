"""What ``--json`` prints on stdout: one JSON object summing up a results folder (``wdiff run``,
``wdiff report``) or a comparison (``wdiff compare``) for scripts and CI, in place of the lines for
people. Its keys are listed in ``docs/cli.md``; ``schema`` (``wdiff.schema.JSON_SCHEMA``) changes
when a key changes meaning or goes away.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wdiff import advice
from wdiff.findings import Finding
from wdiff.marker import is_wdiff_name, regular_file
from wdiff.report.build import REPORT
from wdiff.report.compare import COMPARE_CSV, COMPARE_JSON, SIDE_BY_SIDE, Comparison
from wdiff.results import Results
from wdiff.schema import JSON_SCHEMA
from wdiff.timeline import safe_ratio


def files(folder: Path, names: Sequence[str] | None = None) -> dict[str, str]:
    """``{file name: path}`` of the results files in ``folder`` (regular files wdiff writes, sorted;
    only ``names`` when given)."""
    try:
        found = sorted(os.listdir(folder)) if names is None else list(names)
    except OSError:
        return {}
    keep = [n for n in found if not n.startswith(".") and (names is not None or is_wdiff_name(n))]
    return {n: str(folder / n) for n in keep if regular_file(folder, n) is not None}


def count_kinds(found: Sequence[Finding]) -> dict[str, int]:
    """How many findings of each kind, in the order the kinds first appear (as findings.json)."""
    counts: dict[str, int] = {}
    for f in found:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return counts


def run_brief(
    command: str,
    res: Results,
    found: Sequence[Finding],
    fail_on: Sequence[str] | None = None,
    failing: Sequence[Finding] = (),
    exit_code: int = 0,
) -> dict[str, Any]:
    """The JSON summary of the results ``res`` and its findings ``found`` after ``command``; with
    ``fail_on`` (the kinds of ``--fail-on``) the findings of those kinds and the exit code."""
    s = res.summary
    timing = s.get("timing") or {}
    tensors = s["tensors"]
    brief: dict[str, Any] = {
        "schema": JSON_SCHEMA,
        "command": command,
        "out": str(res.path),
        "source": s.get("source"),
        "update": s.get("update", "full"),
        "wdiff_version": s.get("wdiff_version"),
        "checkpoints": len(s["checkpoints"]),
        "steps": [c.get("step") for c in s["checkpoints"]],
        "tensors": len(tensors),
        "weights": sum(t["numel"] for t in tensors.values()),
        "skipped": len(s.get("skipped") or []),
        "left_out": len(s.get("left_out") or []),
        "warnings": len(s.get("warnings") or []),
        "read_bytes": timing.get("read_bytes"),
        "timing": {
            k: timing[k] for k in ("compute_seconds", "spectrum_seconds", "total_seconds") if k in timing
        },
        "points": (s.get("scene") or {}).get("points"),
        "map_dtype": s.get("map_dtype", "float32"),  # "none": no accumulated.safetensors
        "findings": {"count": len(found), "by_kind": count_kinds(found)},
        "what_to_change": [x.to_json() for x in advice.suggest(found, summary=s)],
        "files": files(res.path),
    }
    if fail_on is not None:
        brief["fail_on"] = {
            "kinds": list(fail_on),
            "findings": len(failing),
            "by_kind": count_kinds(failing),
            "exit_code": exit_code,
        }
    return brief


def compare_brief(result: Comparison, run_a: str | os.PathLike[str], run_b: str | os.PathLike[str]) -> dict:
    """The JSON summary of ``wdiff compare``: the runs, the total L1 path length of A and B and B / A,
    per block the same, the range of the per-block ratios, the files written."""
    ratios = [x["path_l1_ratio"] for x in result.blocks if x["path_l1_ratio"] is not None]
    total_a = sum(t["a_path_l1"] for t in result.tensors)
    total_b = sum(t["b_path_l1"] for t in result.tensors)
    out = result.path.parent
    return {
        "schema": JSON_SCHEMA,
        "command": "compare",
        "out": str(out),
        "a": str(run_a),
        "b": str(run_b),
        "tensors": len(result.tensors),
        "path_l1": {"a": total_a, "b": total_b, "ratio": safe_ratio(total_b, total_a)},
        "block_ratio": {"min": min(ratios), "max": max(ratios)} if ratios else None,
        "blocks": list(result.blocks),
        "files": files(out, (COMPARE_CSV, COMPARE_JSON, SIDE_BY_SIDE, REPORT)),
    }
