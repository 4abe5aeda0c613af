"""The Python API: what ``wdiff run`` does, callable the same way from a notebook.

    import wdiff
    run = wdiff.scan("runs/my-finetune")          # what is there, in which order
    res = wdiff.run("runs/my-finetune", "out/")   # compute, write results, PLY and render
    res.summary["tensors"]["transformer.h.0.attn.c_attn.weight"]["net_l2"]
    res.accumulated("transformer.h.0.attn.c_attn.weight")   # numpy array, float32

Data flows one way: scan -> read -> compute -> results on disk -> scene. Results are written into a
temporary folder beside ``out`` and renamed into place at the end, so a failed or interrupted run never
leaves half-written results where the previous ones were.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wdiff import __version__, _warm, checks
from wdiff.checkpoints import fingerprint, recheck, scan
from wdiff.errors import WdiffError
from wdiff.outdir import Staging, check_out
from wdiff.results import (
    ACCUMULATED,
    FRAMES,
    POOLED,
    ROWS,
    SUMMARY,
    Results,
    write_frames,
    write_json,
    write_rows,
)
from wdiff.sequence import Run

if TYPE_CHECKING:
    from wdiff.compute import Previous
    from wdiff.scene.options import SceneOptions

Progress = Callable[[str, int, int], None]  # (phase, advance, total)


def _check_out(out: Path) -> None:
    """Refused before the scan: an OUT results cannot go into (``wdiff.outdir.check_out``)."""
    check_out(out)


def _previous(
    out: Path, run: Run, fingerprints: list[str], chunk_elements: int
) -> tuple[Previous | None, str]:
    """Earlier results in ``out`` that this run extends, and what kind of update this is.

    Extending is exact (the same bits as a full run) when the earlier run saw the same first K
    checkpoints, unchanged, computed the same tensors with the same chunking and the same wdiff.
    Anything else, an earlier checkpoint rewritten or removed included, means a full recompute.
    """
    from wdiff.compute import Previous
    from wdiff.readers.safetensors import read_header

    try:
        old = json.loads((out / SUMMARY).read_text())
        refs, _ = read_header(out / ACCUMULATED)
    except (OSError, ValueError, WdiffError):
        return None, "full"
    seen = old.get("checkpoints") or []
    known = len(seen)
    same_start = (
        known >= 2
        and known <= len(run.checkpoints)
        and all(
            o.get("path") == c.path and o.get("step") == c.step and o.get("fingerprint") == f
            for o, c, f in zip(seen, run.checkpoints, fingerprints)
        )
    )
    tensors = old.get("tensors") or {}
    same_tensors = list(tensors) == [t.name for t in run.tensors] and all(
        tensors[t.name].get("shape") == list(t.shape)
        and t.name in refs
        and refs[t.name].dtype == "F32"
        and refs[t.name].shape == t.shape
        for t in run.tensors
    )
    same_setup = (
        old.get("wdiff_version") == __version__
        and (old.get("timing") or {}).get("chunk_elements") == chunk_elements
        and (out / ROWS).is_file()
        and all("interval_l1" in entry and "distance_l2" in entry for entry in tensors.values())
    )
    if not (same_start and same_tensors and same_setup):
        return None, "full"
    previous = Previous(str(out / ACCUMULATED), {n: r.offset for n, r in refs.items()}, known, tensors)
    return previous, ("up to date" if known == len(run.checkpoints) else f"incremental from {known}")


def _previous_frames(out: Path, known: int, grids: dict[str, Any], pool: str) -> dict[str, np.ndarray] | None:
    """The frames of earlier results when they cover its ``known - 1`` intervals on these grids,
    pooled the same way."""
    try:
        old = Results(out, {})
        info = old.frame_info()
        frames = {name: old.frames(name) for name in grids}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    same = all(
        f.shape == (known - 1, *grid.shape) and tuple(info["blocks"].get(name, ())) == grid.block
        for (name, grid), f in zip(grids.items(), frames.values())
    )
    return frames if same and info["pool"] == pool else None


def _link_or_copy(source: Path, target: Path) -> None:
    """Carry an unchanged results file into the new folder: a hard link (no copy of a map that can be
    tens of GB; the old folder is removed afterwards), or a copy where links are not possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _trainer_summary(state: dict | None) -> dict | None:
    if state is None:
        return None
    keep = ("global_step", "max_steps", "epoch", "num_train_epochs", "save_steps", "logging_steps")
    out: dict[str, Any] = {k: state[k] for k in keep if k in state}
    history = state.get("log_history")
    entries = [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []
    out["log_history"] = [{k: _log_value(v) for k, v in e.items()} for e in entries]
    return out


def _log_value(value: Any) -> Any:
    """A training-log value as summary.json keeps it: text and flags as they are, numbers that are
    not finite or too big for a float as null (the trainer writes bare NaN), anything else as null."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def _collector_paused(fn: Callable) -> Callable:
    """Run ``fn`` with Python's cyclic garbage collector paused (restored after, as it was).

    A run holds a few objects per tensor (its refs, its summary entry, its scene placement); with
    100,000 tensors that is millions, and every full collection walks all of them: measured, a third of
    a 100k-tensor run (28 of 93 s) went to the collector and it grew faster than the tensor count.
    What a run allocates is freed by reference counting; the little cyclic garbage waits for the
    next collection after the run."""

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> Any:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


@_collector_paused
def run(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Run,
    out: str | os.PathLike[str],
    *,
    max_points: int = 1_000_000,
    render: bool = True,
    chunk_elements: int | None = None,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: Progress | None = None,
    on_scan: Callable[[Run], None] | None = None,
    incremental: bool = True,
    frames: bool = False,
    frame_points: int = 200_000,
    extend_only: bool = False,
    keep: Callable[[Path], None] | None = None,
    scene: SceneOptions | None = None,
) -> Results:
    """Scan ``inputs``, compute the accumulated change and write results, ``points.ply``,
    ``render.png`` (unless ``render=False``) and the report (``findings.json``, ``metrics.csv``,
    ``tensors.csv``, ``report.html``) into ``out``. Returns the loaded :class:`Results`.

    ``progress(phase, advance, total)`` is called as chunks finish; ``on_scan(run)`` once the
    checkpoints are scanned (the CLI prints what it found and the skipped tensors there).

    When ``out`` already holds results for the first K checkpoints of the same run (same files, same
    sizes and modification times), only the new intervals are computed: the accumulated map is a
    sum, so it is extended from the earlier one (``incremental=False`` forces a full recompute).
    ``summary["update"]`` says what was done: "full", "incremental from K" or "up to date".

    ``frames=True`` also writes ``frames.safetensors``: the change of every interval (not accumulated),
    pooled into cells under a budget of ``frame_points`` points, for the training film (halved for
    runs so long that all frames together would exceed FRAME_VALUES cells; see ``frame_budget_for``).

    ``inputs`` may be a scanned :class:`Run`. ``extend_only=True`` refuses to do anything but extend
    the results in ``out``, and ``keep(folder)`` adds files to the new results folder before it is
    swapped in: ``wdiff.watch`` uses both (see ``wdiff/watcher.py``).

    ``scene`` (a :class:`wdiff.scene.SceneOptions`) sets every choice about the 3D outputs: point
    budget, pooling, colours, picture size and views, ``mesh.ply``, the film and ``scene.html``; when
    given, it replaces ``max_points``, ``render``, ``frames`` and ``frame_points``.
    """
    from wdiff.compute import DEFAULT_CHUNK_ELEMENTS, ComputeResult, bytes_to_read, compute
    from wdiff.results import create_accumulated, layout_accumulated

    t_start = time.perf_counter()
    checks.run_parameters(  # before any work: a bad value is one line naming the parameter
        max_points=max_points, frame_points=frame_points, chunk_elements=chunk_elements,
        scheduler_name=scheduler, workers=workers,
    )  # fmt: skip
    if scene is None:
        from wdiff.scene.options import SceneOptions

        scene = SceneOptions(max_points=max_points, render=render, frames=frames, frame_points=frame_points)
    _warm.start(plotting=scene.render or scene.frames)  # no matplotlib at all for a run without pictures
    out = Path(out)
    _check_out(out)
    frames, frame_points = scene.frames, scene.frame_points
    the_run = inputs if isinstance(inputs, Run) else scan(inputs)
    chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    recheck(the_run)  # every input still the file scanned, before anything is written
    fingerprints = [fingerprint(c) for c in the_run.checkpoints]
    staging = Staging(out)  # one writer per OUT; clears what killed runs left; the temp folder
    try:
        previous, update = (
            _previous(out, the_run, fingerprints, chunk_elements) if incremental else (None, "full")
        )
        intervals = len(the_run.checkpoints) - 1
        frame_plan = (
            _cell_plan(the_run, frame_budget_for(frame_points, intervals, len(the_run.tensors)))
            if frames
            else {}
        )
        frame_grids = _grids(frame_plan, scene.pool)  # pooled like the scene (max or mean), for the film
        old_frames = None
        if frames and previous is not None:
            old_frames = _previous_frames(out, previous.known, frame_grids, scene.pool)
            if old_frames is None:  # earlier results without these frames: recompute them all
                previous, update = None, "full"
        if extend_only and previous is None:
            raise WdiffError(out, "these results cannot be extended (other checkpoints, tensors or setup)")
        if on_scan is not None:
            on_scan(the_run)
        tmp = staging.folder
        layout = layout_accumulated((t.name, t.shape) for t in the_run.tensors)
        acc_path = tmp / ACCUMULATED
        plan = _cell_plan(the_run, scene.max_points)
        if update == "up to date":  # nothing new to read: keep the results, redo the scene
            _link_or_copy(out / ACCUMULATED, acc_path)
            _link_or_copy(out / ROWS, tmp / ROWS)
            for name in (POOLED, FRAMES) if frames else (POOLED,):  # the scene checks the pooling fits
                if (out / name).is_file():
                    _link_or_copy(out / name, tmp / name)
            result = ComputeResult(previous.tensors, 0, 0.0, 0)
        else:
            create_accumulated(acc_path, layout)
            total = bytes_to_read(the_run, previous)

            def advance(nbytes: int) -> None:
                if progress is not None:
                    progress("compute", nbytes, total)

            _warm.import_scheduler(scheduler)  # while the kernels load (LLVM, without the GIL)
            _warm.wait()  # compute_seconds counts from the first read, not from loading the kernels
            result = compute(
                the_run,
                str(acc_path),
                layout,
                chunk_elements=chunk_elements,
                scheduler=scheduler,
                workers=workers,
                progress=advance,
                previous=previous,
                grids=_grids(plan, scene.pool),
                frame_grids=frame_grids,
            )
            from wdiff.scene import save_cells
            from wdiff.scene.pooling import cell_counts

            t_write = time.perf_counter()
            save_cells(tmp / POOLED, plan, result.cells, scene.pool)
            write_rows(tmp / ROWS, result.rows)
            if frames:
                done = {}
                for n, f in result.frames.items():  # "mean" frames hold sums until here
                    g = frame_grids[n]
                    done[n] = f / cell_counts(g.rows, g.cols, g.block) if g.mean else f
                if old_frames is not None:
                    done = {n: np.concatenate([old_frames[n], f]) for n, f in done.items()}
                blocks = {n: g.block for n, g in frame_grids.items()}
                write_frames(tmp / FRAMES, done, blocks, scene.pool)
            # compute_seconds: from the first read to the last result written
            written = result.compute_seconds + time.perf_counter() - t_write
            result = dataclasses.replace(result, compute_seconds=written)
        for name, others in the_run.aliases.items():  # tied weights: reported once, with every name
            if name in result.tensors:
                result.tensors[name]["aliases"] = others
        summary: dict[str, Any] = {
            "wdiff_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": the_run.source,
            "checkpoints": [
                {"path": c.path, "step": c.step, "tensors": len(c.tensors), "fingerprint": f}
                | ({"state_key": c.state_key} if c.state_key is not None else {})
                for c, f in zip(the_run.checkpoints, fingerprints)
            ],
            "tensors": result.tensors,
            "skipped": [{"name": s.name, "reason": s.reason} for s in the_run.skipped],
            "left_out": [{"path": s.name, "reason": s.reason} for s in the_run.left_out],
            "warnings": [{"path": s.name, "reason": s.reason} for s in the_run.warnings],
            "timing": {
                "read_bytes": result.read_bytes,
                "compute_seconds": result.compute_seconds,
                "chunks": result.chunks,
                "chunk_elements": chunk_elements,
                "scheduler": scheduler,
            },
            "update": update,
            "trainer_state": _trainer_summary(the_run.trainer_state),
        }
        if the_run.matching is not None:  # ONNX: which initializers were matched by name, which by position
            summary["matching"] = the_run.matching
        summary["scene"] = _scene(tmp, the_run, summary, scene, progress)
        summary["timing"]["total_seconds"] = time.perf_counter() - t_start
        if keep is not None:
            keep(tmp)
        write_json(tmp / SUMMARY, summary)
        from wdiff.report import write_report

        # findings.json, metrics.csv, tensors.csv, report.html (see wdiff.report); its charts are
        # pictures too: none without render (`wdiff report OUT` draws them)
        write_report(tmp, charts=scene.render)
        staging.commit()
    finally:
        staging.close()
    return Results.load(out)


FRAME_VALUES = 20_000_000  # all frames of a run together: 160 MB of float64 cells while they are combined


def frame_budget_for(frame_points: int, intervals: int, tensors: int) -> int:
    """Points per frame: ``frame_points``, halved as often as needed to keep every frame of the run
    within FRAME_VALUES (a run of 1,000 checkpoints would otherwise hold 200 million cells). Halving
    in steps keeps the frames' grid unchanged while a watched run grows, until its length doubles."""
    budget = frame_points
    while budget > tensors and budget * max(intervals, 1) > FRAME_VALUES:
        budget //= 2
    return max(budget, tensors)


def _grids(plan: dict, pool: str) -> dict:
    """The compute step's Grid for each tensor of a scene's cell plan."""
    from wdiff.compute import Grid

    return {name: Grid(rows, cols, block, mean=pool == "mean") for name, (rows, cols, block) in plan.items()}


def _cell_plan(run: Run, max_points: int) -> dict:
    """The scene's pooling for this budget, so compute can pool on the way (see ``scene.cell_plan``)."""
    from wdiff.scene import cell_plan

    try:
        return cell_plan([(t.name, t.shape) for t in run.tensors], max_points)
    except ValueError as e:  # the budget cannot give every tensor a point
        raise checks.OptionError("max_points", f"{max_points}: {e}") from None


def _title(run: Run) -> str:
    steps = [s for s in run.steps if s is not None]
    span = f"steps {steps[0]}-{steps[-1]}" if len(steps) >= 2 else f"{len(run.checkpoints)} checkpoints"
    return f"{Path(run.source).name}: accumulated |dW| over {len(run.checkpoints)} checkpoints, {span}"


def _scene(
    folder: Path, run: Run, summary: dict, options: SceneOptions, progress: Progress | None
) -> dict[str, Any]:
    """Results on disk -> point cloud PLY, pictures, mesh, film, HTML viewer (``wdiff.scene.outputs``)."""
    from wdiff.scene.outputs import write_outputs

    def step(what: str) -> None:
        if progress is not None:
            progress(what, 0, 1)

    names = list(summary["tensors"])
    return write_outputs(folder, names, _title(run), options, Path(run.source).name, list(run.steps), step)
