"""Tensor names in the user's words: network order and the block a tensor belongs to.

Checkpoint writers order tensors alphabetically (``layers.10`` before ``layers.9``); people read a
network in the order data flows. These helpers give that order without knowing the architecture.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that compares the numbers inside a name as numbers (``layers.9`` < ``layers.10``)."""
    parts = _NUMBER.split(name)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def network_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """Names in network order: natural order of the numbers in module paths."""
    return sorted(names, key=natural_key)


def block_of(name: str) -> str:
    """The block a tensor belongs to: its module path up to and including the first number.

    ``model.layers.7.self_attn.q_proj.weight`` -> ``model.layers.7``; ``transformer.h.0.attn.c_attn.weight``
    -> ``transformer.h.0``. A name without a number belongs to its module's parent when the path is
    deep enough (``bert.embeddings.word_embeddings.weight`` -> ``bert.embeddings``, together with
    ``bert.embeddings.LayerNorm.bias``), else to its module (``transformer.wte.weight`` ->
    ``transformer.wte``, ``lm_head.weight`` -> ``lm_head``), so embeddings and heads stand alone.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    if len(parts) >= 4:
        return ".".join(parts[:-2])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def last_number(text: str) -> int | None:
    """The last integer in a string (``step_900.safetensors`` -> 900), or None."""
    found = _NUMBER.findall(text)
    return int(found[-1]) if found else None
