"""The findings as a short rich table for the terminal (the full messages are in findings.json)."""

from __future__ import annotations

from collections.abc import Sequence

from wdiff.findings import Finding

SHOWN = 20  # rows; the rest are counted below the table


def _ranges(rows: list[list[int]] | None) -> str:
    if not rows:
        return ""
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in rows[:4])
    return text + (" ..." if len(rows) > 4 else "")


def findings_table(found: Sequence[Finding], where: str):
    """A rich Table: kind, tensor, rows, steps. What each may mean and what to try is in the messages
    of findings.json and report.html, too long for a terminal table."""
    from rich.table import Table

    table = Table(title=f"{len(found)} findings (details: {where})", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("tensor", overflow="fold")
    table.add_column("rows")
    table.add_column("steps", no_wrap=True)
    for f in found[:SHOWN]:
        table.add_row(f.kind, f.tensor, _ranges(f.rows), "-".join(map(str, f.steps or [])))
    if len(found) > SHOWN:
        table.caption = f"... and {len(found) - SHOWN} more"
    return table
