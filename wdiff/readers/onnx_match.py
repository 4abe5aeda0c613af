"""Line up the initializers of a sequence of ONNX exports whose names are partly made up.

Exporters keep parameter names where they can (``head.weight``) and make names up where they create
a tensor: the TorchScript exporter's constant folding replaces a Linear weight by a transposed copy
named ``onnx::MatMul_<k>``, the dynamo exporter names it ``val_<k>``; ``k`` follows trace order and
can shift between exports. So (docs/formats.md):

1. a name that is not made up and appears in every checkpoint is matched exactly;
2. made-up names are matched by what the tensor is and where it sits: dtype, shape and its consumers
   (op type and input index of every node that reads it) must agree, and within a group of equal
   such signatures the tensors are paired in topological order (the index of the first consumer in
   ``graph.node``, which the ONNX spec keeps topologically sorted). The number in a made-up name is
   never used. A group whose size differs between checkpoints is left unmatched (reported).

Matched tensors take the name they have in the first checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from wdiff.readers.base import TensorRef
from wdiff.readers.onnx import OnnxRef

# Names exporters invent: TorchScript ``onnx::MatMul_12`` and ``/layer/Constant_output_0``, dynamo
# ``val_12`` / ``_val_12``, lifted constants ``_tensor_constant0`` / ``c_lifted_tensor_0``, and
# generic ``const_12`` / ``Constant_12`` / ``initializer_12`` from graph optimisers.
MADE_UP = re.compile(
    r"^onnx::|^/|_output_\d+$|^_?val_\d+$|^_?v_\d+$|^(_tensor_constant|c_lifted_tensor_)\d+$"
    r"|^(const|constant|initializer)_?\d+$",
    re.IGNORECASE,
)


def is_made_up(name: str) -> bool:
    return MADE_UP.search(name) is not None


def _signature(ref: OnnxRef) -> tuple:
    return (ref.dtype, ref.shape, tuple(sorted((u.op, u.input) for u in ref.uses)))


def _topological(ref: OnnxRef) -> tuple[int, int]:
    first_use = min((u.node for u in ref.uses), default=1 << 62)
    return (first_use, ref.order)


def _groups(tensors: dict[str, TensorRef]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[tuple[tuple[int, int], str]]] = {}
    for name, ref in tensors.items():
        if isinstance(ref, OnnxRef) and is_made_up(name):
            groups.setdefault(_signature(ref), []).append((_topological(ref), name))
    return {key: [n for _, n in sorted(members)] for key, members in groups.items()}


def _describe(key: tuple) -> str:
    uses = key[2]
    return ", ".join(f"{op} input {i}" for op, i in uses) if uses else "no consumer"


def match_sequence(
    checkpoints: Sequence[dict[str, TensorRef]],
) -> tuple[list[dict[str, TensorRef]], dict | None]:
    """Rename made-up ONNX initializer names of every checkpoint to the first checkpoint's names.

    Returns the renamed tensor dicts and the ``matching`` report for ``summary.json`` (None when no
    checkpoint is ONNX): counts of exact and positional matches, every positional pair with the name
    it has in each checkpoint, and what could not be matched.
    """
    if not any(isinstance(r, OnnxRef) for c in checkpoints for r in c.values()):
        return list(checkpoints), None
    canonical = _groups(checkpoints[0])
    renamed: list[dict[str, TensorRef]] = []
    names_in: dict[str, list[str]] = {n: [n] for members in canonical.values() for n in members}
    unmatched: list[dict] = []
    for t, tensors in enumerate(checkpoints):
        out = {n: r for n, r in tensors.items() if not (isinstance(r, OnnxRef) and is_made_up(n))}
        if t == 0:
            out.update({n: tensors[n] for members in canonical.values() for n in members})
            renamed.append(out)
            continue
        groups = _groups(tensors)
        for key in canonical.keys() | groups.keys():
            mine, theirs = groups.get(key, []), canonical.get(key, [])
            if len(mine) != len(theirs):
                unmatched.append(
                    {"checkpoint": t, "consumer": _describe(key), "shape": list(key[1]), "dtype": key[0],
                     "count": len(mine), "count_in_first": len(theirs)}
                )  # fmt: skip
                continue
            for first_name, name in zip(theirs, mine):
                out[first_name] = tensors[name]
                names_in[first_name].append(name)
        renamed.append(out)
    exact = [
        n for n, r in checkpoints[0].items()
        if not (isinstance(r, OnnxRef) and is_made_up(n)) and all(n in c for c in checkpoints)
    ]  # fmt: skip
    pairs = []
    for key, members in canonical.items():
        for n in members:
            if len(names_in[n]) == len(checkpoints):
                pairs.append({"name": n, "names": names_in[n], "consumer": _describe(key)})
    shared = _fill_shared(renamed)
    report = {
        "exact": len(exact), "by_position": len(pairs), "by_sharing": len(shared),
        "pairs": pairs, "shared": shared, "unmatched": unmatched,
    }  # fmt: skip
    return renamed, report


def _fill_shared(checkpoints: list[dict[str, TensorRef]]) -> list[dict]:
    """Fill in tensors an export stored once for several of them (in place); return what was filled.

    Exporters deduplicate initializers with equal values (two LayerNorms at initialisation): the
    dynamo exporter then lets both nodes read ``norm.weight`` and ``norm2.weight`` disappears from
    that export. A name N missing from checkpoint t is taken to share tensor S of t when, in the first
    checkpoint r holding both separately, the consumers of S and N together, in topological order, have
    the same (op type, input index) sequence as the consumers of S in t, and dtype and shape agree.
    Exactly one such S must exist; otherwise N stays missing (and is skipped).
    """
    filled = []
    names = set().union(*checkpoints)
    for name in sorted(names):
        holders = [t for t, c in enumerate(checkpoints) if name in c]
        if len(holders) == len(checkpoints) or not isinstance(checkpoints[holders[0]][name], OnnxRef):
            continue
        for t, tensors in enumerate(checkpoints):
            if name in tensors:
                continue
            candidates = [s for s in tensors if _shares(checkpoints, holders, name, s, t)]
            if len(candidates) == 1:
                tensors[name] = tensors[candidates[0]]
                filled.append({"name": name, "checkpoint": t, "shares": candidates[0]})
    return filled


def _consumers(uses) -> list[tuple[str, int]]:
    return [(u.op, u.input) for u in sorted(uses, key=lambda u: u.node)]


def _shares(
    checkpoints: list[dict[str, TensorRef]], holders: list[int], name: str, other: str, t: int
) -> bool:
    here = checkpoints[t][other]
    for r in holders:
        mine, theirs = checkpoints[r][name], checkpoints[r].get(other)
        if theirs is None or theirs is mine:
            continue
        if not (isinstance(mine, OnnxRef) and isinstance(theirs, OnnxRef) and isinstance(here, OnnxRef)):
            return False
        if (mine.dtype, mine.shape) != (here.dtype, here.shape) or (theirs.dtype, theirs.shape) != (
            here.dtype,
            here.shape,
        ):
            return False
        together = _consumers(mine.uses + theirs.uses)
        return len(mine.uses) > 0 and together == _consumers(here.uses)
    return False
