"""The ``wdiff`` command: a thin layer over :mod:`wdiff.api`.

Progress goes to stderr (rich), results to files, a one-line summary to stdout (``--json``: one JSON
object, ``wdiff.report.brief``). Exit codes: 0 success, 2 bad input or usage (one line on stderr naming
the file and the problem), 1 unexpected failure, 3 findings of a ``--fail-on`` kind (results written),
130 interrupted. Text from outside (file and tensor names, error messages) is printed through
``terminal.visible`` on a console that reads no markup: literally, one line, no terminal control.
"""

# No ``from __future__ import annotations``: typer reads the annotations at run time anyway, and
# evaluated ones keep each command's options the very alias objects of ``wdiff.cli_options``.
import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from wdiff import checks
from wdiff import cli_options as opt
from wdiff.errors import WdiffError
from wdiff.terminal import human_bytes, visible

app = typer.Typer(
    name="wdiff",
    help="See how a neural network changed during training: accumulated weight change of a "
    "checkpoint sequence, rendered in 3D.",
    no_args_is_help=True,
    # --install-completion / --show-completion: typer imports its completion code anyway, so they cost
    # `wdiff --help` nothing measurable (fastest of 30 interleaved runs: 0.099 s without, 0.098 s with)
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from wdiff import __version__

        typer.echo(f"wdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """wdiff: accumulated weight change of training checkpoints, in 3D."""


class _Silent:
    """The console of ``--quiet``: prints nothing, and spares the import of rich (about 0.1 s with
    its progress bar and tables) in runs whose output nobody reads."""

    is_terminal = False

    def print(self, *objects: object, **options: object) -> None:
        pass


def _console(quiet: bool):
    """stderr for people: lines are not cut where a log file or pipe has no width (rich would wrap
    at 80 columns), tables get room for full tensor names. Strings print literally: no markup (a
    tensor named ``[/red]`` would end rich with MarkupError), no ``:emoji:`` codes, no highlighting;
    the few styled words are ``rich.text.Text``."""
    if quiet:
        return _Silent()
    from rich.console import Console

    tty = sys.stderr.isatty()
    return Console(
        stderr=True, soft_wrap=True, width=None if tty else 200, markup=False, emoji=False, highlight=False
    )


def _warn(err, line: str) -> None:
    """``warning: LINE`` on ``err``, the line (names from outside) made visible."""
    if isinstance(err, _Silent):
        return
    from rich.text import Text

    err.print(Text.assemble(("warning:", "yellow"), " ", visible(line)))


def _api_options(
    max_points: int,
    no_render: bool,
    chunk_mb: float,
    scheduler: str,
    workers: int | None,
    full: bool,
    pool: str,
    color_scale: str,
    normalize: str,
    size: str,
    views: str,
    mesh: bool,
    frames: bool,
    html_points: int,
    spectrum: bool | None,
    map_dtype: str,
) -> dict:
    """``run``'s options (``watch`` has the same) as keyword arguments of ``api.run``, each checked
    before any work (an ``OptionError`` names the parameter; ``main`` shows its flag)."""
    from wdiff.scene.options import SceneOptions, parse_size, parse_views

    checks.number("max_points", max_points, *checks.POINTS)
    checks.number("html_points", html_points, 0, checks.POINTS[1])
    checks.number("chunk_mb", chunk_mb, *checks.CHUNK_MB, integer=False, above=True)
    checks.scheduler("scheduler", scheduler)
    if workers is not None:
        checks.number("workers", workers, *checks.WORKERS)
    checks.size("size", size)
    checks.run_parameters(map_dtype=map_dtype)
    scene = SceneOptions(
        max_points=max_points,
        pool=pool,  # type: ignore[arg-type]
        color_scale=color_scale,  # type: ignore[arg-type]
        normalize=normalize,  # type: ignore[arg-type]
        render=not no_render,
        size=parse_size(size),
        views=parse_views(views),
        mesh=mesh,
        frames=frames,
        html=html_points != 0,
        html_points=max(html_points, 1),
    )
    return {
        "scene": scene,
        "chunk_elements": max(1, int(chunk_mb * (1 << 20) / 4)),
        "scheduler": scheduler,
        "workers": workers,
        "incremental": not full,
        "spectrum": spectrum,
        "map_dtype": map_dtype,
    }


@app.command("run")
def run_command(
    inputs: opt.Inputs,
    out: opt.Out,
    max_points: opt.MaxPoints = 1_000_000,
    no_render: opt.NoRender = False,
    chunk_mb: opt.ChunkMb = 16.0,
    scheduler: opt.Scheduler = "threads",
    workers: opt.Workers = None,
    full: opt.Full = False,
    quiet: opt.Quiet = False,
    pool: opt.Pool = "max",
    color_scale: opt.ColorScale = "log",
    normalize: opt.Normalize = "global",
    size: opt.Size = "1280x800",
    views: opt.Views = "oblique",
    mesh: opt.Mesh = False,
    frames: opt.Frames = False,
    html_points: opt.HtmlPoints = 200_000,
    spectrum: opt.Spectrum = None,
    map_dtype: opt.MapDtype = "auto",
    revisions: opt.Revisions = None,
    commit_every: opt.CommitEvery = None,
    json_output: opt.Json = False,
    fail_on: opt.FailOn = None,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    steps: opt.Steps = None,
    every: opt.Every = 1,
    tensorboard: opt.TensorBoard = None,
    wandb: opt.Wandb = None,
) -> None:
    """Compute the accumulated change of a checkpoint sequence; write results, PLY and a render."""
    from wdiff import _warm

    kinds = _fail_kinds(fail_on)

    # kernels (and matplotlib, for pictures) load on side threads while we import and scan
    _warm.start(plotting=not no_render or frames)
    from wdiff import api
    from wdiff.sequence import Run

    err = _console(quiet)
    options = _api_options(
        max_points, no_render, chunk_mb, scheduler, workers, full,
        pool, color_scale, normalize, size, views, mesh, frames, html_points, spectrum, map_dtype,
    )  # fmt: skip
    select = _selection(include, exclude, steps, every)

    def on_scan(scanned: Run) -> None:
        for s in scanned.warnings + scanned.left_out + scanned.skipped:
            _warn(err, f"{s.name}: {s.reason}")
        if scanned.selection is not None:
            err.print(visible(_selected_line(scanned)))
        steps = scanned.steps
        err.print(
            f"{len(scanned.checkpoints)} checkpoints (steps {steps[0]} .. {steps[-1]}), "
            f"{len(scanned.tensors)} tensors, {human_bytes(scanned.bytes_per_pass)} to read"
        )
        if scanned.matching is not None:
            m = scanned.matching
            line = f"ONNX initializers matched: {m['exact']} by name, {m['by_position']} by position"
            if m.get("by_sharing"):
                line += f", {m['by_sharing']} stored once in some export"
            err.print(line)

    # a bar in a log is noise (and a stray blank line): only on a terminal
    progress = _progress_bar(err) if err.is_terminal else None
    tasks: dict[str, int] = {}

    def on_progress(phase: str, advance: int, total: int) -> None:
        assert progress is not None
        if phase == "checkpoints":  # a commit: how many checkpoints the results hold now
            if "compute" in tasks:
                committed = f"compute ({advance}/{total} checkpoints committed)"
                progress.update(tasks["compute"], description=committed)
            return
        if phase not in tasks:
            tasks[phase] = progress.add_task(visible(phase), total=total)
        progress.update(tasks[phase], advance=advance)

    if commit_every is not None:
        checks.number("commit_every", commit_every, 0, 1 << 30)
    exports = _exports(tensorboard, wandb)
    with progress or contextlib.nullcontext():
        res = api.run(
            inputs, out, progress=_exporting(on_progress if progress else None, exports, out, err),
            on_scan=on_scan, revisions=revisions, commit_every=commit_every, select=select, **options,
        )  # fmt: skip
    if res.summary["update"] != "full":
        err.print(visible(f"{res.summary['update']} (earlier results in {out} extended)"))
    if options["map_dtype"] == checks.MAP_AUTO and res.summary.get("map_dtype") == checks.NO_MAP:
        err.print(_unstored_map_line(res.summary))
    timing = res.summary["timing"]
    rate = timing["read_bytes"] / max(timing["compute_seconds"], 1e-9)
    if not json_output:
        typer.echo(
            visible(
                f"{out}: {len(res.summary['tensors'])} tensors over {len(res.summary['checkpoints'])} "
                f"checkpoints, {human_bytes(timing['read_bytes'])} read at {human_bytes(rate)}/s, "
                f"{res.summary['scene']['points']} points"
            )
        )
    _print_findings(err, out)
    if exports is not None:
        with exports:
            for line in exports.update(out):
                err.print(visible(line))
    _finish("run", out, json_output, kinds)


def _unstored_map_line(summary: dict) -> str:
    """What the default left out (``wdiff.update.chosen_map_dtype``), and the flag that keeps it."""
    from wdiff.schema import float32_map_bytes
    from wdiff.update import MAP_AUTO_BYTES

    size, limit = human_bytes(float32_map_bytes(summary)), f"{MAP_AUTO_BYTES / 2**30:g} GiB"
    return (
        f"accumulated map not stored: {size} in float32, over the {limit} a run stores by default "
        "(--map-dtype float32 stores it)"
    )


# exit code of a run whose results hold findings of a --fail-on kind: not 1 (a bug), 2 (bad input or
# usage) nor 130 (Ctrl-C), so that a CI job can tell "the training run has a problem" from the others
FAIL_CODE = 3


def _fail_kinds(fail_on: str | None) -> tuple[str, ...] | None:
    """The kinds of ``--fail-on``, checked before any work (an unknown kind: one line, exit code 2)."""
    if fail_on is None:
        return None
    from wdiff.findings import fail_kinds

    return fail_kinds("fail_on", fail_on)


def _finish(command: str, out: Path, json_output: bool, kinds: tuple[str, ...] | None) -> None:
    """The end of ``run`` and ``report``, once every result is written: the JSON summary on stdout
    (``--json``), then exit code 3 with one line on stderr when findings of a ``--fail-on`` kind exist."""
    if not json_output and kinds is None:
        return
    from wdiff.findings import of_kinds
    from wdiff.report.build import load, read_findings

    found = read_findings(out)
    failing = of_kinds(found, kinds) if kinds is not None else []
    code = FAIL_CODE if failing else 0
    if json_output:
        from wdiff.report.brief import run_brief
        from wdiff.results import json_text

        brief = run_brief(command, load(out), found, kinds, failing, code)
        typer.echo(json_text(brief), nl=False)
    if failing:
        from wdiff.report.brief import count_kinds

        counts = ", ".join(f"{k}: {n}" for k, n in count_kinds(failing).items())
        _say(visible(f"wdiff: {len(failing)} findings of a --fail-on kind ({counts}); results in {out}"))
        raise typer.Exit(code)


def _exports(tensorboard: Path | None, wandb: str | None):
    """The ``wdiff.export.Exports`` of ``--tensorboard`` and ``--wandb`` (checked now, before any
    work), or None without them."""
    if tensorboard is None and wandb is None:
        return None
    from wdiff.export import Exports

    return Exports(tensorboard, wandb)


def _exporting(progress, exports, out: Path, err):
    """``progress`` that also exports after each commit but the last (``--commit-every``, remote
    inputs), so TensorBoard and W&B follow a long run; the last is exported after the findings."""
    if exports is None:
        return progress

    def report(phase: str, advance: int, total: int) -> None:
        if progress is not None:
            progress(phase, advance, total)
        if phase == "checkpoints" and advance < total:
            for line in exports.update(out):
                err.print(visible(line))

    return report


def _progress_bar(err):
    """The transient progress bar of ``wdiff run`` on the terminal ``err``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _print_findings(err, out: Path) -> None:
    """The findings of ``out`` as a short table on stderr (none: one line); tensor names and the
    folder made visible (the console reads no markup)."""
    if isinstance(err, _Silent):
        return
    from dataclasses import replace

    from wdiff.advice import what_to_change
    from wdiff.report import FINDINGS, REPORT
    from wdiff.report.build import load, read_findings
    from wdiff.report.table import findings_table

    found = [replace(f, tensor=visible(f.tensor)) for f in read_findings(out)]
    if found:
        err.print(findings_table(found, visible(out / FINDINGS)))
    else:
        err.print("no findings")
    summary = load(out).summary  # the update spectra, for the rank hint
    for line in what_to_change(found, REPORT, summary):
        err.print(visible(line), soft_wrap=True)
    err.print(visible(f"report: {out / REPORT}"))


@app.command("report")
def report_command(
    out: opt.ResultsFolder,
    quiet: opt.Quiet = False,
    json_output: opt.Json = False,
    fail_on: opt.FailOn = None,
) -> None:
    """Rebuild findings.json, metrics.csv, tensors.csv and report.html from results, without recomputing."""

    from wdiff.report import write_report

    kinds = _fail_kinds(fail_on)
    report = write_report(out)
    _print_findings(_console(quiet), out)
    if not json_output:
        typer.echo(visible(f"{report.path}: {len(report.findings)} findings"))
    _finish("report", out, json_output, kinds)


@app.command("compare")
def compare_command(
    run_a: Annotated[Path, typer.Argument(help="Results folder of run A (the reference).")],
    run_b: Annotated[Path, typer.Argument(help="Results folder of run B (ratios are B / A).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for the comparison.")],
    no_render: Annotated[bool, typer.Option("--no-render", help="Skip the side-by-side render.")] = False,
    json_output: opt.Json = False,
) -> None:
    """Compare two runs of the same architecture: per-tensor ratios, side-by-side render, report."""
    from wdiff.report import compare

    result = compare(run_a, run_b, out, render=not no_render)
    if json_output:
        from wdiff.report.brief import compare_brief
        from wdiff.results import json_text

        typer.echo(json_text(compare_brief(result, run_a, run_b)), nl=False)
        return
    ratios = [b["path_l1_ratio"] for b in result.blocks if b["path_l1_ratio"] is not None]
    span = f"B/A per block {min(ratios):.3g} .. {max(ratios):.3g}" if ratios else "no ratios"
    typer.echo(visible(f"{result.path}: {len(result.tensors)} tensors compared, {span}"))


@app.command("watch")
def watch_command(
    folder: opt.Folder,
    out: opt.Out,
    max_points: opt.MaxPoints = 1_000_000,
    no_render: opt.NoRender = False,
    chunk_mb: opt.ChunkMb = 16.0,
    scheduler: opt.Scheduler = "threads",
    workers: opt.Workers = None,
    full: opt.Full = False,
    quiet: opt.Quiet = False,
    pool: opt.Pool = "max",
    color_scale: opt.ColorScale = "log",
    normalize: opt.Normalize = "global",
    size: opt.Size = "1280x800",
    views: opt.Views = "oblique",
    mesh: opt.Mesh = False,
    frames: opt.Frames = False,
    html_points: opt.HtmlPoints = 200_000,
    spectrum: opt.Spectrum = None,
    map_dtype: opt.MapDtype = "auto",
    poll: opt.Poll = 10.0,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    steps: opt.Steps = None,
    every: opt.Every = 1,
    until_file: opt.UntilFile = None,
    parent_pid: opt.ParentPid = None,
    tensorboard: opt.TensorBoard = None,
    wandb: opt.Wandb = None,
) -> None:
    """Follow a training run: add each new checkpoint to OUT once it is complete (Ctrl-C stops)."""

    from wdiff.readers.remote import is_folded_url
    from wdiff.results import Results
    from wdiff.watcher import check_map_dtype, process_ended, watch

    checks.number("poll", poll, *checks.POLL, integer=False)  # 0 or less spins, NaN never wakes
    ended = process_ended(parent_pid) if parent_pid is not None else None
    reason: list[str] = []

    def until() -> bool:
        if until_file is not None and until_file.exists():
            reason.append(f"{until_file} appeared")
        elif ended is not None and ended():
            reason.append(f"process {parent_pid} ended")
        return bool(reason)

    if is_folded_url(folder):
        raise WdiffError(
            folder, "watch follows a local folder; `wdiff run URL -o OUT` again extends earlier results"
        )
    err = _console(quiet)
    options = _api_options(
        max_points, no_render, chunk_mb, scheduler, workers, full,
        pool, color_scale, normalize, size, views, mesh, frames, html_points, spectrum, map_dtype,
    )  # fmt: skip

    check_map_dtype(map_dtype)
    exports = _exports(tensorboard, wandb)

    def on_update(res: Results) -> None:
        steps = [c["step"] for c in res.summary["checkpoints"]]
        err.print(visible(f"step {steps[-1]}: {len(steps)} checkpoints, {res.summary['update']}"))
        for line in exports.update(out) if exports is not None else []:
            err.print(visible(line))

    def warn(line: str) -> None:
        _warn(err, line)

    select = _selection(include, exclude, steps, every)
    ends = [f"when {until_file} appears"] * (until_file is not None)
    ends += [f"when process {parent_pid} ends"] * (parent_pid is not None)
    err.print(visible(f"watching {folder} every {poll:g} s; {' or '.join([*ends, 'Ctrl-C'])} stops"))
    try:
        stopping = until if until_file is not None or ended is not None else None
        watch(
            folder, out, poll=poll, until=stopping, on_update=on_update, warn=warn, select=select, **options
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends; an interrupted update was dropped, OUT holds the last one
    finally:
        if exports is not None:
            exports.close()  # the W&B run ends with the watch
    if reason:
        err.print(visible(f"{reason[0]}: every complete checkpoint added"))
    if (out / "summary.json").is_file():
        steps = [c["step"] for c in Results.load(out).summary["checkpoints"]]
        covered = f"{len(steps)} checkpoints, steps {steps[0]} .. {steps[-1]}"
        typer.echo(visible(f"{out}: watch stopped; results cover {covered}"))
    else:
        typer.echo(visible(f"{out}: watch stopped before two checkpoints were complete; no results"))


def _selection(include: list[str] | None, exclude: list[str] | None, steps: str | None, every: int):
    """The ``wdiff.select.Selection`` of the selection options; None when they select everything."""
    from wdiff.select import Selection

    chosen = Selection(tuple(include or ()), tuple(exclude or ()), steps, every)
    return None if chosen.everything else chosen


def _selected_line(run) -> str:
    """``selected N of M checkpoints, K of L tensors (include ..., every 2)``."""
    found = run.selected_from
    checkpoints = f"{len(run.checkpoints)} of {found.get('checkpoints', len(run.checkpoints))} checkpoints"
    tensors = f"{len(run.tensors)} of {found.get('tensors', len(run.tensors))} tensors"
    return f"selected {checkpoints}, {tensors} ({run.selection.describe()})"


@app.command("scan")
def scan_command(
    inputs: opt.Inputs,
    revisions: opt.Revisions = None,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    steps: opt.Steps = None,
    every: opt.Every = 1,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor (default: grouped by name, layers as *).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON document (keys in docs/cli.md) instead.")
    ] = False,
) -> None:
    """List what `wdiff run` would read, without computing: checkpoints, tensors, bytes, selection."""
    from wdiff.checkpoints import scan
    from wdiff.select import scan_document

    run = scan(inputs, revisions, _selection(include, exclude, steps, every))
    if as_json:
        import json

        typer.echo(json.dumps(scan_document(run), indent=1))
        return
    for line in _scan_lines(run, scan_document(run), tensors):
        typer.echo(visible(line))


def _scan_lines(run, doc: dict, every_tensor: bool) -> list[str]:
    """``wdiff scan``'s listing: what is read, then what is not and why."""
    from wdiff.select import groups

    found = doc["selection"].get("of", {})
    head = f"{doc['source']}: {len(doc['checkpoints'])} checkpoints, {len(doc['tensors'])} tensors"
    lines = [f"{head}, {human_bytes(doc['bytes_per_pass'])} per pass"]
    lines.append(f"selection: {run.selection.describe() if run.selection else 'everything'}")
    if run.selection is not None and found:
        lines[-1] += (
            f" (kept {len(doc['checkpoints'])} of {found['checkpoints']} checkpoints, "
            f"{len(doc['tensors'])} of {found['tensors']} tensors)"
        )
    lines.append("checkpoints (step, bytes, path):")
    shown = ["-" if c["step"] is None else str(c["step"]) for c in doc["checkpoints"]]  # -: no step known
    width = max(len(s) for s in shown)
    for c, step in zip(doc["checkpoints"], shown):
        lines.append(f"  {step:>{width}}  {human_bytes(c['bytes']):>9}  {c['path']}")
    if every_tensor:
        lines.append("tensors (name, shape, dtype, bytes per pass):")
        rows = [(t["name"], str(t["shape"]), "/".join(t["dtype"]), t["bytes"]) for t in doc["tensors"]]
    else:
        lines.append("tensors, grouped (pattern, count, shape, dtype, bytes per pass; --tensors lists each):")
        rows = [
            (g["pattern"], f"x{g['count']}  " + " ".join(str(s) for s in g["shapes"][:3])
             + (" ..." if len(g["shapes"]) > 3 else ""), "/".join(g["dtypes"]), g["bytes"])
            for g in groups(run)
        ]  # fmt: skip
    name_width = min(max(len(r[0]) for r in rows), 80)
    shape_width = min(max(len(r[1]) for r in rows), 40)
    for name, shape, dtype, nbytes in rows:
        lines.append(f"  {name:<{name_width}}  {shape:<{shape_width}}  {dtype:<5}  {human_bytes(nbytes):>9}")
    for t in doc["tensors"]:
        if "aliases" in t:
            lines.append(f"  {t['name']} is also named {', '.join(t['aliases'])} (tied)")
    for title, key, entries in (
        ("skipped tensors", "name", doc["skipped"]),
        ("left out", "path", doc["left_out"]),
        ("warnings", "path", doc["warnings"]),
    ):
        if entries:
            lines.append(f"{title} ({len(entries)}):")
            lines += [f"  {e[key]}: {e['reason']}" for e in entries]
    return lines


@app.command("tensorboard")
def tensorboard_command(
    out: opt.ResultsFolder,
    logdir: opt.LogDir,
) -> None:
    """Export results to TensorBoard event files in LOGDIR, without recomputing.

    Per-block and per-tensor scalars at each checkpoint's training step, the frames and renders as
    images, the findings as text. Again on a grown run: only its new checkpoints are written.
    """
    from wdiff.export import describe
    from wdiff.export.tensorboard import export

    typer.echo(visible(describe(export(out, logdir))))


@app.command("wandb")
def wandb_command(
    out: opt.ResultsFolder,
    project: opt.Project = None,
    entity: Annotated[str | None, typer.Option("--entity", help="W&B entity (team or user).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="W&B run name.")] = None,
) -> None:
    """Log results to a new Weights & Biases run, without recomputing.

    The series of `wdiff tensorboard` at each training step, the renders, the film, the tensors and
    findings tables. WANDB_MODE=offline and WANDB_DIR work as for any W&B run.
    """
    from wdiff.export import describe
    from wdiff.export.wandb import export, flush

    try:
        done = export(out, project=project, entity=entity, name=name)
    finally:
        flush()  # the process ends with os._exit: W&B's own teardown at exit would not run
    typer.echo(visible(describe(done)))


@app.command("view")
def view_command(
    out: opt.ResultsFolder,
) -> None:
    """Open the 3D scene of OUT in a window (orbit, zoom, Ctrl+click a point for its weights).

    Without a display: one line on stderr pointing to render.png and scene.html, exit code 2.
    """
    from wdiff.scene.viewer import view

    view(out)


def _exit_now(code: object) -> None:
    """Exit without the interpreter's teardown.

    Every result file is closed and renamed into place by now; tearing down numba, LLVM and dask's
    thread pools still costs about 0.25 s here, a tenth of a whole run on a 6 GB sequence. (An
    interrupted run's Dask threads may still be reading: they are not waited for either.)
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (``wdiff run ... | head -c0``): nothing more can be said
        code = code or 1
    os._exit(code if isinstance(code, int) else 1)


def _say(line: str) -> None:
    """One line on stderr (a closed stderr cannot be told anything)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def _flag(parameter: str) -> str:
    """The flag of the option whose Python name is ``parameter`` (``--max-points`` for
    ``max_points``), in whichever command has it; the name itself for a library-only parameter."""
    group = typer.main.get_command(app)
    for command in (group, *getattr(group, "commands", {}).values()):
        for param in command.params:
            if param.name == parameter and param.param_type_name == "option":
                return max(param.opts, key=len)
    return parameter


# click's UsageError as typer raises it: typer carries its own copy of click (``typer._click``), whose
# exceptions are not the ``click`` package's; of its usage errors typer exports BadParameter.
_UsageError = typer.BadParameter.__mro__[1]


def _ending() -> int:
    """Run the command line; say in one line why it ended, unless it succeeded. The exit code."""
    try:
        if sys.argv[1:2] in (["run"], ["watch"]) and "--help" not in sys.argv:
            from wdiff import _warm

            # The kernels load on a side thread (0.7 s, the longest part of a run's start) while typer
            # parses the options (0.15 s with the pydantic it imports) and the run imports and scans:
            # started here, before parsing, that thread ends when the main thread is ready for it.
            _warm.tune_process()
            _warm.start()
        # `wdiff` alone: the help, and the exit code of a usage error; not when the shell asks for
        # completions (it runs `_WDIFF_COMPLETE=complete_bash wdiff`, the words in COMP_WORDS)
        if not sys.argv[1:] and not os.environ.get("_WDIFF_COMPLETE"):
            app(["--help"], prog_name="wdiff", standalone_mode=False)
            return 2
        code = app(prog_name="wdiff", standalone_mode=False)  # --help, --version: Exit, returned as 0
        if code == 130:  # how typer ends on KeyboardInterrupt in a command: Exit(130), silently
            raise KeyboardInterrupt
        return code if isinstance(code, int) else 0
    except _UsageError as e:  # missing or unknown option, a value of the wrong type, unknown command
        where = e.ctx.command_path if e.ctx is not None else "wdiff"
        _say(f"wdiff: error: {visible(' '.join(e.format_message().split()))} (see '{where} --help')")
        return 2
    except checks.OptionError as e:  # a parameter out of range: said with its flag
        _say(f"wdiff: error: {_flag(e.parameter)} {visible(e.detail)}")
        return 2
    except WdiffError as e:
        _say(f"wdiff: error: {visible(e)}")
        return 2
    except (KeyboardInterrupt, typer.Abort):
        _say("wdiff: interrupted")
        return 130
    except SystemExit as e:  # sys.exit(...) somewhere below: its code, or its message and 1
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        _say(visible(e.code))
        return 1
    except Exception as e:
        if os.environ.get("WDIFF_DEBUG"):
            raise
        why = f"{type(e).__name__}: {visible(e)}"
        _say(f"wdiff: unexpected failure: {why} (set WDIFF_DEBUG=1 for a traceback)")
        return 1


def main() -> None:
    """Console entry point with the one error boundary.

    Typer parses the options in non-standalone mode so that every ending is decided in ``_ending``:
    usage errors (missing or unknown option, a value of the wrong type, an unknown command) become one
    line and exit code 2 (typer would draw a four-line box), wdiff's own errors one line and exit
    code 2, Ctrl-C ``wdiff: interrupted`` and exit code 130 (typer would exit 130 silently), anything
    else is a bug: one line and exit code 1. ``--help``, ``--version`` and ``wdiff`` alone print what
    they print.
    """
    _exit_now(_ending())
