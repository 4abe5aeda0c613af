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


#: Module names that end a network (heads, final norms, poolers), matched against one path part.
#: Checked before ``_EMBEDDING``: GPT-NeoX's output layer is called ``embed_out``.
_HEAD_EXACT = re.compile(r"^(lm_head|embed_out|classifier|score|pooler|cls|heads?|logits|ln_f|norm_f)$", re.I)
#: Module names that start a network: token, position and patch embeddings, shared vocabularies, stems.
_EMBEDDING = re.compile(r"emb|^wte$|^wpe$|^tok|^shared$|^stem$|patch|^pos(ition)?_", re.I)
#: Weaker head names, only for a module outside the numbered layers (``model.norm``, ``fc``).
_HEAD_LOOSE = re.compile(r"^(norm|layer_?norm|final.*|fc|out|output|proj_out|head_.*|.*_head)$", re.I)

EMBEDDING, BODY, HEAD = 0, 1, 2


def role_of(name: str) -> int:
    """Where a tensor sits in the data flow, from its name alone: ``EMBEDDING``, ``BODY`` or ``HEAD``.

    Only the module path before the first layer number is looked at, so ``...layer.0.output.dense``
    (a BERT layer's output) stays in the body while ``classifier.1`` (a head behind a dropout) and
    ``transformer.ln_f`` (the final norm) are heads. Unknown names are body.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            parts = parts[:i]
            break
    else:
        parts = parts[:-1] if len(parts) > 1 else parts  # drop the parameter name (weight, bias)
    if any(_HEAD_EXACT.match(p) for p in parts):
        return HEAD
    if any(_EMBEDDING.search(p) for p in parts):
        return EMBEDDING
    if parts and _HEAD_LOOSE.match(parts[-1]) and len(parts) == len(name.split(".")) - 1:
        return HEAD
    return BODY


def _section(name: str) -> int:
    """Encoder layers before decoder layers (T5, BART, Whisper); 1 for everything else."""
    parts = name.split(".")
    return 0 if "encoder" in parts else 1


def network_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """Names in the order data flows: embeddings first, then the layers (an encoder's before a
    decoder's) in natural order of their numbers, heads and final norms last.

    Final norms come before the heads they feed. ``transformer.wte`` and ``wpe`` come before
    ``transformer.h.0`` although they sort after it; names
    that say nothing about their role keep natural order (``fc1 < fc2 < fc10``).
    """

    def key(name: str) -> tuple:
        role = role_of(name)
        final_norm = role == HEAD and "norm" in name.lower() or ".ln_f." in f".{name}"
        return (role != EMBEDDING, _section(name), role, not final_norm, natural_key(name))

    return sorted(names, key=key)


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


# A step named as such wins over other numbers: ``epoch=2-step=150-v1.ckpt`` is step 150.
_NAMED_STEP = re.compile(r"(?:^|[^a-z])(?:global_?)?steps?[=_-]?(\d+)", re.IGNORECASE)
_SUFFIXES = (".safetensors", ".onnx", ".ckpt", ".pth", ".pt", ".bin")


def step_of(name: str) -> int | None:
    """The training step a checkpoint's name gives: ``step=N``/``stepN``/``global_stepN`` if
    present, else the last number (``checkpoint-500``, ``ckpt_000050.pth``); None without one."""
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    named = _NAMED_STEP.findall(name)
    if named:
        return int(named[-1])
    return last_number(name)
