"""Findings grouped for reading: findings of one kind that follow one pattern across blocks are one
entry ("stalled_elements in 31 norm scales, layers 0-15: 1-10 elements each"), with one hint, ranked
by severity. A presentation of ``findings.json``, which keeps every finding: ``group(found)`` is
deterministic, so a tool reading the list gets the same groups.

What is one pattern (``_key``):

- ``frozen`` tensors of one part of a block (``model.layers.5.mlp``: a whole MLP frozen);
- ``frozen``, ``unchanged_rows``, ``stalled_elements``, ``outlier_change``, ``nonfinite``: the same
  kind of tensor in different blocks (``metrics.group_of``, expert numbers too; every norm scale is one
  kind), and for ``frozen`` the same cause (rounding or not);
- ``spike``: the same steps;
- anything else (a block's ``lr_outlier``, ``stopped_moving``, ``expert_starved``, a broken
  checkpoint): its own entry.

Ranked by ``advice.SEVERITY`` (non-finite, broken checkpoints, stopped or starved parts, frozen
tensors, learning rates off, outliers, spikes, unused rows, stalled elements), then by how many
findings a group holds, then by the first finding's place in ``findings.json``.

    from wdiff import finding_groups
    for g in finding_groups.group(found): print(g.kind, g.headline, len(g.members))
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from wdiff.advice import SEVERITY, UNKNOWN
from wdiff.findings import ROUNDING, Finding, tensor_kind
from wdiff.naming import block_of

#: kinds grouped across blocks by the kind of tensor they are about
ACROSS_BLOCKS = ("frozen", "unchanged_rows", "stalled_elements", "outlier_change", "nonfinite")


@dataclass(frozen=True)
class FindingGroup:
    kind: str
    headline: str  # what was seen, one line (the finding's first sentence when it stands alone)
    hint: str  # what it may mean and what to try, once for the group
    members: list[int]  # indices into the findings list (report.html#finding-<i>)
    severity: int

    def tensors(self, found: Sequence[Finding]) -> list[str]:
        return [found[i].tensor for i in self.members]


def _part(name: str) -> str:
    """The part of its block a tensor is in (``model.layers.5.mlp.up_proj.weight`` ->
    ``model.layers.5.mlp``)."""
    block = block_of(name)
    rest = name[len(block) + 1 :].split(".") if name.startswith(block + ".") else []
    return f"{block}.{rest[0]}" if len(rest) > 1 else block


def _key(f: Finding, parts: Counter) -> tuple:
    if f.kind == "frozen" and f.tensor != "*" and parts[_part(f.tensor)] > 1:
        return (f.kind, "part", _part(f.tensor), ROUNDING in f.message)  # a whole MLP frozen: one entry
    if f.kind in ACROSS_BLOCKS and f.tensor != "*":
        return (f.kind, tensor_kind(f.tensor), f.kind == "frozen" and ROUNDING in f.message)
    if f.kind == "spike":
        return (f.kind, tuple(f.steps or ()))
    return (f.kind, f.tensor, tuple(f.steps or ()))


def _first_sentence(message: str) -> tuple[str, str]:
    """The message split after its first sentence (a dot followed by a space and a capital)."""
    hit = re.search(r"\.\s+(?=[A-Z])", message)
    if not hit:
        return message, ""
    return message[: hit.start() + 1], message[hit.end() :]


def _numbers(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out: list[str] = []
    values = sorted(set(values))
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def _where(tensors: Sequence[str]) -> str:
    """Where the members are: ``layers 0-15`` for numbered blocks (``model.layers.7`` -> 7), other
    blocks by name (``bert.embeddings, layer 0-4``)."""
    heads: dict[str, list[int]] = {}
    others: list[str] = []
    for t in tensors:
        block = block_of(t)
        head, _, number = block.rpartition(".")
        if number.isdigit():
            heads.setdefault(head.rsplit(".", 1)[-1] or block, []).append(int(number))
        elif block not in others:
            others.append(block)
    parts = others[:3] + (["and more"] if len(others) > 3 else [])
    parts += [f"{head} {_numbers(numbers)}" for head, numbers in heads.items()]
    return ", ".join(parts)


def _what(family: str, count: int) -> str:
    if family.startswith("norm."):
        return f"{count} norm {'scales' if family == 'norm.weight' else family.split('.', 1)[1] + 's'}"
    tail = family.removesuffix(".weight").rsplit(".", 1)[-1]
    return f"{count} {tail} tensors"


def _span(counts: Sequence[int], unit: str) -> str:
    low, high = min(counts), max(counts)
    return f"{low} {unit} each" if low == high else f"{low}-{high} {unit} each"


def _detail(kind: str, members: Sequence[Finding]) -> str:
    counts = [sum(b - a + 1 for a, b in f.rows or []) for f in members]
    if kind == "stalled_elements":
        return _span(counts, "elements")
    if kind == "unchanged_rows":
        return _span(counts, "rows")
    if kind == "frozen":
        return "every weight identical at every checkpoint"
    if kind == "outlier_change":
        more = sum(" more " in f.message for f in members)
        return (
            "moved far more than the same tensors in other blocks"
            if more == len(members)
            else "moved far less than the same tensors in other blocks"
            if more == 0
            else f"{more} moved far more, {len(members) - more} far less than their peers"
        )
    if kind == "nonfinite":
        steps = sorted({f.steps[0] for f in members if f.steps})
        return f"NaN/Inf from step {steps[0]} on" if steps else "NaN/Inf"
    return ""


def _headline(kind: str, members: Sequence[Finding]) -> str:
    if len(members) == 1:
        return _first_sentence(members[0].message)[0]
    if kind == "spike":
        steps = "-".join(map(str, members[0].steps or []))
        return f"spike in {len(members)} tensors ({_where([f.tensor for f in members])}) at steps {steps}"
    if kind == "frozen" and len({_part(f.tensor) for f in members}) == 1:
        tails = ", ".join(sorted(f.tensor.removesuffix(".weight").rsplit(".", 1)[-1] for f in members))
        part = _part(members[0].tensor)
        return (
            f"frozen in {part}: {len(members)} tensors ({tails}), every weight identical at every checkpoint"
        )
    family = tensor_kind(members[0].tensor)
    detail = _detail(kind, members)
    where = _where([f.tensor for f in members])
    return f"{kind} in {_what(family, len(members))}, {where}" + (f": {detail}" if detail else "")


def _hint(members: Sequence[Finding]) -> str:
    """What the members' messages say after what was seen: the first one's (they share it)."""
    first, rest = _first_sentence(members[0].message)
    if len(members) == 1:
        return rest
    # a per-tensor sentence may follow; a hint with the tensor's name would mislead for the others
    name = members[0].tensor
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", rest)
    return " ".join(s for s in sentences if name not in s)


def group(found: Sequence[Finding]) -> list[FindingGroup]:
    """The findings as groups, most severe first (module docstring)."""
    parts = Counter(_part(f.tensor) for f in found if f.kind == "frozen" and f.tensor != "*")
    keys: dict[tuple, list[int]] = {}
    for i, f in enumerate(found):
        keys.setdefault(_key(f, parts), []).append(i)
    groups = []
    for indices in keys.values():
        members = [found[i] for i in indices]
        kind = members[0].kind
        groups.append(
            FindingGroup(
                kind=kind,
                headline=_headline(kind, members),
                hint=_hint(members),
                members=indices,
                severity=SEVERITY.get(kind, UNKNOWN),
            )
        )
    return sorted(groups, key=lambda g: (-g.severity, -len(g.members), g.members[0]))
