"""For scripts and CI: ``--json`` on stdout, ``--fail-on`` exit codes, shell completion, and the schema
versions of ``findings.json`` and ``compare.json``. Real CLI processes on runs with a planted finding
(a frozen tensor, ``factories.sgd_run``) and on a healthy one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import sgd_run, trainer_run

from wdiff import advice
from wdiff.errors import WdiffError
from wdiff.findings import KINDS
from wdiff.report.build import read_findings
from wdiff.results import Results

FROZEN = "layers.2.mlp.weight"


def wdiff(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ci")
    planted, steps = sgd_run(blocks=4, frozen=(FROZEN,))
    healthy, _ = sgd_run(blocks=4)
    return {
        "planted": trainer_run(root / "planted", planted, steps),
        "healthy": trainer_run(root / "healthy", healthy, steps),
        "root": root,
    }


@pytest.fixture(scope="module")
def planted_out(runs) -> tuple[Path, subprocess.CompletedProcess]:
    """``wdiff run --json --fail-on frozen`` on the run with a frozen tensor."""
    out = runs["root"] / "out-planted"
    p = wdiff("run", str(runs["planted"]), "-o", str(out), "--no-render", "--json", "--fail-on", "frozen")
    return out, p


def test_fail_on_a_planted_finding_exits_3_after_writing_everything(planted_out):
    out, p = planted_out
    assert p.returncode == 3, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last == f"wdiff: 1 findings of a --fail-on kind (frozen: 1); results in {out}"
    # the results are complete: they load and check, and every derived file is there
    Results.load(out)
    for name in ("summary.json", "accumulated.safetensors", "findings.json", "metrics.csv", "report.html"):
        assert (out / name).is_file(), name
    assert [(f.kind, f.tensor) for f in read_findings(out)] == [("frozen", FROZEN)]


def test_json_on_stdout_matches_summary_and_findings(planted_out):
    out, p = planted_out
    brief = json.loads(p.stdout)  # stdout holds the JSON and nothing else
    summary = json.loads((out / "summary.json").read_text())
    found = json.loads((out / "findings.json").read_text())
    assert brief["schema"] == 1 and brief["command"] == "run" and brief["out"] == str(out)
    assert brief["checkpoints"] == len(summary["checkpoints"]) == 8
    assert brief["steps"] == [c["step"] for c in summary["checkpoints"]] == list(range(10, 90, 10))
    assert brief["tensors"] == len(summary["tensors"]) == 2 + 3 * 4
    assert brief["weights"] == sum(t["numel"] for t in summary["tensors"].values())
    assert brief["read_bytes"] == summary["timing"]["read_bytes"] == 8 * 4 * brief["weights"]
    assert brief["timing"]["compute_seconds"] == summary["timing"]["compute_seconds"]
    assert brief["timing"]["total_seconds"] == summary["timing"]["total_seconds"]
    assert brief["update"] == summary["update"] == "full" and brief["source"] == summary["source"]
    assert brief["points"] == summary["scene"]["points"]
    assert brief["map_dtype"] == summary["map_dtype"] == "float32"
    assert brief["findings"] == {"count": len(found["findings"]), "by_kind": {"frozen": 1}}
    want = [s.to_json() for s in advice.suggest(read_findings(out), summary=summary)]
    assert brief["what_to_change"] == want and want[0]["kind"] == "frozen" and want[0]["findings"] == [0]
    assert brief["fail_on"] == {"kinds": ["frozen"], "findings": 1, "by_kind": {"frozen": 1}, "exit_code": 3}
    assert set(brief["files"]) >= {
        "summary.json",
        "findings.json",
        "metrics.csv",
        "report.html",
        "points.ply",
    }
    assert all(Path(path) == out / name and Path(path).is_file() for name, path in brief["files"].items())
    assert "render.png" not in brief["files"]  # --no-render


def test_report_fail_on_kinds_any_and_a_kind_not_found(planted_out):
    out, _ = planted_out
    assert wdiff("report", str(out), "-q", "--fail-on", "nonfinite, spike").returncode == 0
    assert wdiff("report", str(out), "-q", "--fail-on", "spike,frozen").returncode == 3
    p = wdiff("report", str(out), "-q", "--fail-on", "any", "--json")
    assert p.returncode == 3
    brief = json.loads(p.stdout)
    assert brief["command"] == "report" and brief["fail_on"]["kinds"] == ["any"]
    assert brief["findings"]["count"] == brief["fail_on"]["findings"] == 1
    p = wdiff("report", str(out), "-q")  # without --json: the line for people
    assert p.returncode == 0 and p.stdout == f"{out / 'report.html'}: 1 findings\n"


def test_a_healthy_run_passes_the_gate(runs):
    out = runs["root"] / "out-healthy"
    p = wdiff("run", str(runs["healthy"]), "-o", str(out), "--no-render", "-q", "--json", "--fail-on", "any")
    assert p.returncode == 0, p.stderr
    brief = json.loads(p.stdout)
    assert brief["findings"] == {"count": 0, "by_kind": {}} and read_findings(out) == []
    assert brief["fail_on"] == {"kinds": ["any"], "findings": 0, "by_kind": {}, "exit_code": 0}
    assert p.stderr == ""


@pytest.mark.parametrize("value", ["frozn", "frozen,", "", "Frozen"])
def test_an_unknown_kind_is_a_usage_error_before_any_work(runs, value):
    out = runs["root"] / f"never-{len(value)}"
    p = wdiff("run", str(runs["planted"]), "-o", str(out), "--fail-on", value)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wdiff: error: --fail-on ")
    assert lines[0].endswith("use any, " + ", ".join(KINDS)), lines[0]
    assert not out.exists()


def test_compare_json_matches_compare_json_file(planted_out, runs):
    healthy = runs["root"] / "out-healthy"
    if not healthy.is_dir():
        assert wdiff("run", str(runs["healthy"]), "-o", str(healthy), "--no-render", "-q").returncode == 0
    out, _ = planted_out
    cmp = runs["root"] / "cmp"
    p = wdiff("compare", str(healthy), str(out), "-o", str(cmp), "--no-render", "--json")
    assert p.returncode == 0, p.stderr
    brief = json.loads(p.stdout)
    doc = json.loads((cmp / "compare.json").read_text())
    assert doc["schema"] == 1 and brief["schema"] == 1 and brief["command"] == "compare"
    assert brief["blocks"] == doc["blocks"] and brief["tensors"] == len(doc["tensors"])
    ratios = [b["path_l1_ratio"] for b in doc["blocks"]]
    assert brief["block_ratio"] == {"min": min(ratios), "max": max(ratios)}
    a = sum(t["a_path_l1"] for t in doc["tensors"])
    b = sum(t["b_path_l1"] for t in doc["tensors"])
    assert brief["path_l1"] == {"a": a, "b": b, "ratio": b / a}
    frozen = next(b for b in doc["blocks"] if b["block"] == "layers.2")  # its mlp never moved in B
    assert frozen["path_l1_ratio"] == brief["block_ratio"]["min"] < 0.6
    assert set(brief["files"]) == {"compare.csv", "compare.json", "report.html"}  # no side_by_side.png


# --- findings.json versions ------------------------------------------------------------------------


def test_findings_json_of_schema_1_2_and_a_newer_one(planted_out, tmp_path):
    out, _ = planted_out
    doc = json.loads((out / "findings.json").read_text())
    assert doc["schema"] == 2 and [f["kind"] for f in doc["findings"]] == ["frozen"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "findings.json").write_text(json.dumps(doc["findings"]))  # what wdiff wrote before: a list
    assert read_findings(old) == read_findings(out)
    (old / "findings.json").write_text(json.dumps({**doc, "schema": 3}))
    with pytest.raises(WdiffError, match=r"findings.json: not wdiff's findings: schema: expected at most 2"):
        read_findings(old)
    (old / "findings.json").write_text(json.dumps({"schema": 2, "findings": [{"kind": "frozen"}]}))
    with pytest.raises(WdiffError, match=r"findings\[0\]\.tensor: expected a string"):
        read_findings(old)
    (old / "findings.json").write_text('{"findings": []}')
    with pytest.raises(WdiffError, match=r'an object with "schema" and "findings"'):
        read_findings(old)
    # a key a later wdiff may add to a finding is left out, not a TypeError
    extra = {"schema": 2, "findings": [{**doc["findings"][0], "severity": 70}]}
    (old / "findings.json").write_text(json.dumps(extra))
    assert read_findings(old) == read_findings(out)


# --- shell completion --------------------------------------------------------------------------------


def test_show_completion_prints_a_bash_script():
    p = wdiff("--show-completion", "bash")
    assert p.returncode == 0, p.stderr
    assert "_WDIFF_COMPLETE=complete_bash" in p.stdout
    assert "complete -o default -F _wdiff_completion wdiff" in p.stdout
    assert "--install-completion" in wdiff("--help").stdout


@pytest.mark.parametrize(
    "words, cword, offered",
    [
        ("wdiff r", 1, ["run", "report"]),
        ("wdiff co", 1, ["compare"]),
        ("wdiff report --fa", 2, ["--fail-on"]),
        ("wdiff run x --js", 3, ["--json"]),
    ],
)
def test_bash_completes_commands_and_options(words, cword, offered):
    """The protocol of the script above: the shell runs ``wdiff`` with the words in the environment."""
    env = {**os.environ, "_WDIFF_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    p = wdiff(env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == offered
