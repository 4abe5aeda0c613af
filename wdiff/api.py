"""The Python API: what ``wdiff run`` does, callable the same way from a notebook.

    import wdiff
    run = wdiff.scan("runs/my-finetune")          # what is there, in which order
    res = wdiff.run("runs/my-finetune", "out/")   # compute, write results, PLY and render
    res.summary["tensors"]["transformer.h.0.attn.c_attn.weight"]["net_l2"]
    res.accumulated("transformer.h.0.attn.c_attn.weight")   # numpy array, float32

Data flows one way, and ``run`` reads as its steps: ``read_inputs`` (``wdiff.scan``) ->
``plan_update`` (``wdiff.update``: full, incremental or up to date) -> ``compute_or_reuse``
(``wdiff.compute``, at the level of detail ``wdiff.detail`` plans) -> ``build_summary``
(``wdiff.schema``) -> ``draw`` (``wdiff.scene``) -> ``write_results`` (summary.json and the report,
``wdiff.report``) -> commit. Results are written into a
temporary folder beside ``out`` and renamed into place at the end, so a failed or interrupted run never
leaves half-written results where the previous ones were.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wdiff import _warm, checks
from wdiff.checkpoints import fingerprint, recheck, scan
from wdiff.detail import finish_frames, write_cells
from wdiff.errors import WdiffError
from wdiff.outdir import Staging, check_out, link_or_copy
from wdiff.readers.remote import is_folded_url, is_url
from wdiff.results import Results, write_json, write_neuron_change
from wdiff.schema import (
    ACCUMULATED,
    FRAMES,
    NEURON_CHANGE,
    POOLED,
    SUMMARY,
    build_summary,
    read_summary,
    stored_shapes,
)
from wdiff.sequence import Run, scanned_files
from wdiff.update import Plan, cell_grids, plan_update

if TYPE_CHECKING:
    from wdiff.compute import ComputeResult
    from wdiff.scene.options import SceneOptions
    from wdiff.scene.outputs import Views
    from wdiff.select import Selection

Progress = Callable[[str, int, int], None]  # (phase, advance, total)


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
    revisions: str | None = None,
    commit_every: int | None = None,
    spectrum: bool | None = None,
    select: Selection | None = None,
    map_dtype: str = "auto",
) -> Results:
    """Scan ``inputs`` (or take a scanned :class:`Run`), compute the accumulated change and write
    results, ``points.ply``, ``render.png`` (unless ``render=False``) and the report (``findings.json``,
    ``metrics.csv``, ``tensors.csv``, ``report.html``) into ``out``. Returns the loaded :class:`Results`.

    ``progress(phase, advance, total)`` is called as chunks finish; ``on_scan(run)`` once the
    checkpoints are scanned. Results in ``out`` for the first K checkpoints of the same run are
    extended, not recomputed (``incremental=False`` forces a full recompute); ``summary["update"]``
    says "full", "incremental from K" or "up to date" (``wdiff.update``). ``frames=True`` also writes
    ``frames.safetensors`` for the training film, about ``frame_points`` cells per interval
    (``wdiff.detail.frame_budget_for``). ``wdiff.watch`` passes ``extend_only`` (refuse anything but
    an extension) and ``keep(folder)`` (add files to the new results before they are swapped in).

    ``scene`` (a :class:`wdiff.scene.SceneOptions`) sets every choice about the 3D outputs; when
    given, it replaces ``max_points``, ``render``, ``frames`` and ``frame_points``.

    Inputs may be URLs of a remote store (``s3://``, ``gs://``, ``https://``, ``hf://``), read by range
    with no local copy; ``revisions`` names the revisions of one ``hf://ORG/NAME`` repository that make
    the sequence (``wdiff.suites``). ``commit_every``: commit results every that many new checkpoints,
    so that an interrupted run goes on from the last commit (``progress("checkpoints", done, total)``
    after each); by default every ``REMOTE_COMMIT_EVERY`` for remote inputs, once at the end for local
    ones. Each commit after the first reads the first checkpoint and the last one committed again.

    ``spectrum``: the singular values of every 2-D weight's update ``W(T) - W(0)`` (``wdiff.spectrum``;
    ``update_spectrum`` in each tensor's summary entry), which reads W(0) and W(T) again (up to six
    times for a matrix over 512 x 512). None (the default): on for local inputs whose matrices hold at
    most ``SPECTRUM_AUTO_ELEMENTS`` values (33.5 million) per checkpoint, off for bigger ones and for
    remote inputs (their bytes would be downloaded again).

    ``select`` (a :class:`wdiff.select.Selection`: ``include``/``exclude`` globs on tensor names,
    a ``steps`` range, ``every`` Nth checkpoint) chooses what is read when ``inputs`` are scanned;
    nothing else is read, and ``summary["selection"]`` records it. Earlier results of another
    selection are recomputed in full.

    ``map_dtype``: how ``accumulated.safetensors`` stores the map, ``"float32"`` or ``"bfloat16"`` (half
    the bytes, rounded to at most 0.39%; everything else is computed from the float32 sums either way;
    ``wdiff.update.map_dtypes``), or ``"none"``: not stored (every other result the same;
    ``Results.accumulated`` and a scene at another budget then cannot be had). A BF16 map, or none, is
    not extended when the run grows: it is recomputed. ``"auto"`` (the default): the storage asked for
    earlier results of the same tensors in ``out`` (float32 or BF16), else float32 up to
    ``wdiff.update.MAP_AUTO_BYTES`` (2 GiB of map, 536 million weights) and none above
    (``wdiff.update.chosen_map_dtype``); ``summary["map_dtype"]`` and ``["map_choice"]`` say which.
    Runs committed in parts store the parts before the last in float32, which the next part extends.
    """
    t_start = time.perf_counter()
    checks.run_parameters(  # before any work: a bad value is one line naming the parameter
        max_points=max_points, frame_points=frame_points, chunk_elements=chunk_elements,
        scheduler_name=scheduler, workers=workers, map_dtype=map_dtype,
    )  # fmt: skip
    if scene is None:
        scene = scene_options(max_points=max_points, render=render, frames=frames, frame_points=frame_points)
    # no matplotlib nor picture worker at all for a run without pictures
    _warm.start(plotting=scene.render or scene.frames)
    if is_url(out) or is_folded_url(out):
        raise WdiffError(out, "results are written to local disk: give a local folder for -o")
    out = Path(out)
    the_run, fingerprints = read_inputs(inputs, out, revisions, select)
    chunk = _chunk_elements(chunk_elements)
    staging = Staging(out)  # one writer per OUT; clears what killed runs left; the temp folder
    try:
        whole = plan_update(out, the_run, fingerprints, chunk, scene, incremental=incremental,
                            extend_only=extend_only, map_dtype=map_dtype)  # fmt: skip
        if on_scan is not None:
            on_scan(the_run)
        ends = commit_points(the_run, whole, commit_every)
    except BaseException:
        staging.close()
        raise
    total = len(the_run.checkpoints)
    spectrum = spectrum_by_default(the_run) if spectrum is None else spectrum
    report = _Report(progress, compute_total(the_run, whole, ends))
    for n, end in enumerate(ends):
        staging = staging if n == 0 else Staging(out)
        pictures: list[Views] = []  # rendering in the picture worker while the summary and report are written
        try:
            part, plan = the_run, whole
            stored = whole.map_dtype if end == total else "float32"  # parts before the last are extended
            if len(ends) > 1:  # each part extends the one committed before it
                part = first_checkpoints(the_run, end) if end < total else the_run
                plan = plan_update(out, part, fingerprints[:end], chunk, scene, extend_only=extend_only,
                                   incremental=incremental or n > 0, intervals=total - 1,
                                   map_dtype=stored)  # fmt: skip
            result = compute_or_reuse(plan, out, staging.folder, scene, scheduler, workers, report)
            spectrum_seconds = add_spectra(plan, result, scheduler, workers, report) if spectrum else None
            summary = build_summary(part, fingerprints[:end], result, update=plan.update,
                                    chunk_elements=plan.chunk_elements, scheduler=scheduler,
                                    spectrum_seconds=spectrum_seconds, map_dtype=stored,
                                    map_choice=whole.map_choice)  # fmt: skip
            summary["scene"] = draw(staging.folder, part, summary, scene, report, pictures)
            summary["timing"]["total_seconds"] = time.perf_counter() - t_start
            write_results(staging.folder, summary, keep, charts=scene.render, pictures=pictures)
            staging.commit()
        finally:
            staging.close()
        report("checkpoints", end, total)
    return Results(out, read_summary(out / SUMMARY))  # the report checked these maps in staging


# The spectrum is on by default up to this many matrix elements per checkpoint. Its cost is in the
# elements, not the bytes: about 1.7 s per 45 million elements on 2 cores (six 4096 x 11008 updates took
# 10.3 s, while the accumulated change of all six checkpoints took 0.4-0.8 s; docs/performance.md), so
# this keeps a default run's spectrum near a second.
SPECTRUM_AUTO_ELEMENTS = 1 << 25


def spectrum_by_default(run: Run) -> bool:
    """Whether ``run`` gets update spectra when not asked either way: local inputs whose matrices (read
    again from W(0) and W(T), up to six times) hold at most ``SPECTRUM_AUTO_ELEMENTS`` values per
    checkpoint."""
    from wdiff.spectrum import is_matrix

    if any(is_url(p) for c in run.checkpoints for p in c.files):
        return False
    return sum(t.numel for t in run.tensors if is_matrix(t)) <= SPECTRUM_AUTO_ELEMENTS


REMOTE_COMMIT_EVERY = 16  # remote inputs: commit after this many new checkpoints (see ``run``)


def commit_points(run: Run, plan: Plan, commit_every: int | None) -> list[int]:
    """After how many checkpoints results are committed: every ``commit_every`` new ones past those
    ``out`` holds already, and at the end."""
    total = len(run.checkpoints)
    if commit_every is None:
        remote = any(is_url(p) for c in run.checkpoints for p in c.files)
        commit_every = REMOTE_COMMIT_EVERY if remote else 0
    if commit_every < 0:
        raise checks.OptionError("commit_every", f"{commit_every}: must be 0 (only at the end) or more")
    known = plan.previous.known if plan.previous is not None else 0
    if commit_every == 0 or total - known <= commit_every:
        return [total]
    first = max(known, 1) + commit_every  # a first part of a full run has commit_every intervals
    return [*range(first, total, commit_every), total]


def first_checkpoints(run: Run, n: int) -> Run:
    """The run of the first ``n`` checkpoints of ``run``."""
    tensors = tuple(
        dataclasses.replace(t, refs=t.refs[:n], files=scanned_files(t.refs[:n], run.checkpoints[:n]))
        for t in run.tensors
    )
    return dataclasses.replace(run, checkpoints=run.checkpoints[:n], tensors=tensors)


def compute_total(run: Run, plan: Plan, ends: list[int]) -> int:
    """Checkpoint bytes a run committed at ``ends`` reads: every checkpoint up to the first commit
    (or W(0) and W(K-1).. after results ``out`` holds for K), then W(0) and W(end-1).. for each next."""
    per_checkpoint = [sum(t.refs[i].nbytes for t in run.tensors) for i in range(len(run.checkpoints))]
    known = plan.previous.known if plan.previous is not None else 0
    total = 0
    for end in ends:
        if end <= known:
            continue
        total += (
            sum(per_checkpoint[:end])
            if known == 0
            else per_checkpoint[0] + sum(per_checkpoint[known - 1 : end])
        )
        known = end
    return total


class _Report:
    """``progress`` with the ``compute`` phase's total that of the whole run, over every commit."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total = progress, total

    def __call__(self, phase: str, advance: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, advance, self.total if phase == "compute" else total)


def read_inputs(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Run,
    out: Path,
    revisions: str | None = None,
    select: Selection | None = None,
) -> tuple[Run, list[str]]:
    """The run and its checkpoints' fingerprints, once ``out`` is known to be a place results can go
    (refused before the scan) and every input is still the file scanned (before anything is written)."""
    if isinstance(inputs, Run) and select is not None:
        raise checks.OptionError("select", "applies to inputs being scanned: pass it to wdiff.scan for a Run")
    check_out(out)
    the_run = inputs if isinstance(inputs, Run) else scan(inputs, revisions, select)
    recheck(the_run)
    return the_run, [fingerprint(c) for c in the_run.checkpoints]


def scene_options(**picture: Any) -> SceneOptions:
    """The SceneOptions of ``run``'s own picture parameters (when no ``scene`` is given)."""
    from wdiff.scene.options import SceneOptions

    return SceneOptions(**picture)


def _chunk_elements(chunk_elements: int | None) -> int:
    from wdiff.compute import DEFAULT_CHUNK_ELEMENTS

    return chunk_elements or DEFAULT_CHUNK_ELEMENTS


def compute_or_reuse(
    plan: Plan,
    out: Path,
    folder: Path,
    scene: SceneOptions,
    scheduler: str,
    workers: int | None,
    progress: Progress | None,
) -> ComputeResult:
    """The result files in ``folder`` (accumulated map, per-neuron change, the scene's cells, the frames) and
    the metrics: computed for what ``out`` does not hold yet, or carried over when it is up to date."""
    from wdiff.compute import ComputeResult, bytes_to_read, compute
    from wdiff.results import create_accumulated, layout_accumulated

    run, previous = plan.run, plan.previous
    grids = cell_grids([(t.name, t.shape) for t in run.tensors], scene.max_points, scene.pool)
    if plan.update == "up to date":  # nothing new to read: keep the results, redo the scene
        assert previous is not None
        if plan.map_dtypes is not None:
            link_or_copy(out / ACCUMULATED, folder / ACCUMULATED)
        link_or_copy(out / NEURON_CHANGE, folder / NEURON_CHANGE)
        for name in (POOLED, FRAMES) if scene.frames else (POOLED,):  # the scene checks the pooling fits
            if (out / name).is_file():
                link_or_copy(out / name, folder / name)
        return ComputeResult(previous.tensors, 0, 0.0, 0)
    layout = None  # no map stored (map_dtype "none")
    if plan.map_dtypes is not None:
        layout = layout_accumulated(((t.name, t.shape) for t in run.tensors), plan.map_dtypes)
        create_accumulated(folder / ACCUMULATED, layout)
    total = bytes_to_read(run, previous)

    def advance(nbytes: int) -> None:
        if progress is not None:
            progress("compute", nbytes, total)

    _warm.import_scheduler(scheduler)  # while the kernels load (LLVM, without the GIL)
    _warm.wait()  # compute_seconds counts from the first read, not from loading the kernels
    result = compute(
        run,
        str(folder / ACCUMULATED),
        layout,
        chunk_elements=plan.chunk_elements,
        scheduler=scheduler,
        workers=workers,
        progress=advance,
        previous=previous,
        grids=grids,
        frame_grids=plan.frame_grids,
    )
    t_write = time.perf_counter()
    write_cells(folder / POOLED, grids, result.cells, scene.pool)
    write_neuron_change(folder / NEURON_CHANGE, result.neuron_change)
    if scene.frames:
        finish_frames(folder / FRAMES, result.frames, plan.frame_grids, scene.pool, plan.old_frames)
    # compute_seconds: from the first read to the last result written
    written = result.compute_seconds + time.perf_counter() - t_write
    return dataclasses.replace(result, compute_seconds=written)


def add_spectra(
    plan: Plan, result: ComputeResult, scheduler: str, workers: int | None, progress: Progress | None
) -> float:
    """The update spectrum (``wdiff.spectrum``) of every 2-D tensor whose entry has none, into its entry
    of ``result.tensors``; the seconds it took. An up-to-date run's entries keep the earlier ones (the
    same W(0) and W(T)); an extended run's are new entries, so W(0) and the new W(T) are read again."""
    from wdiff.spectrum import is_matrix, update_spectra

    t0 = time.perf_counter()
    wanted = [
        t
        for t in plan.run.tensors
        if is_matrix(t) and "update_spectrum" not in result.tensors.get(t.name, {})
    ]

    def advance(n: int) -> None:
        if progress is not None:
            progress("spectrum", n, len(wanted))

    if wanted:
        found = update_spectra(wanted, scheduler, workers, progress=advance)
        for name, entry in found.items():
            result.tensors[name]["update_spectrum"] = entry
    return time.perf_counter() - t0


def write_results(
    folder: Path,
    summary: dict[str, Any],
    keep: Callable[[Path], None] | None,
    *,
    charts: bool,
    pictures: Sequence[Views] = (),
) -> None:
    """``summary.json`` and the report into ``folder``, after what ``keep(folder)`` adds (``watch``).
    The ``pictures`` still rendering are finished (``Views.finish``) when the report reads them,
    after its charts."""
    if keep is not None:
        keep(folder)
    write_json(folder / SUMMARY, summary)
    from wdiff.report import write_report

    def drawn() -> None:
        for views in pictures:
            views.finish()

    # findings.json, metrics.csv, tensors.csv, report.html (see wdiff.report); its charts are
    # pictures too: none without render (`wdiff report OUT` draws them)
    write_report(folder, charts=charts, before_pictures=drawn)


def _title(run: Run) -> str:
    steps = [s for s in run.steps if s is not None]
    span = f"steps {steps[0]}-{steps[-1]}" if len(steps) >= 2 else f"{len(run.checkpoints)} checkpoints"
    return f"{Path(run.source).name}: accumulated |dW| over {len(run.checkpoints)} checkpoints, {span}"


def draw(
    folder: Path,
    run: Run,
    summary: dict,
    options: SceneOptions,
    progress: Progress | None,
    pictures: list[Views] | None = None,
) -> dict[str, Any]:
    """Results on disk -> point cloud PLY, pictures, mesh, film, HTML viewer (``wdiff.scene.outputs``).
    With ``pictures``, the pictures may still be rendering on return: their ``Views`` are appended there."""
    from wdiff.scene.outputs import write_outputs

    def step(what: str) -> None:
        if progress is not None:
            progress(what, 0, 1)

    names = list(summary["tensors"])
    from wdiff.scene import tensor_sizes

    return write_outputs(
        folder,
        names,
        _title(run),
        options,
        Path(run.source).name,
        list(run.steps),
        step,
        tensor_sizes(summary),
        pictures,
        shapes=stored_shapes(summary),
    )
