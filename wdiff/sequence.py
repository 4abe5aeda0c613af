"""The records a scanned checkpoint sequence is made of: what ``scan`` and ``watch`` hand to compute.

Plain frozen data, no reading: ``wdiff.scan`` finds and reads checkpoints into :class:`Checkpoint`\\ s,
``wdiff.assemble`` lines their tensors up into :class:`AlignedTensor`\\ s, and compute streams them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wdiff.readers.base import FileIdentity, Skipped, TensorRef

__all__ = ["AlignedTensor", "Checkpoint", "Run", "Skipped"]


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the sequence: where it is, its training step, its stored tensors by name and
    what the files beside them say (what the assembly step needs)."""

    path: str
    step: int | None
    tensors: dict[str, TensorRef] = field(repr=False)
    # Set when ``tensors`` are kept copies (``wdiff watch``): the identity of the original files.
    known_fingerprint: str | None = field(default=None, repr=False)
    adapter: dict | None = field(default=None, repr=False)  # adapter_config.json of a PEFT checkpoint
    tied: bool = False  # config.json says tie_word_embeddings
    state_key: str | None = None  # where in a pickled checkpoint the weights were found
    skipped: tuple[Skipped, ...] = field(default=(), repr=False)  # tensors its reader could not read
    # The identity of every file its tensors are read from, as scanned (``wdiff.checkpoints.read_one``):
    # compute refuses to read a file that is no longer that one.
    files: dict[str, FileIdentity] = field(default_factory=dict, repr=False)
    # digest of the header of every safetensors file among them, as scanned (``scan.recheck``)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    # A revision of a Hub suite (``wdiff.suites``): {"url": as named, "revision": name, "commit": sha};
    # ``path`` is then the checkpoint at that commit, which is what is read.
    origin: dict | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AlignedTensor:
    """The same tensor in every checkpoint: ``refs[t]`` locates it in checkpoint ``t``."""

    name: str
    shape: tuple[int, ...]
    refs: tuple[TensorRef, ...] = field(repr=False)
    # (path, identity as scanned) of every file the refs read from: what the chunk tasks check
    files: tuple[tuple[str, FileIdentity], ...] = field(default=(), repr=False)

    @property
    def numel(self) -> int:
        return self.refs[0].numel

    @property
    def dtypes(self) -> list[str]:
        return sorted({r.dtype for r in self.refs})

    @property
    def source(self) -> str:
        """How compute reads it (``TensorRef.source``): a computed product, pieces if any checkpoint
        stores it in pieces, else one byte range each."""
        kinds = {r.source for r in self.refs}
        return "product" if "product" in kinds else "pieces" if "pieces" in kinds else "bytes"


def scanned_files(refs: Sequence[TensorRef], checkpoints: Sequence[Checkpoint]) -> tuple:
    """``AlignedTensor.files`` for ``refs[t]`` of ``checkpoints[t]``: each file's scanned identity."""
    found: dict[str, FileIdentity] = {}
    for ref, checkpoint in zip(refs, checkpoints):
        for path in ref.files():
            identity = checkpoint.files.get(path)
            if identity is not None:
                found.setdefault(path, identity)
    return tuple(found.items())


@dataclass(frozen=True)
class Run:
    """A scanned checkpoint sequence, ready to compute: what ``wdiff.scan`` returns."""

    source: str
    checkpoints: tuple[Checkpoint, ...]
    tensors: tuple[AlignedTensor, ...]  # computable tensors, network order
    skipped: tuple[Skipped, ...]
    trainer_state: dict | None = field(default=None, repr=False)
    left_out: tuple[Skipped, ...] = ()  # checkpoints left out (by path): a live run's unfinished newest
    matching: dict | None = field(default=None, repr=False)  # how ONNX names were matched (onnx_match)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied weights: name -> other names
    warnings: tuple[Skipped, ...] = ()  # about the input as given (by path): an explicit list out of order
    # what was chosen to be read, a wdiff.select.Selection (not imported: wdiff.select reads these
    # records, so naming it here would be an import cycle); None: everything
    selection: Any = None
    # how many checkpoints were found and tensors assembled before the selection: {"checkpoints": n, ...}
    selected_from: dict[str, int] = field(default_factory=dict)

    @property
    def steps(self) -> list[int | None]:
        return [c.step for c in self.checkpoints]

    @property
    def bytes_per_pass(self) -> int:
        """Bytes of checkpoint data one pass over the computable tensors reads."""
        return sum(r.nbytes for t in self.tensors for r in t.refs)
