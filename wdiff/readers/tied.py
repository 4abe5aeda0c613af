"""Tied weights: one stored tensor known under several names is computed and reported once.

Two ways a checkpoint says a tensor is shared (docs/formats.md):

- several names locate the very same bytes (same file, offset, size, dtype and shape) in every
  checkpoint: ONNX initializers pointing at one external-data range, readers that resolve aliases;
- HF ``tie_word_embeddings``: the tied copy is simply not saved. GPT-2 keeps ``transformer.wte.weight``
  and drops ``lm_head.weight``; ``config.json`` says ``"tie_word_embeddings": true``. When the config
  says so, ``lm_head.weight`` (the name every HF causal-LM head uses) is absent from every checkpoint
  and exactly one input embedding is present, that embedding is reported with the alias
  ``lm_head.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from wdiff.errors import WdiffError
from wdiff.readers.base import CONFIG_LIMIT, read_json

if TYPE_CHECKING:
    from wdiff.sequence import AlignedTensor

OUTPUT_EMBEDDING = "lm_head.weight"
_INPUT_EMBEDDING = re.compile(
    r"(^|\.)(wte|embed_tokens|word_embeddings|tok_embeddings|embed_in|shared|embeddings)\.weight$"
)


def ties_embeddings(folder: Path) -> bool:
    """Whether the ``config.json`` in a checkpoint folder says the output embedding is tied to the
    input one. A missing or unreadable config says nothing: one that is not a regular file, over
    ``CONFIG_LIMIT`` or not JSON is not read (it only decides whether ``lm_head.weight`` is named)."""
    config_path = folder / "config.json"
    if not config_path.exists():
        return False
    try:
        config = read_json(config_path, "model config", CONFIG_LIMIT)
    except WdiffError:
        return False
    if not isinstance(config, dict):
        return False
    text = config.get("text_config")  # multimodal configs keep the language model's flags inside
    flags = [config.get("tie_word_embeddings")]
    if isinstance(text, dict):
        flags.append(text.get("tie_word_embeddings"))
    return any(f is True for f in flags)


def find_aliases(
    tied: bool, tensors: list[AlignedTensor]
) -> tuple[list[AlignedTensor], dict[str, list[str]]]:
    """Drop the aliases of tensors stored once; return the kept tensors and name -> its aliases.

    ``tensors`` are in network order; the first name of a group is kept. ``tied``: the newest
    checkpoint's config says ``tie_word_embeddings``.
    """
    kept: list[AlignedTensor] = []
    aliases: dict[str, list[str]] = {}
    by_storage: dict[tuple, str] = {}
    for tensor in tensors:
        key = tuple(
            (r.path, r.offset, r.nbytes, r.dtype, r.shape, getattr(r, "pieces", ())) for r in tensor.refs
        )
        if tensor.refs[0].nbytes == 0:  # empty tensors share offsets without sharing anything
            kept.append(tensor)
            continue
        owner = by_storage.setdefault(key, tensor.name)
        if owner == tensor.name:
            kept.append(tensor)
        else:
            aliases.setdefault(owner, []).append(tensor.name)
    names = {t.name for t in kept} | {a for group in aliases.values() for a in group}
    if OUTPUT_EMBEDDING not in names and tied:
        embeddings = [t.name for t in kept if _INPUT_EMBEDDING.search(t.name) and len(t.shape) == 2]
        if len(embeddings) == 1:
            aliases.setdefault(embeddings[0], []).append(OUTPUT_EMBEDDING)
    return kept, aliases
