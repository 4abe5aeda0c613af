"""Find a sequence of checkpoints, order it by training step and read each one.

Three shapes of input (docs/formats.md):
- an HF Trainer output dir: ``checkpoint-<step>/`` folders, ordered by step, ``trainer_state.json`` read;
- a folder of checkpoints (files or folders of any format ``wdiff.readers`` knows) ordered by the step
  in their names (``step_900`` before ``step_1000``, ``epoch=2-step=150.ckpt``, ``global_step300/``), or
  by the step a PyTorch file records when its name has none (Lightning's ``last.ckpt``, counted once);
  found in the folder itself or, when it has none, in ``checkpoints/`` (accelerate, Lightning);
- an explicit list of checkpoint files or folders, kept in the user's order (a warning when their
  steps say otherwise).

Every checkpoint's side files (``config.json``, ``adapter_config.json``, ``trainer_state.json``) are read
from its folder, or from the folder of a checkpoint file. The sequence is then put together by
``wdiff.assemble``, the step ``watch`` shares.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from wdiff.assemble import assemble
from wdiff.errors import WdiffError
from wdiff.marker import MARKER
from wdiff.naming import step_of
from wdiff.readers import has_weights, is_checkpoint_file, missing, open_checkpoint
from wdiff.readers.base import (
    STATE_LIMIT,
    TensorRef,
    header_digest,
    identity_of,
    open_regular,
    read_json,
    recording,
)  # fmt: skip
from wdiff.readers.lora import read_adapter_config
from wdiff.readers.remote import RemotePath, filesystem, forget_listings, is_url, location
from wdiff.readers.tied import ties_embeddings
from wdiff.select import Selection, choose_tensors, too_few, unmatched_warnings
from wdiff.sequence import AlignedTensor, Checkpoint, Run, Skipped

__all__ = ["AlignedTensor", "Checkpoint", "Run", "Skipped", "fingerprint", "recheck", "scan", "step_of"]

_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def fingerprint(checkpoint: Checkpoint) -> str:
    """Identity of a checkpoint's weight files (names, sizes, modification times) as they were scanned,
    to notice that an earlier checkpoint was rewritten or replaced since results were computed from it.
    Made from ``Checkpoint.files``, the identities compute checks, so the two always agree."""
    import hashlib

    if checkpoint.known_fingerprint is not None:
        return checkpoint.known_fingerprint
    digest = hashlib.sha256()
    files = checkpoint.files or {p: identity_of(p) for p in _tensor_files(checkpoint.tensors)}
    for path in sorted(files):
        f = files[path]
        tag = f"\0{f.tag}" if f.tag else ""  # a remote object: the store's identity of it
        digest.update(f"{os.path.basename(path)}\0{f.size}\0{f.mtime_ns}{tag}\n".encode())
    return digest.hexdigest()[:32]


def _tensor_files(tensors: dict[str, TensorRef]) -> list[str]:
    return list(dict.fromkeys(p for r in tensors.values() for p in r.files()))


def recheck(run: Run) -> None:
    """Before compute reads anything: every input file is still the one scanned (device, inode, size,
    mtime, ctime) and every safetensors header still holds the bytes it held (what placed each tensor
    at its offset). The chunk tasks check the identity again on each descriptor they read from."""
    for checkpoint in run.checkpoints:
        for path, scanned in checkpoint.files.items():
            if is_url(path):  # just listed; read at a commit, or by ranges that carry its ETag
                continue
            with open_regular(path, scanned) as f:
                digest = checkpoint.headers.get(path)
                if digest is None:
                    continue
                prefix = f.read(8)
                n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
                if not 0 <= n <= scanned.size - 8 or header_digest(prefix + f.read(n)) != digest:
                    why = "its header describes other tensors"
                    raise WdiffError(path, f"changed since it was scanned ({why})")


def load_trainer_state(path: Path) -> dict:
    """``trainer_state.json`` (bare NaN/Infinity accepted, as json.dumps writes them); ``log_history``
    entries that are not objects are dropped: the log is a hint, never a reason to fail."""
    state = read_json(path, "trainer state", STATE_LIMIT)
    if not isinstance(state, dict):
        raise WdiffError(path, "trainer state is not a JSON object")
    history = state.get("log_history")
    if history is not None:
        entries = history if isinstance(history, list) else []
        state["log_history"] = [e for e in entries if isinstance(e, dict)]
    return state


def side_folder(path: Path) -> Path:
    """Where a checkpoint's side files are: the checkpoint folder, or the folder of a checkpoint file."""
    return path if path.is_dir() else path.parent


def _is_checkpoint(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir() and (path / MARKER).exists():  # wdiff's results, kept beside the checkpoints
        return False
    return has_weights(path) if path.is_dir() else is_checkpoint_file(path)


def hf_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for child in folder.iterdir():
        m = _HF_CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoint files or folders inside ``folder``, ordered by the step in their names.

    A file whose name has no number (Lightning's ``last.ckpt``) takes the step the file records; when
    another checkpoint has that step it is the same checkpoint saved twice, and counted once.
    """
    candidates = [c for c in sorted(folder.iterdir()) if _is_checkpoint(c)]
    numbered: list[tuple[int, Path]] = []
    unnamed: list[tuple[int, Path]] = []
    for c in candidates:
        step = step_of(c.name)
        if step is None:
            inside = open_checkpoint(c).step if c.is_file() else None
            if inside is None:
                raise WdiffError(
                    c,
                    "has no step number in its name or inside, so its place in the sequence is unknown; "
                    "pass the checkpoints in order explicitly",
                )
            unnamed.append((inside, c))
            continue
        numbered.append((step, c))
    steps = {s for s, _ in numbered}
    numbered += [(s, c) for s, c in unnamed if s not in steps]
    numbered.sort()
    for (a, pa), (b, pb) in zip(numbered, numbered[1:]):
        if a == b:
            raise WdiffError(folder, f"{pa.name} and {pb.name} have the same step number {a}")
    return numbered


def listing(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoints of a training output folder, ordered by step: ``checkpoint-N/`` folders, else
    numbered checkpoints in it, else in its ``checkpoints/`` (accelerate, Lightning's ``dirpath``),
    else in Lightning's default ``lightning_logs/version_N/checkpoints/`` when one version has them.
    ``watch`` lists a folder with this too."""
    found = hf_checkpoints(folder) or numbered_checkpoints(folder)
    if not found and (folder / "checkpoints").is_dir():
        found = numbered_checkpoints(folder / "checkpoints")
    if not found and (folder / "lightning_logs").is_dir():
        versions = sorted(p for p in (folder / "lightning_logs").glob("version_*/checkpoints") if p.is_dir())
        listed = [(v, numbered_checkpoints(v)) for v in versions]
        listed = [(v, found) for v, found in listed if found]
        if len(listed) > 1:
            names = ", ".join(str(v.relative_to(folder)) for v, _ in listed[:3])
            raise WdiffError(folder, f"several Lightning runs ({names}): point wdiff at one of them")
        found = listed[0][1] if listed else []
    return found


def _explicit_step(path: Path, shared: frozenset[Path] = frozenset()) -> int | None:
    """The step of a checkpoint named on the command line: its ``trainer_state.json``, its name, then
    its folder's ``trainer_state.json`` or name (``checkpoint-50/model.safetensors``), unless that
    folder holds other checkpoints given too (``shared``): ``run1/base.safetensors`` and
    ``run1/tuned.safetensors`` are not both step 1."""
    folder = side_folder(path)
    for candidate in [path] if path.is_dir() or folder in shared else [path, folder]:
        state = candidate / TRAINER_STATE
        if candidate.is_dir() and state.exists():  # a pipe there: refused, not skipped
            step = load_trainer_state(state).get("global_step")
            if isinstance(step, int) and not isinstance(step, bool):
                return step
        named = step_of(candidate.name)
        if named is not None:
            return named
    return None


def _discover(inputs: Sequence[Path]) -> tuple[list[tuple[int | None, Path]], bool]:
    """Ordered (step, checkpoint path) pairs, and whether they were found in a folder (which training
    may still be writing into) rather than named one by one."""
    # An output dir may hold the final model beside its checkpoint-N folders (``trainer.save_model()``
    # into output_dir, PEFT adapters included): the checkpoint folders are the sequence.
    run_dir = len(inputs) == 1 and inputs[0].is_dir()
    hf = hf_checkpoints(inputs[0]) if run_dir else []
    live = run_dir and (not has_weights(inputs[0]) or bool(hf))
    if live:
        pairs: list[tuple[int | None, Path]] = list(listing(inputs[0]))
        if not pairs:
            raise WdiffError(
                inputs[0],
                "no checkpoints found (no checkpoint-N folders, no safetensors, ONNX or PyTorch files)",
            )
        return pairs, live
    for p in inputs:
        if not p.exists():
            raise WdiffError(p, missing(p))
    folders = [side_folder(p) for p in inputs if not p.is_dir()]
    shared = frozenset(f for f in folders if folders.count(f) > 1)
    return [(_explicit_step(p, shared), p) for p in inputs], live


def _out_of_order(checkpoints: Sequence[Checkpoint]) -> list[Skipped]:
    """A warning for each checkpoint given after one with a later step (the order given is kept)."""
    known = [c for c in checkpoints if c.step is not None]
    return [
        Skipped(
            b.path, f"given after {a.path} (step {a.step}) but its step is {b.step}: kept in the order given"
        )
        for a, b in zip(known, known[1:])
        if b.step < a.step  # type: ignore[operator]
    ]


def _unfinished(path: Path, expect_state: bool) -> str | None:
    """Why a checkpoint folder of a live training run is not complete yet (docs/formats.md: the HF
    Trainer writes ``trainer_state.json`` last and has no temp-folder-then-rename), or None."""
    if not (expect_state and path.is_dir()):
        return None
    state = path / TRAINER_STATE
    if not state.exists():
        return f"no {TRAINER_STATE} yet, which the HF Trainer writes last: the checkpoint is incomplete"
    return None


def read_one(step: int | None, path: Path, expect_state: bool = False, newest: bool = False) -> Checkpoint:
    """Read one checkpoint with its side files: the tensors, the adapter config, the tie flag.

    ``expect_state``: the run writes ``trainer_state.json`` (last), so a folder without one is not
    complete yet; nor is the ``newest`` one while that file does not parse.
    """
    problem = _unfinished(path, expect_state)
    if problem is not None:
        raise WdiffError(path, problem)
    if expect_state and path.is_dir():
        identity_of(path / TRAINER_STATE)  # a pipe or folder there: refused, never waited on
    if newest and expect_state and path.is_dir():
        load_trainer_state(path / TRAINER_STATE)  # half-written JSON: still being saved
    with recording() as seen:  # the identity of the very descriptors the headers were read from
        contents = open_checkpoint(path)
        # files no reader opened (ONNX typed initializers decoded into wdiff's cache): as they are now
        files = {p: seen.files.get(p) or identity_of(p) for p in _tensor_files(contents.tensors)}
    headers = {p: d for p, d in seen.headers.items() if p in files}
    folder = side_folder(path)
    if step is None:
        step = contents.step
    return Checkpoint(
        str(path), step, contents.tensors, adapter=read_adapter_config(folder), tied=ties_embeddings(folder),
        state_key=contents.state_key, skipped=contents.skipped, files=files, headers=headers,
    )  # fmt: skip


def expects_state(pairs: Sequence[tuple[int | None, Path]]) -> bool:
    """Whether a live run writes ``trainer_state.json`` into its checkpoint folders."""
    return any((p / TRAINER_STATE).exists() for _, p in pairs if p.is_dir())


REMOTE_SCANS = 8  # remote checkpoints scanned at once: each is a few small requests, latency-bound


def _read_checkpoints(
    pairs: Sequence[tuple[int | None, Path | RemotePath]], live: bool, newest_listed: bool = True
) -> tuple[list[Checkpoint], list[Skipped]]:
    """Read every checkpoint (remote ones several at a time). In a folder training may still write
    into, the newest one failing (no trainer_state.json yet, a shard missing or failing validation) is
    left out with a reason; any older one failing is an error: something broke it after it was
    complete. ``newest_listed``: the last of ``pairs`` is the newest in the folder (not so when a
    selection left the newest out)."""
    expect_state = live and expects_state(pairs)
    last = len(pairs) - 1

    def read(i: int) -> Checkpoint | Skipped:
        step, p = pairs[i]
        newest = live and newest_listed and i == last and len(pairs) > 2
        try:
            return read_one(step, p, expect_state, newest)
        except WdiffError as e:
            if not newest:
                raise
            return Skipped(str(p), f"newest checkpoint left out (still being written?): {e}")

    remote = [p for _, p in pairs if isinstance(p, RemotePath)]
    if remote:
        from concurrent.futures import ThreadPoolExecutor

        filesystem(remote[0].url)  # the store's libraries imported here, not by several threads at once

        with ThreadPoolExecutor(REMOTE_SCANS, thread_name_prefix="wdiff-scan") as pool:
            read_all = list(pool.map(read, range(len(pairs))))  # the first error, in checkpoint order
    else:
        read_all = [read(i) for i in range(len(pairs))]
    checkpoints = [c for c in read_all if isinstance(c, Checkpoint)]
    return checkpoints, [s for s in read_all if isinstance(s, Skipped)]


def trainer_state(checkpoints: Sequence[Checkpoint]) -> dict | None:
    """The newest ``trainer_state.json`` beside the checkpoints (it holds the whole log history)."""
    states = [side_folder(location(c.path)) / TRAINER_STATE for c in checkpoints]
    states = [s for s in states if s.exists()]
    return load_trainer_state(states[-1]) if states else None


def scan(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    revisions: str | None = None,
    select: Selection | None = None,
) -> Run:
    """Scan a checkpoint folder or an ordered list of checkpoints into a :class:`Run`. Each may be a
    URL of a remote store (``s3://``, ``gs://``, ``https://``, ``hf://``: ``wdiff.readers.remote``);
    ``revisions`` names the revisions of one ``hf://ORG/NAME`` repository that make the sequence
    (``wdiff.suites``: ``"step0,step1000"``, ``"step{0..143000..1000}"``, ``"step*"``).
    ``select`` (a :class:`wdiff.select.Selection`) chooses the checkpoints, before any is opened,
    and the tensors: the Run holds only those, so nothing else is ever read.

    Raises :class:`~wdiff.errors.WdiffError` naming the file and the problem for bad input, and when
    fewer than two checkpoints are found.
    """
    paths = [location(inputs)] if isinstance(inputs, (str, os.PathLike)) else [location(p) for p in inputs]
    if not paths:
        raise WdiffError(None, "no checkpoints given")
    if any(isinstance(p, RemotePath) for p in paths):
        forget_listings()  # what the store holds now
    if select is not None and not isinstance(select, Selection):
        raise WdiffError(None, f"select must be a wdiff.select.Selection, got {type(select).__name__}")
    if revisions is not None:
        return _scan_revisions(paths, revisions, select)
    try:
        pairs, live = _discover(paths)
    except OSError as e:  # an unreadable folder met while listing or testing it
        raise WdiffError(e.filename, f"cannot read: {e.strerror or e}") from None
    source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} checkpoints"
    return _scan_pairs(paths, pairs, live, source, select=select)


def _scan_revisions(
    paths: Sequence[Path | RemotePath], revisions: str, select: Selection | None = None
) -> Run:
    """The run made of revisions of one Hub repository, each read at the commit it names now."""
    from dataclasses import replace

    from wdiff.suites import hub_revisions

    if len(paths) != 1 or not str(paths[0]).startswith("hf://"):
        raise WdiffError(None, "--revisions needs exactly one input, an hf://ORG/NAME repository")
    found, listed = hub_revisions(str(paths[0]), revisions)
    pairs = [(r.step, r.location) for r in found]
    run = _scan_pairs(paths, pairs, False, str(paths[0]), check_order=listed, select=select)
    origins = {r.location.url: {"url": r.url, "revision": r.name, "commit": r.commit} for r in found}
    checkpoints = tuple(replace(c, origin=origins[c.path]) for c in run.checkpoints)
    return replace(run, checkpoints=checkpoints)


def _scan_pairs(
    paths: Sequence[Path | RemotePath],
    pairs: Sequence[tuple[int | None, Path | RemotePath]],
    live: bool,
    source: str,
    check_order: bool = True,
    select: Selection | None = None,
) -> Run:
    """Read and line up the checkpoints found (``pairs``, in sequence order), those ``select``
    chooses (none of the others is opened), and keep the tensors it chooses."""
    try:
        if len(pairs) < 2:
            where = pairs[0][1] if pairs else paths[0]
            raise WdiffError(
                where, f"found {len(pairs)} checkpoint(s); at least two are needed to see change"
            )
        found = len(pairs)
        newest_listed = True
        if select is not None:
            pairs, newest_listed = _selected(pairs, select)
        checkpoints, left_out = _read_checkpoints(pairs, live, newest_listed)
        warnings = _out_of_order(checkpoints) if check_order and not live else []
        assembly = assemble(checkpoints)
        if not assembly.tensors:
            raise WdiffError(paths[0], "no floating-point tensor is present in every checkpoint")
        assembled = len(assembly.tensors)
        assembly, unmatched = choose_tensors(assembly, select, source)
        warnings += unmatched_warnings(unmatched)
        state = trainer_state(checkpoints)
    except OSError as e:  # an unreadable folder met while listing or testing it
        raise WdiffError(e.filename, f"cannot read: {e.strerror or e}") from None
    return Run(
        source, assembly.checkpoints, assembly.tensors, assembly.skipped, state, tuple(left_out),
        assembly.matching, assembly.aliases, tuple(warnings),
        select, {"checkpoints": found, "tensors": assembled},
    )  # fmt: skip


def _selected(
    pairs: Sequence[tuple[int | None, Path | RemotePath]], select: Selection
) -> tuple[list[tuple[int | None, Path | RemotePath]], bool]:
    """The pairs ``select`` picks (at least two), and whether the last of them is the newest found.
    A step range needs every step: a checkpoint named without one is opened to read the step it
    records (a PyTorch file's ``global_step``)."""
    steps = [s for s, _ in pairs]
    if select.steps is not None and None in steps:
        steps = [read_one(None, p).step if s is None else s for s, p in pairs]
        for s, (_, p) in zip(steps, pairs):
            if s is None:
                raise WdiffError(p, "has no step number in its name or inside, so --steps cannot place it")
    kept = select.pick(steps)
    if len(kept) < 2:
        raise too_few(select, steps, kept)
    return [(steps[i], pairs[i][1]) for i in kept], kept[-1] == len(pairs) - 1
