"""The findings as a short rich table for the terminal (the full messages are in findings.json)."""

from __future__ import annotations

from collections.abc import Sequence

from wdiff.finding_groups import group
from wdiff.findings import Finding

SHOWN = 12  # groups; the rest are counted below the table


def _ranges(rows: list[list[int]] | None) -> str:
    if not rows:
        return ""
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in rows[:4])
    return text + (" ..." if len(rows) > 4 else "")


def findings_table(found: Sequence[Finding], where: str):
    """A rich Table of the findings grouped (``wdiff.finding_groups``), most severe first: kind, what
    (the tensor, rows and steps of a finding alone; the pattern of a group), how many findings. What
    each may mean and what to try is in findings.json and report.html, too long for a terminal."""
    from rich.table import Table

    groups = group(found)
    title = f"{len(found)} findings"
    if len(groups) < len(found):
        title += f" in {len(groups)} group{'s' if len(groups) > 1 else ''}"
    table = Table(title=f"{title} (details: {where})", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("what", overflow="fold")
    table.add_column("rows")
    table.add_column("steps", no_wrap=True)
    table.add_column("n", justify="right")
    for g in groups[:SHOWN]:
        first = found[g.members[0]]
        if len(g.members) == 1:
            table.add_row(
                g.kind, first.tensor, _ranges(first.rows), "-".join(map(str, first.steps or [])), "1"
            )
        else:
            table.add_row(g.kind, g.headline.removeprefix(f"{g.kind} in "), "", "", str(len(g.members)))
    if len(groups) > SHOWN:
        rest = groups[SHOWN:]
        table.caption = f"... and {len(rest)} more groups ({sum(len(g.members) for g in rest)} findings)"
    return table
