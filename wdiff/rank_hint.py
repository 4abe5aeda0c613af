"""The rank of the update per tensor group, and the one hint drawn from it (what LoRA rank would do).

Information, not a problem: never a finding (``findings.json`` stays empty on a healthy run). The
report's "Rank of the update" table is ``groups(summary)``; the hint ``hint(summary)`` joins the
suggestions of ``wdiff.advice`` below every finding's.

- full fine-tune: per group (``metrics.group_of``; every expert of a MoE layer in one group too) the
  median ``rank_for_energy["0.9"]`` over its tensors; the groups whose rank is small (at most
  ``LORA_MAX`` and a quarter of the matrix's short side) get a LoRA rank, the largest of theirs rounded
  up to a power of two; the others are named with the rank they need.
- LoRA run: per group the largest rank that holds 99% of an adapter's own weight ``B(T) A(T)``
  (``lora.rank_for_energy["0.99"]``; ``lora.rank_used``, the numerical rank, for results written before
  it existed). Every rank needed (``>= r``): the adapters are saturated, a larger ``r`` may fit better;
  at most ``r / 2``: a smaller ``r`` (that rank rounded up to a power of two) would do. Validated on
  real LoRA runs of one model at r = 4, 8 and 32 against a full fine-tune (tests/test_fine_tune.py).

    from wdiff import rank_hint
    for g in rank_hint.groups(summary): print(g.label, g.energy["0.9"], g.rank_used, g.r)
    print(rank_hint.hint(summary))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from wdiff.experts import group_key

ENERGIES = ("0.5", "0.9", "0.99")
SHARE = "0.9"  # the share of the update the hint's LoRA rank holds
LORA_MAX = 64  # a group needing more than this rank is not a LoRA candidate
SIDE_FRACTION = 0.25  # nor one needing more than this share of its matrix's short side
LORA_HELD = "0.99"  # the share of an adapter's weight B(T) A(T) that its "rank held" holds
ANCHOR = "update-rank"  # report.html#update-rank


@dataclass(frozen=True)
class GroupRank:
    group: str  # metrics.group_of, or the tensor's name when it is in no numbered block
    label: str  # short name: q_proj, mlp.up_proj, ...
    tensors: list[str]
    shape: str  # "64x96" (the shapes of its tensors, joined when they differ)
    side: int  # min(m, n) of its matrices (the smallest)
    k: int  # the most singular values listed for a tensor of the group
    energy: dict[str, float]  # median rank_for_energy per share; inf: above k for most tensors
    effective_rank: float | None  # median
    grouped: bool  # in numbered blocks (group_of is not None)
    r: int | None = None  # LoRA: configured rank (the largest in the group)
    rank_used: int | None = None  # LoRA: the largest numerical rank of an adapter's B(T) A(T)
    rank_held: int | None = None  # LoRA: the largest rank holding LORA_HELD of an adapter's B(T) A(T)

    def needs(self, share: str = SHARE) -> str:
        value = self.energy[share]
        return f"more than {self.k}" if math.isinf(value) else f"{math.ceil(value)}"


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def _labels(groups: list[str]) -> dict[str, str]:
    """The shortest dotted tail (without ``.weight``) that tells the groups apart."""
    parts = {g: g.removesuffix(".weight").split(".") for g in groups}
    labels = {}
    for g, p in parts.items():
        for n in range(1, len(p) + 1):
            tail = ".".join(p[-n:])
            if all(g2 == g or ".".join(q[-n:]) != tail for g2, q in parts.items()):
                break
        labels[g] = tail
    return labels


def groups(summary: Mapping) -> list[GroupRank]:
    """One row per group of tensors with an ``update_spectrum`` (none: empty), in the order of first
    appearance; tensors whose update is zero or not finite are left out, and so are a LoRA run's
    factors (``lora_A``, ``lora_B``: their product is the update)."""
    members: dict[str, list[tuple[str, dict, dict]]] = {}
    tensors = summary.get("tensors") or {}
    products = any((e.get("update_spectrum") or {}).get("lora") for e in tensors.values())
    for name, entry in tensors.items():
        spec = entry.get("update_spectrum")
        if not spec or not spec.get("singular_values") or spec.get("effective_rank") is None:
            continue
        if products and ".lora_" in name:  # a factor of an adapter whose product has a row of its own
            continue
        members.setdefault(group_key(name), []).append((name, entry, spec))
    labels = _labels(list(members))
    rows = []
    for group, items in members.items():
        shapes = list(dict.fromkeys("x".join(map(str, e.get("shape") or [])) for _, e, _ in items))
        sides = [min(int(e["shape"][0]), math.prod(e["shape"][1:])) for _, e, _ in items if e.get("shape")]
        energy = {
            f: _median(
                [
                    math.inf if s["rank_for_energy"].get(f) is None else s["rank_for_energy"][f]
                    for *_, s in items
                ]
            )
            for f in ENERGIES
        }
        loras = [s["lora"] for *_, s in items if s.get("lora")]
        rows.append(
            GroupRank(
                group=group,
                label=labels[group],
                tensors=[n for n, _, _ in items],
                shape=", ".join(shapes),
                side=min(sides) if sides else 0,
                k=max(int(s["k"]) for *_, s in items),
                energy=energy,
                effective_rank=_median([s["effective_rank"] for *_, s in items]),
                grouped=group != items[0][0],
                r=max(lo["r"] for lo in loras) if loras else None,
                rank_used=max(lo["rank_used"] for lo in loras) if loras else None,
                rank_held=max(_held(lo) for lo in loras) if loras else None,
            )
        )
    return rows


def _held(lora: Mapping) -> int:
    """The rank holding ``LORA_HELD`` of one adapter's weight (its numerical rank for older results)."""
    held = (lora.get("rank_for_energy") or {}).get(LORA_HELD)
    return int(lora["rank_used"] if held is None else held)


def _lora_hint(rows: list[GroupRank]) -> tuple[str, list[str]] | None:
    """Saturated adapters (every rank needed) and spare ones (half of ``r`` or less holds the weight)."""
    adapters = [g for g in rows if g.r is not None and g.rank_held is not None]
    full = [g for g in adapters if g.rank_held >= g.r]
    spare = [g for g in adapters if 0 < g.rank_held <= g.r / 2]
    share = f"{float(LORA_HELD):.0%}"

    def where(named: list[GroupRank]) -> str:
        return "" if len(named) == len(adapters) else f" on {_names([g.label for g in named])}"

    parts = []
    if full:
        r = max(g.r for g in full)
        parts.append(
            f"The adapters{where(full)} need all r={r} ranks for {share} of their weight: "
            f"a larger r ({2 * r}) may fit this run better"
        )
    if spare:
        held, r = max(g.rank_held for g in spare), max(g.r for g in spare)
        smaller = _power_of_two(held)
        parts.append(
            f"{'the' if parts else 'The'} adapters{where(spare)} hold {share} of their weight in rank "
            f"{held} of r={r}: r={smaller} would do"
        )
    return ("; ".join(parts) + ".", [g.group for g in full + spare]) if parts else None


def _power_of_two(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1))))


def _names(labels: list[str], limit: int = 4) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def is_lora(rows: list[GroupRank]) -> bool:
    return any(g.r is not None for g in rows)


def hint(summary: Mapping) -> tuple[str, list[str]] | None:
    """The hint's sentence and the groups it names, or None (no spectra, or nothing to say)."""
    rows = groups(summary)
    if not rows:
        return None
    if is_lora(rows):
        return _lora_hint(rows)
    pool = [g for g in rows if g.grouped] or rows
    low = [g for g in pool if g.energy[SHARE] <= min(LORA_MAX, SIDE_FRACTION * g.side)]
    high = [g for g in pool if g not in low]
    share = f"{float(SHARE):.0%}"
    if not low:
        least = min(high, key=lambda g: g.energy[SHARE])
        return (
            f"No small LoRA rank would capture {share} of this run's full-weight update: "
            f"{_names([g.label for g in high])} need rank {least.needs()}+ (a full fine-tune fits this run).",
            [g.group for g in high],
        )
    rank = _power_of_two(max(g.energy[SHARE] for g in low))
    where = _names([g.label for g in low])
    text = f"A LoRA of rank {rank} on {where} would capture {share} of this run's full-weight update"
    if high:
        least = min(high, key=lambda g: g.energy[SHARE])
        text += f"; the {_names([g.label for g in high])} updates need rank {least.needs()}+"
    return text + ".", [g.group for g in low + high]
