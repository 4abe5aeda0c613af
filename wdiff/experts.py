"""Mixture-of-experts health: how much each expert of each MoE layer moved, and the router's own change.

A MoE layer is found by its tensors' names, in the layouts checkpoints use:

- one tensor set per expert: ``<moe>.experts.<E>.<rest>`` (Mixtral ``block_sparse_moe.experts.3.w1.weight``,
  Qwen-MoE / DeepSeek ``mlp.experts.3.gate_proj.weight``; ``shared_experts`` are not routed and not
  counted);
- fused experts, the expert first: ``<moe>.experts.<proj>`` of 3 dimensions (transformers 5's
  ``mlp.experts.gate_up_proj`` (E, 2I, H)); an expert's change is its row of ``rows.safetensors``;
- the router: ``<moe>.gate.weight`` (or ``router.weight``, ``router.layer.weight``, ``gate.wg.weight``),
  one row per expert.

An expert's change is its accumulated change per element, ``sum accumulated_l1 / sum numel`` over its
tensors; the router's change per expert is the accumulated change of that row per element. An expert is
**starved** when it moved at most ``STARVED`` times the median expert of its layer (an expert that no
token reaches gets no gradient: only weight decay, or nothing, moves it). The router's row says the same
from the other side when it is given. Thresholds and how they were chosen: docs/metrics.md.

    from wdiff import experts, metrics
    for layer in experts.layers(metrics.analyse(res)): print(layer.prefix, layer.change, layer.starved)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wdiff.metrics import RunMetrics

#: an expert moving at most this share of its layer's median expert is starved
STARVED = 0.1
#: a layer needs at least this many experts for a median to mean anything
MIN_EXPERTS = 3
ROUTERS = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight")

_ONE = re.compile(r"^(?P<moe>.+)\.experts\.(?P<expert>\d+)\.(?P<rest>.+)$")
_FUSED = re.compile(r"^(?P<moe>.+)\.experts\.(?P<rest>[^.]+(?:\.weight)?)$")


def fused_experts(name: str) -> bool:
    """Whether a name is that of fused experts (``<moe>.experts.<proj>``; the tensor must be 3-D)."""
    return bool(_FUSED.match(name)) and not name.endswith(".experts")


def group_key(name: str) -> str:
    """``metrics.group_of`` with the expert number also replaced by ``*``: the same projection of
    every expert of every layer is one group (``model.layers.*.mlp.experts.*.w1.weight``)."""
    from wdiff.metrics import group_of

    one = _ONE.match(name)
    if one:
        name = f"{one['moe']}.experts.*.{one['rest']}"
    return group_of(name) or name


def expert_of(name: str) -> tuple[str, int, str] | None:
    """``(moe prefix, expert, rest)`` of one expert's tensor; None for anything else."""
    hit = _ONE.match(name)
    return (hit["moe"], int(hit["expert"]), hit["rest"]) if hit else None


@dataclass
class MoeLayer:
    prefix: str  # the MoE module: model.layers.1.block_sparse_moe
    tensors: dict[int, list[str]] = field(default_factory=dict)  # expert -> its tensors (fused: shared)
    change: dict[int, float] = field(default_factory=dict)  # expert -> accumulated |dW| per element
    router: str | None = None  # the router's tensor, one row per expert
    router_change: dict[int, float] = field(default_factory=dict)  # expert -> its router row's change
    fused: bool = False

    @property
    def median(self) -> float:
        return float(np.median(list(self.change.values()))) if self.change else 0.0

    @property
    def router_median(self) -> float:
        return float(np.median(list(self.router_change.values()))) if self.router_change else 0.0

    @property
    def starved(self) -> list[int]:
        """Experts that moved at most ``STARVED`` x the layer's median (none when the median is 0)."""
        if len(self.change) < MIN_EXPERTS or not self.median > 0:
            return []
        return [e for e, c in sorted(self.change.items()) if c <= STARVED * self.median]

    @property
    def spread(self) -> float | None:
        """Largest over smallest expert change; None when the smallest is 0."""
        low = min(self.change.values(), default=0.0)
        return max(self.change.values()) / low if low > 0 else None


def layers(m: RunMetrics) -> list[MoeLayer]:
    """Every MoE layer of the run, in network order, with each expert's change and its router's."""
    by_name = m.by_name
    found: dict[str, MoeLayer] = {}
    totals: dict[str, dict[int, list[float]]] = {}
    for t in m.tensors:
        name = t["tensor"]
        one = expert_of(name)
        if one is not None:
            moe, expert, _ = one
            layer = found.setdefault(moe, MoeLayer(moe))
            layer.tensors.setdefault(expert, []).append(name)
            sums = totals.setdefault(moe, {}).setdefault(expert, [0.0, 0.0])
            sums[0] += t["path_l1"]
            sums[1] += t["numel"]
            continue
        fused = _FUSED.match(name)
        if fused and len(t["shape"]) == 3 and fused_experts(name):
            moe = fused["moe"]
            layer = found.setdefault(moe, MoeLayer(moe, fused=True))
            layer.fused = True
            per_row = t["numel"] / t["shape"][0]
            for expert, value in enumerate(np.asarray(m.neuron_change[name], np.float64)):
                layer.tensors.setdefault(expert, []).append(name)
                sums = totals.setdefault(moe, {}).setdefault(expert, [0.0, 0.0])
                sums[0] += float(value)
                sums[1] += per_row
    for moe, layer in found.items():
        layer.change = {e: (s / n if n else 0.0) for e, (s, n) in sorted(totals[moe].items())}
        layer.tensors = dict(sorted(layer.tensors.items()))
        router = next((f"{moe}.{r}" for r in ROUTERS if f"{moe}.{r}" in by_name), None)
        if (
            router is not None
            and by_name[router]["shape"]
            and by_name[router]["shape"][0] == len(layer.change)
        ):
            width = by_name[router]["numel"] / by_name[router]["shape"][0]
            layer.router = router
            layer.router_change = {e: float(v) / width for e, v in enumerate(m.neuron_change[router])}
    return list(found.values())
