"""One assembly step from checkpoints to the tensors compute streams, shared by ``scan`` and ``watch``.

Given the checkpoints of a sequence (each with its stored tensors and what its side files say), it:

1. matches the made-up names of ONNX initializers across exports (``readers.onnx_match``);
2. lines the same tensor up across every checkpoint, leaving out (with a reason) what is missing from
   some checkpoint, changes shape or is not a float;
3. reports tied weights once (``readers.tied``: several names for the same bytes, or HF's
   ``tie_word_embeddings``);
4. adds the effective weight change of every LoRA-adapted module (``readers.lora``).

Whatever reads a sequence (a folder on disk, a watched run, a remote suite) calls :func:`assemble`,
so a run is read the same way whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from wdiff.naming import network_order
from wdiff.readers.lora import effective_tensors
from wdiff.readers.onnx_match import match_sequence
from wdiff.readers.tied import find_aliases
from wdiff.sequence import AlignedTensor, Checkpoint, Skipped, scanned_files


@dataclass(frozen=True)
class Assembly:
    """The assembled sequence: checkpoints with matched names, the computable tensors in network
    order, what was left out and why, tied aliases, and how ONNX names were matched."""

    checkpoints: tuple[Checkpoint, ...]
    tensors: tuple[AlignedTensor, ...]
    skipped: tuple[Skipped, ...]
    aliases: dict[str, list[str]]
    matching: dict | None


def align(checkpoints: Sequence[Checkpoint]) -> tuple[list[AlignedTensor], list[Skipped]]:
    """The tensors stored in every checkpoint with one shape and a float dtype, in network order."""
    names = set().union(*(c.tensors for c in checkpoints))
    aligned, skipped = [], []
    for name in network_order(list(names)):
        refs = [c.tensors.get(name) for c in checkpoints]
        missing = [c.path for c, r in zip(checkpoints, refs) if r is None]
        if missing:
            skipped.append(Skipped(name, f"missing from {len(missing)} checkpoint(s), first {missing[0]}"))
            continue
        shapes = {r.shape for r in refs if r is not None}
        if len(shapes) > 1:
            where = ", ".join(str(list(s)) for s in sorted(shapes))
            skipped.append(Skipped(name, f"changes shape across checkpoints: {where}"))
            continue
        kinds = {r.kind for r in refs if r is not None}
        not_float = sorted(k.code for k in kinds if not k.is_float)
        if not_float:
            skipped.append(Skipped(name, f"dtype {'/'.join(not_float)} is not a float: not computed"))
            continue
        files = scanned_files(refs, checkpoints)  # type: ignore[arg-type]
        aligned.append(AlignedTensor(name, refs[0].shape, tuple(refs), files))  # type: ignore[arg-type]
    return aligned, skipped


def _unread(checkpoints: Sequence[Checkpoint], computed: set[str]) -> list[Skipped]:
    """Tensors a reader saw but could not read (a strided PyTorch view, ...), once per name."""
    out: dict[str, Skipped] = {}
    for c in checkpoints:
        for s in c.skipped:
            if s.name not in computed:
                out.setdefault(s.name, Skipped(s.name, f"{s.reason} (in {c.path})"))
    return list(out.values())


def assemble(checkpoints: Sequence[Checkpoint]) -> Assembly:
    """Match, align, tie and add LoRA products: the one way from checkpoints to tensors."""
    renamed, matching = match_sequence([c.tensors for c in checkpoints])
    checkpoints = [replace(c, tensors=r) for c, r in zip(checkpoints, renamed)]
    tensors, skipped = align(checkpoints)
    tensors, aliases = find_aliases(checkpoints[-1].tied if checkpoints else False, tensors)
    lora, lora_skipped = effective_tensors(checkpoints)
    by_name = {t.name: t for t in tensors + lora}
    ordered = [by_name[name] for name in network_order(list(by_name))]
    unread = _unread(checkpoints, set(by_name))  # the reader's reason beats "missing from ..."
    unread_names = {s.name for s in unread}
    skipped = [s for s in skipped if s.name not in unread_names] + unread + lora_skipped
    return Assembly(tuple(checkpoints), tuple(ordered), tuple(skipped), aliases, matching)
