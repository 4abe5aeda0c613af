"""Follow a training run while it writes checkpoints: what ``wdiff watch DIR -o OUT`` does.

Every ``poll`` seconds the folder is listed the way ``wdiff run`` lists it (``checkpoint-N/`` folders or
numbered checkpoints). A new checkpoint counts as complete when the names, sizes and modification times
of all its files stayed the same over ``settle`` polls in a row and it validates like any input (every
weight file checked, ``trainer_state.json`` parsed where the run writes one). Complete checkpoints are
added one at a time, in step order, each as one more interval through the incremental path of
``wdiff.run``; the results are swapped into OUT after each one, so OUT is always a finished result.

Why OUT keeps two checkpoints of its own. An incremental update reads W(0) (net change and rotation
are measured from it) and W(K-1) (where the new interval starts), and ``save_total_limit`` deletes old
checkpoint folders while training goes on: W(0) first, and with a limit of 1 W(K-1) the moment W(K) is
complete. So the watch keeps, inside OUT, a byte-for-byte copy of the tensors of the first checkpoint
(``watch-first.safetensors``, written once) and of the latest one (``watch-last.safetensors``, replaced
by each update). Each new checkpoint is copied before it is read, so its deletion during the update
changes nothing. The price: one more write of each checkpoint's size, and OUT holds two checkpoints
more. The results are exactly (bit for bit) those of ``wdiff run`` over the same checkpoints.

A checkpoint deleted before the watch could copy it is left out with a warning (its interval merges
into the next one, as it would in a batch run over what is left). Ctrl-C stops the watch; an update it
interrupts is dropped and OUT keeps the results of the last finished one.

A clean stop (``until``: the training process ended, or said it is done): the update under way is
finished, then the folder is polled until every checkpoint left has settled, the complete ones are
added and the others (half-written when training died) are left out with a warning. A writer that no
longer writes settles within ``settle`` polls. ``wdiff.integrations`` starts ``wdiff watch`` this way
from a training script (``--parent-pid``, ``--until-file``).

A folder that cannot be listed for a moment (Lightning's ``last.ckpt``, which names no step, while it
is copied in and not yet a zip) is said once and tried again at the next poll; at a clean stop, still
failing after ``settle`` polls, it is an error.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wdiff import api, checks
from wdiff.assemble import assemble
from wdiff.checkpoints import expects_state, fingerprint, listing, read_one, trainer_state
from wdiff.errors import WdiffError
from wdiff.kept import keep, read_kept
from wdiff.outdir import link_or_copy, move, sibling
from wdiff.results import Results
from wdiff.schema import SUMMARY, read_summary
from wdiff.select import Selection, choose_tensors, trimmed
from wdiff.sequence import Checkpoint, Run

KEPT_FIRST = "watch-first.safetensors"
KEPT_LAST = "watch-last.safetensors"


def _snapshot(path: Path) -> tuple | None:
    """Names, sizes and modification times of every file of a checkpoint; None once it is gone."""
    try:
        if path.is_file():
            st = path.stat()
            return ((path.name, st.st_size, st.st_mtime_ns),)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return None


@dataclass
class _Pending:
    snapshot: tuple | None
    stable: int = 0  # polls in a row it stayed the same
    problem: str | None = None  # why it does not validate yet
    checkpoint: Checkpoint | None = None  # as read once it validated: the update copies this one


class Watcher:
    """The watch's state between polls; ``poll()`` adds what became complete since the last one."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        out: str | os.PathLike[str],
        *,
        settle: int = 2,
        on_update: Callable[[Results], None] | None = None,
        warn: Callable[[str], None] | None = None,
        **options: Any,
    ) -> None:
        self.folder = Path(folder)
        self.out = Path(out)
        self.settle = max(1, settle)
        self.on_update = on_update
        self.warn = warn or (lambda message: None)
        self.selection: Selection | None = options.pop("select", None)  # applied here, as scan does
        if self.selection is not None and not isinstance(self.selection, Selection):
            kind = type(self.selection).__name__
            raise WdiffError(None, f"select must be a wdiff.select.Selection, got {kind}")
        # a watch extends its results at every checkpoint, and only a float32 map is: "auto" (the
        # default) means float32 here, anything else is refused now, before the first update
        check_map_dtype(options.get("map_dtype", checks.MAP_AUTO))
        self.options = {**options, "map_dtype": "float32"}
        self._pending: dict[Path, _Pending] = {}
        self._waiting: list[tuple[int, Path]] = []  # the last poll's candidates not added (yet)
        self._unlisted: tuple[str, int] | None = None  # why the folder could not be listed; polls in a row
        self._first: Checkpoint | None = None  # W(0), kept beside OUT until the first results take it
        self._expect_state = False
        self._staged = sibling(self.out, "watch-next.safetensors")  # <= 255 bytes for any OUT name
        self._first_staged = sibling(self.out, "watch-first.safetensors")
        if not self.folder.is_dir():
            raise WdiffError(self.folder, "is not a folder: wdiff watch follows a training output folder")
        self._staged.unlink(missing_ok=True)  # what a killed watch left
        self._first_staged.unlink(missing_ok=True)

    # -- what OUT already holds --------------------------------------------------------------------
    def _history(self) -> list[dict] | None:
        """The checkpoints OUT's results cover, when OUT holds the watch's kept copies."""
        if not ((self.out / KEPT_FIRST).is_file() and (self.out / KEPT_LAST).is_file()):
            return None
        try:
            summary = read_summary(self.out / SUMMARY)
        except WdiffError:  # not results this watch can extend: it starts over
            return None
        if Selection.from_record(summary.get("selection")) != (self.selection or Selection()):
            return None  # chosen otherwise: this watch starts over (wdiff.update recomputes in full)
        return summary["checkpoints"]  # at least two: wdiff.schema checks

    def last_step(self) -> int | None:
        history = self._history()
        return history[-1]["step"] if history else None

    # -- polling -----------------------------------------------------------------------------------
    def _complete(self, candidates: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
        """Those candidates that stayed unchanged over ``settle`` polls and validate."""
        ready = []
        for step, path in candidates:
            snap = _snapshot(path)
            pending = self._pending.get(path)
            if pending is None or pending.snapshot != snap or snap is None:
                self._pending[path] = _Pending(snap)
                continue
            pending.stable += 1
            if pending.stable < self.settle:
                continue
            try:  # as scan judges the newest one
                pending.checkpoint = read_one(step, path, self._expect_state, newest=True)
            except WdiffError as e:
                pending.problem = str(e)
                continue
            ready.append((step, path))
        return ready

    def poll(self) -> list[Results]:
        """List the folder once; add every checkpoint that became complete. Returns the updates."""
        last = self.last_step()
        try:
            found = listing(self.folder)
        except WdiffError as e:  # a file that says nothing yet: Lightning's last.ckpt while it is copied
            if self._unlisted is None or self._unlisted[0] != str(e):
                self.warn(f"cannot list the folder yet, trying again: {e}")
            self._unlisted = (str(e), 1 if self._unlisted is None else self._unlisted[1] + 1)
            return []
        self._unlisted = None
        # Once the run is seen writing trainer_state.json, a checkpoint without one is incomplete.
        self._expect_state = self._expect_state or expects_state(found)
        candidates = [(s, p) for s, p in found if last is None or s > last]
        if self.selection is not None:  # those a batch run over the folder would pick (wdiff.select)
            picked = self.selection.following([s for s, _ in candidates], started=last is not None)
            candidates = [candidates[i] for i in picked]
        self._waiting = candidates  # the same list: what is added below leaves it
        self._pending = {p: v for p, v in self._pending.items() if any(p == c for _, c in candidates)}
        if last is None and self._first is not None:  # kept: no candidate any more, listed or deleted
            candidates[:] = [(s, p) for s, p in candidates if p != Path(self._first.path)]
        ready = self._complete(candidates)
        updates = []
        if last is None:  # the first results: the two oldest complete checkpoints
            if not ready or ready[0] != candidates[0]:
                return updates
            if self._first is None:  # kept the moment it is complete (see _keep_first)
                self._keep_first(*ready[0])
                del candidates[0], ready[0]
                if self._first is None or not ready or ready[0] != candidates[0]:
                    return updates
            result = self._start(*ready[0])
            if result is None:
                return updates
            updates.append(result)
            del candidates[0], ready[0]
        for step, path in ready:
            if (step, path) != candidates[0]:
                older = self._pending[candidates[0][1]]
                if older.problem is not None:  # it stopped changing and is still broken
                    raise WdiffError(
                        candidates[0][1], f"is broken while a newer checkpoint is complete: {older.problem}"
                    )
                break  # wait for it: checkpoints are added in order
            candidates.pop(0)
            result = self._extend(step, path)
            if result is not None:
                updates.append(result)
        return updates

    def settled(self) -> bool:
        """Whether every checkpoint the last poll could not add stayed unchanged over ``settle`` polls:
        once the run no longer writes, polling again adds nothing more."""
        if self._unlisted is not None:
            return False
        return all(
            path in self._pending and self._pending[path].stable >= self.settle for _, path in self._waiting
        )

    def finish(self, interval: float, max_polls: int = 1000) -> list[Results]:
        """The run stopped writing: poll every ``interval`` seconds until every checkpoint left has settled,
        adding the complete ones; each that never completed is left out with a warning. The updates."""
        updates = self.poll()
        for _ in range(max_polls):
            if self.settled():
                break
            if self._unlisted is not None and self._unlisted[1] > self.settle:  # nothing writes it any more
                raise WdiffError(self.folder, f"cannot be listed: {self._unlisted[0]}")
            time.sleep(interval)
            updates += self.poll()
        else:  # something still writes into the folder
            self.warn(f"{self.folder}: still changing after {max_polls} polls; stopped all the same")
        if self._first is not None:
            self.warn(f"{self._first.path}: left out, the only complete checkpoint when the run stopped")
        for _, path in self._waiting:
            problem = self._pending[path].problem if path in self._pending else None
            why = (problem or "the first results need two complete checkpoints").removeprefix(f"{path}: ")
            self.warn(f"{path}: left out, not complete when the run stopped ({why})")
        return updates

    # -- updates -----------------------------------------------------------------------------------
    def _read(self, step: int, path: Path, copy: Path) -> Checkpoint | None:
        """Copy a complete checkpoint's tensors (as ``_complete`` read them) to ``copy`` beside OUT,
        which the update then reads: the original may be deleted any time now (None: it was already)."""
        live = self._pending[path].checkpoint
        assert live is not None  # only complete checkpoints are read
        try:
            identity = fingerprint(live)  # of every file, as a batch run fingerprints it
            # only what the selected tensors read; refuses a file that is not the one scanned, or
            # changed while copied
            keep(trimmed(live, self.selection), copy)
        except (OSError, WdiffError) as e:
            if path.exists():
                raise
            self.warn(f"{path}: deleted before it could be read, left out ({e})")
            return None
        return read_kept(copy, str(path), step, identity)

    def _run(self, run: Run, keep: Callable[[Path], None], **extra: Any) -> Results:
        try:
            results = api.run(run, self.out, keep=keep, **{**self.options, **extra})
        finally:
            self._staged.unlink(missing_ok=True)
        if self.on_update is not None:
            self.on_update(results)
        return results

    def _assemble(self, checkpoints: list[Checkpoint]) -> Run:
        """The run over these checkpoints, put together by the assembly step ``wdiff run`` uses."""
        assembly = assemble(checkpoints)
        if not assembly.tensors:
            raise WdiffError(self.folder, "no floating-point tensor is present in every checkpoint")
        assembly, _ = choose_tensors(assembly, self.selection, self.folder)
        return Run(
            str(self.folder), assembly.checkpoints, assembly.tensors, assembly.skipped,
            trainer_state(checkpoints[-1:]), matching=assembly.matching, aliases=assembly.aliases,
            selection=self.selection,
        )  # fmt: skip

    def _keep_first(self, step: int, path: Path) -> None:
        """Copy the oldest complete checkpoint, W(0), beside OUT as soon as it is complete: with
        ``save_total_limit=1`` the Trainer deletes it the moment the second one is saved, before that
        one could settle. Nothing if it was deleted already (the next one is then the oldest)."""
        self._first = self._read(step, path, self._first_staged)

    def _start(self, step: int, path: Path) -> Results | None:
        """The first results, from W(0) (kept) and the oldest complete checkpoint after it (read from
        its copy; OUT keeps both). Results in OUT without the watch's copies are recomputed this way."""
        assert self._first is not None
        try:
            checkpoint = self._read(step, path, self._staged)
            if checkpoint is None:  # deleted: the next complete one is the second
                return None
            run = self._assemble([self._first, checkpoint])

            def keep(folder: Path) -> None:
                move(self._first_staged, folder / KEPT_FIRST)  # into OUT: a mount point is another fs
                move(self._staged, folder / KEPT_LAST)

            return self._run(run, keep)
        finally:
            if not self._first_staged.exists():  # in OUT now (or lost with a failed update: kept anew)
                self._first = None

    def _extend(self, step: int, path: Path) -> Results | None:
        """One more interval: W(0) and W(K-1) from OUT's kept copies, W(K) from its fresh copy."""
        history = self._history()
        assert history is not None
        checkpoint = self._read(step, path, self._staged)
        if checkpoint is None:
            return None
        # Checkpoints between W(0) and W(K-1) are not read again (their intervals are in OUT's
        # accumulated map): they stand in with W(K-1)'s tensors, and ``extend_only`` makes sure
        # nothing but an extension of OUT's results can be computed from them.
        first, *middle = history
        known = [read_kept(self.out / KEPT_FIRST, first["path"], first["step"], first["fingerprint"])]
        if middle:
            last = read_kept(self.out / KEPT_LAST, middle[-1]["path"], None, None)
            known += [
                replace(last, path=h["path"], step=h["step"], known_fingerprint=h["fingerprint"])
                for h in middle
            ]
        run = self._assemble([*known, checkpoint])

        def keep(folder: Path) -> None:
            link_or_copy(self.out / KEPT_FIRST, folder / KEPT_FIRST)  # no copy of GBs
            move(self._staged, folder / KEPT_LAST)

        return self._run(run, keep, extend_only=True, incremental=True)


def watch(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    poll: float = 10.0,
    settle: int = 2,
    stop: threading.Event | None = None,
    until: Callable[[], bool] | None = None,
    on_update: Callable[[Results], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> Results | None:
    """Follow a training run in ``folder``, keeping ``out`` up to date, until ``stop`` is set (or
    Ctrl-C) or ``until()`` returns true. ``options`` are those of :func:`wdiff.run`. Returns the last
    results, if any.

    ``stop`` and Ctrl-C end the watch at once (an update they interrupt is dropped). ``until`` is asked
    between polls (for instance :func:`process_ended`): once it says so, the watch adds every checkpoint
    that is complete (:meth:`Watcher.finish`) and returns. ``on_update(results)`` is called after each
    update, ``warn(line)`` for checkpoints left out.
    """
    checks.number("poll", poll, *checks.POLL, integer=False)  # 0 or less would spin, NaN never wake
    checks.number("settle", settle, 1, 1000)
    # now, not at the first update
    numbers = ("max_points", "frame_points", "chunk_elements", "workers")
    checks.run_parameters(**{k: options[k] for k in numbers if k in options},
                          scheduler_name=options.get("scheduler", "threads"))  # fmt: skip
    stop = stop or threading.Event()
    watcher = Watcher(folder, out, settle=settle, on_update=on_update, warn=warn, **options)
    latest = None
    while not stop.is_set():
        ending = until is not None and until()  # asked first: what is on disk now is all there will be
        updates = watcher.finish(min(poll, 1.0)) if ending else watcher.poll()
        latest = updates[-1] if updates else latest
        if ending:
            break
        stop.wait(poll)
    return latest if latest is not None else (Results.load(out) if (Path(out) / SUMMARY).is_file() else None)


def check_map_dtype(map_dtype: str) -> None:
    """A watch extends its results at every update, and only a float32 map is extended
    (``wdiff.update.map_dtypes``): any other ``map_dtype`` than that or "auto" (which is float32 here)
    is refused before the watch starts."""
    checks.run_parameters(map_dtype=map_dtype)
    if map_dtype not in (checks.MAP_AUTO, "float32"):
        raise checks.OptionError(
            "map_dtype", "watch extends its results at every checkpoint: only a float32 map is"
        )


def process_ended(pid: int) -> Callable[[], bool]:
    """A test for ``watch(until=...)``: has process ``pid`` ended? Killed too (SIGKILL included).

    When ``pid`` is this process's parent (the training script that started the watch), its end is
    seen as this process being handed to another parent, which the kernel does the moment the parent
    dies: a zombie parent nobody reaps, or a new process that reuses the number, cannot hide it.
    """
    checks.number("parent_pid", pid, 1, (1 << 31) - 1)
    if os.getppid() == pid:
        return lambda: os.getppid() != pid

    def ended() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # someone else's process: it exists
            return False
        try:  # a zombie exists until reaped, but runs no more (Linux: state Z)
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] == b"Z"
        except (OSError, IndexError):
            return False

    return ended
