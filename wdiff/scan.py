"""Find a sequence of checkpoints, order it by training step and line up the same tensors across it.

Three shapes of input (FORMATS.md):
- an HF Trainer output dir: ``checkpoint-<step>/`` folders, ordered by step, ``trainer_state.json`` read;
- a folder of checkpoints (files or folders) ordered by the step number in their names
  (``step_900`` before ``step_1000``);
- an explicit ordered list of checkpoint files or folders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from wdiff.errors import WdiffError
from wdiff.naming import last_number, network_order
from wdiff.readers import (
    TensorRef,
    has_weights,
    looks_like_onnx,
    looks_like_safetensors,
    missing,
    read_checkpoint,
)
from wdiff.readers.base import read_json
from wdiff.readers.lora import effective_tensors
from wdiff.readers.onnx_match import match_sequence
from wdiff.readers.tied import find_aliases

_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the sequence: where it is, its training step, its tensors by name."""

    path: str
    step: int | None
    tensors: dict[str, TensorRef] = field(repr=False)
    # Set when ``tensors`` are kept copies (``wdiff watch``): the identity of the original files.
    known_fingerprint: str | None = field(default=None, repr=False)


def fingerprint(checkpoint: Checkpoint) -> str:
    """Identity of a checkpoint's weight files (names, sizes, modification times), to notice that an
    earlier checkpoint was rewritten or replaced since results were computed from it."""
    import hashlib

    if checkpoint.known_fingerprint is not None:
        return checkpoint.known_fingerprint
    digest = hashlib.sha256()
    for path in sorted({r.path for r in checkpoint.tensors.values()}):
        try:
            st = os.stat(path)
        except OSError as e:  # e.g. save_total_limit deleted it since the scan
            raise WdiffError(path, f"cannot read: {e.strerror} (deleted while wdiff ran?)") from None
        digest.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class AlignedTensor:
    """The same tensor in every checkpoint: ``refs[t]`` locates it in checkpoint ``t``."""

    name: str
    shape: tuple[int, ...]
    refs: tuple[TensorRef, ...] = field(repr=False)

    @property
    def numel(self) -> int:
        return self.refs[0].numel

    @property
    def dtypes(self) -> list[str]:
        return sorted({r.dtype for r in self.refs})


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of the computation, and why (in words a user reads)."""

    name: str
    reason: str


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

    @property
    def steps(self) -> list[int | None]:
        return [c.step for c in self.checkpoints]

    @property
    def bytes_per_pass(self) -> int:
        """Bytes of checkpoint data one pass over the computable tensors reads."""
        return sum(r.nbytes for t in self.tensors for r in t.refs)


def _load_trainer_state(path: Path) -> dict:
    state = read_json(path, "trainer state")  # bare NaN/Infinity accepted, as json.dumps writes them
    if not isinstance(state, dict):
        raise WdiffError(path, "trainer state is not a JSON object")
    return state


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return has_weights(path)
    return path.is_file() and (looks_like_safetensors(path) or looks_like_onnx(path))


def _hf_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for child in folder.iterdir():
        m = _HF_CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoint files or folders inside ``folder``, ordered by the step number in their names."""
    children = sorted(c for c in folder.iterdir() if not c.name.startswith("."))
    candidates = [c for c in children if _is_checkpoint(c)]
    if not candidates:
        return []
    numbered = []
    for c in candidates:
        step = last_number(c.name.removesuffix(".safetensors"))
        if step is None:
            raise WdiffError(
                c,
                "has no step number in its name, so its place in the sequence is unknown; "
                "pass the checkpoints in order explicitly",
            )
        numbered.append((step, c))
    numbered.sort()
    for (a, pa), (b, pb) in zip(numbered, numbered[1:]):
        if a == b:
            raise WdiffError(folder, f"{pa.name} and {pb.name} have the same step number {a}")
    return numbered


def _discover(inputs: Sequence[Path]) -> tuple[list[tuple[int | None, Path]], bool]:
    """Ordered (step, checkpoint path) pairs, and whether they were found in a folder (which training
    may still be writing into) rather than named one by one."""
    # An output dir may hold the final model beside its checkpoint-N folders (``trainer.save_model()``
    # into output_dir, PEFT adapters included): the checkpoint folders are the sequence.
    run_dir = len(inputs) == 1 and inputs[0].is_dir()
    hf = _hf_checkpoints(inputs[0]) if run_dir else []
    live = run_dir and (not has_weights(inputs[0]) or bool(hf))
    if live:
        folder = inputs[0]
        pairs: list[tuple[int | None, Path]] = list(hf or _numbered_checkpoints(folder))
        if not pairs and (folder / "checkpoints").is_dir():  # accelerate project_dir, automatic naming
            pairs = list(_numbered_checkpoints(folder / "checkpoints"))
        if not pairs:
            raise WdiffError(folder, "no checkpoints found (no checkpoint-N folders, no safetensors)")
    else:
        for p in inputs:
            if not p.exists():
                raise WdiffError(p, missing(p))
        pairs = []
        for p in inputs:
            state = p / TRAINER_STATE if p.is_dir() else None
            step = None
            if state is not None and state.is_file():
                step = _load_trainer_state(state).get("global_step")
            if not isinstance(step, int):
                m = _HF_CHECKPOINT.match(p.name)
                step = int(m.group(1)) if m else last_number(p.name.removesuffix(".safetensors"))
            pairs.append((step, p))
    return pairs, live


def _unfinished(path: Path, expect_state: bool) -> str | None:
    """Why a checkpoint folder of a live training run is not complete yet (FORMATS.md: the HF Trainer
    writes ``trainer_state.json`` last and has no temp-folder-then-rename), or None."""
    if not (expect_state and path.is_dir()):
        return None
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} yet, which the HF Trainer writes last: the checkpoint is incomplete"
    return None


def _read_checkpoints(
    pairs: Sequence[tuple[int | None, Path]], live: bool
) -> tuple[list[Checkpoint], list[Skipped]]:
    """Read every checkpoint. In a folder training may still write into, the newest one failing
    (no trainer_state.json yet, a shard missing or failing validation) is left out with a reason;
    any older one failing is an error: something broke it after it was complete."""
    expect_state = live and any((p / TRAINER_STATE).is_file() for _, p in pairs if p.is_dir())
    checkpoints, left_out = [], []
    for i, (step, p) in enumerate(pairs):
        newest = live and i == len(pairs) - 1 and len(pairs) > 2
        try:
            problem = _unfinished(p, expect_state)
            if problem is not None:
                raise WdiffError(p, problem)
            if newest and expect_state and p.is_dir():
                _load_trainer_state(p / TRAINER_STATE)  # half-written JSON: still being saved
            checkpoints.append(Checkpoint(str(p), step, read_checkpoint(p)))
        except WdiffError as e:
            if not newest:
                raise
            left_out.append(Skipped(str(p), f"newest checkpoint left out (still being written?): {e}"))
    return checkpoints, left_out


def _align(checkpoints: Sequence[Checkpoint]) -> tuple[list[AlignedTensor], list[Skipped]]:
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
        aligned.append(AlignedTensor(name, refs[0].shape, tuple(refs)))  # type: ignore[arg-type]
    return aligned, skipped


def scan(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Run:
    """Scan a checkpoint folder or an ordered list of checkpoints into a :class:`Run`.

    Raises :class:`~wdiff.errors.WdiffError` naming the file and the problem for bad input, and when
    fewer than two checkpoints are found.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise WdiffError(None, "no checkpoints given")
    try:
        pairs, live = _discover(paths)
        source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} checkpoints"
        if len(pairs) < 2:
            where = pairs[0][1] if pairs else paths[0]
            raise WdiffError(
                where, f"found {len(pairs)} checkpoint(s); at least two are needed to see change"
            )
        checkpoints, left_out = _read_checkpoints(pairs, live)
        renamed, matching = match_sequence([c.tensors for c in checkpoints])
        checkpoints = [replace(c, tensors=r) for c, r in zip(checkpoints, renamed)]
        tensors, skipped = _align(checkpoints)
        tensors, aliases = find_aliases([Path(c.path) for c in checkpoints], tensors)
        lora, lora_skipped = effective_tensors(checkpoints)
        by_name = {t.name: t for t in tensors + lora}
        tensors = [by_name[name] for name in network_order(list(by_name))]
        skipped = skipped + lora_skipped
        if not tensors:
            raise WdiffError(paths[0], "no floating-point tensor is present in every checkpoint")
        # The newest trainer_state.json holds the whole log history.
        states = [Path(c.path) / TRAINER_STATE for c in checkpoints]
        states = [s for s in states if s.parent.is_dir() and s.is_file()]
        state = _load_trainer_state(states[-1]) if states else None
    except OSError as e:  # an unreadable folder met while listing or testing it
        raise WdiffError(e.filename, f"cannot read: {e.strerror or e}") from None
    return Run(
        source, tuple(checkpoints), tuple(tensors), tuple(skipped), state, tuple(left_out), matching, aliases
    )
