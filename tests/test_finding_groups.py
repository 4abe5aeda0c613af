"""Findings grouped for reading (wdiff.finding_groups): one entry per pattern across blocks, one hint,
most severe first, in the terminal table and report.html; findings.json keeps every finding."""

from __future__ import annotations

import json
import re

from test_findings import _bf16_run

import wdiff
from wdiff import finding_groups
from wdiff.findings import Finding
from wdiff.report.build import read_findings
from wdiff.report.table import findings_table

HINT = "In BF16, an update smaller than half the spacing is rounded away. Try: fp32 master weights."


def _stalled(layer: int, which: str, count: int) -> Finding:
    name = f"model.layers.{layer}.{which}.weight"
    return Finding(
        "stalled_elements", name, f"{count} of 2048 elements of {name} (BF16) never changed. {HINT}",
        rows=[[0, count - 1]],
    )  # fmt: skip


def test_a_llama_like_list_is_a_few_groups():
    found = [
        _stalled(b, w, 1 + (b % 10))
        for b in range(16)
        for w in ("input_layernorm", "post_attention_layernorm")
    ]
    found = found[:31]  # 31 norm weights, as on the 1B run of issue 19
    found.append(
        Finding("frozen", "model.layers.3.mlp.up_proj.weight", "It did not change. It was not trained.")
    )
    found.append(
        Finding("frozen", "model.layers.3.mlp.down_proj.weight", "It did not change. It was not trained.")
    )
    found.append(
        Finding("unchanged_rows", "model.embed_tokens.weight", "28256 rows never changed. Tokens unused.")
    )
    found.append(Finding("lr_outlier", "model.layers.9", "model.layers.9 moves 10x faster. Lower its LR."))
    groups = finding_groups.group(found)
    assert [(g.kind, len(g.members)) for g in groups] == [
        ("frozen", 2),
        ("lr_outlier", 1),
        ("unchanged_rows", 1),
        ("stalled_elements", 31),
    ]
    assert groups[0].headline == (
        "frozen in model.layers.3.mlp: 2 tensors (down_proj, up_proj), "
        "every weight identical at every checkpoint"
    )
    stalled = groups[-1]
    assert stalled.headline == "stalled_elements in 31 norm scales, layers 0-15: 1-10 elements each"
    assert stalled.hint == HINT  # once, without any one tensor's name
    assert sorted(i for g in groups for i in g.members) == list(range(len(found)))  # nothing lost


def test_frozen_across_blocks_is_one_group_but_not_across_causes():
    found = [
        Finding("frozen", f"model.layers.{b}.mlp.up_proj.weight", "x did not change. Not trained.")
        for b in (1, 2, 5)
    ]
    found.append(Finding("frozen", "model.norm.weight", "x did not change. Likely cause: BF16 rounding."))
    groups = finding_groups.group(found)
    assert [(g.kind, len(g.members)) for g in groups] == [("frozen", 3), ("frozen", 1)]
    assert (
        groups[0].headline
        == "frozen in 3 up_proj tensors, layers 1-2, 5: every weight identical at every checkpoint"
    )
    assert groups[1].headline == "x did not change." and groups[1].hint == "Likely cause: BF16 rounding."


def test_a_real_bf16_run_in_the_terminal_and_the_report(tmp_path):
    res = wdiff.run(_bf16_run(tmp_path / "run"), tmp_path / "out", render=False)
    found = read_findings(res.path)
    assert len(json.loads((res.path / "findings.json").read_text())["findings"]) == len(found) == 6
    groups = finding_groups.group(found)
    assert [(g.kind, len(g.members)) for g in groups] == [
        ("frozen", 1),
        ("frozen", 1),
        ("stalled_elements", 4),
    ]
    assert groups[2].headline == "stalled_elements in 4 norm scales, layers 0-3: 5 elements each"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(findings_table(found, "findings.json"))
    text = console.export_text()
    assert text.startswith("6 findings in 3 groups")
    assert re.search(
        r"stalled_elements\s+│\s+4 norm scales, layers 0-3: 5 elements each\s+│\s+│\s+│\s+4", text
    )
    page = (res.path / "report.html").read_text()
    section = page[page.index('id="findings"') :]
    assert "6 findings (frozen: 2, stalled_elements: 4), in 3 groups" in section
    assert section.count("<details>") == 1 and "the 4 findings" in section
    for i in range(len(found)):  # every finding keeps its anchor (what-to-change links to them)
        assert f'id="finding-{i}"' in section


def test_many_groups_are_counted_below_the_table():
    found = [Finding("lr_outlier", f"model.layers.{b}", "m. h.") for b in range(15)]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(findings_table(found, "f.json"))
    assert "... and 3 more groups (3 findings)" in console.export_text()
