"""The options of the ``wdiff`` commands, each defined once (as the HF ``hf`` CLI does).

A command names its options with these aliases (``max_points: MaxPoints = 1_000_000``): ``wdiff run``
and ``wdiff watch`` take the same picture and compute options, and ``wdiff report`` shares ``-q`` and
the results folder with them. A new option of ``run`` is added here and to ``watch``'s signature;
``tests/test_watch.py`` checks that the two stay alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "ChunkMb",
    "ColorScale",
    "Folder",
    "Frames",
    "Full",
    "HtmlPoints",
    "FailOn",
    "Inputs",
    "Json",
    "LogDir",
    "Project",
    "TensorBoard",
    "Wandb",
    "Revisions",
    "CommitEvery",
    "MaxPoints",
    "Mesh",
    "NoRender",
    "Normalize",
    "Spectrum",
    "MapDtype",
    "UntilFile",
    "Out",
    "ParentPid",
    "Poll",
    "Pool",
    "Quiet",
    "ResultsFolder",
    "Scheduler",
    "Size",
    "Views",
    "Workers",
    "Include",
    "Exclude",
    "Steps",
    "Every",
]

# --- what a command reads and writes ------------------------------------------------------------

Inputs = Annotated[
    list[str],  # not Path: a URL (s3://bucket/run) would lose a slash
    typer.Argument(
        help="An HF Trainer output dir (checkpoint-N/ folders), a folder of numbered "
        "checkpoints, or checkpoint files/folders in training order; local paths or URLs "
        "(s3://, gs://, https://, hf://ORG/NAME).",
        show_default=False,
    ),
]
Revisions = Annotated[
    str | None,
    typer.Option(
        "--revisions",
        help="With one hf://ORG/NAME input: the revisions that make the sequence, comma-separated; "
        "ranges step{0..143000..1000} and patterns step* (matched against the repo's branches).",
        show_default=False,
    ),
]
CommitEvery = Annotated[
    int | None,
    typer.Option(
        "--commit-every",
        help="Commit results every N new checkpoints, so a killed run goes on from there "
        "(default: 16 for remote inputs; 0: only at the end).",
        show_default=False,
    ),
]
Folder = Annotated[Path, typer.Argument(help="The training output folder to follow (checkpoint-N/ folders).")]
Out = Annotated[Path, typer.Option("-o", "--out", help="Output folder for the results.")]
ResultsFolder = Annotated[
    Path, typer.Argument(help="A wdiff results folder (the -o of `wdiff run`).", show_default=False)
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress, warnings or findings table on stderr.")
]

# --- for scripts and CI --------------------------------------------------------------------------

Json = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print a JSON summary on stdout instead of the lines for people (keys: docs/cli.md); "
        "stderr keeps progress and warnings.",
    ),
]
FailOn = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        help="Exit with code 3 when the results hold findings of these kinds (comma-separated, as in "
        "findings.json, or any); the results are written in full first.",
        show_default=False,
    ),
]

# --- the pictures (wdiff.scene.SceneOptions) ----------------------------------------------------

MaxPoints = Annotated[int, typer.Option("--max-points", help="Point budget of the whole 3D scene.")]
NoRender = Annotated[
    bool,
    typer.Option(
        "--no-render",
        help="No pictures: no render.png, no report charts (`wdiff report OUT` draws them).",
    ),
]
Pool = Annotated[str, typer.Option("--pool", help="What a pooled cell shows: max or mean.")]
ColorScale = Annotated[str, typer.Option("--color-scale", help="Colours: log or linear.")]
Normalize = Annotated[
    str,
    typer.Option(
        "--normalize",
        help="One colour scale (global), one per tensor (tensor), or each change over its tensor's "
        "RMS weight at the first checkpoint (relative).",
    ),
]
Size = Annotated[str, typer.Option("--size", help="Picture size WxH in pixels.")]
Views = Annotated[
    str,
    typer.Option(
        "--views",
        help="Comma-separated views: oblique, back, side, top, front; the first "
        "is render.png, the others render-<view>.png.",
    ),
]
Mesh = Annotated[bool, typer.Option("--mesh", help="Also write mesh.ply (height-field surfaces).")]
Frames = Annotated[
    bool, typer.Option("--frames", help="Also write frames.gif (+ frames.mp4): one frame per interval.")
]
HtmlPoints = Annotated[
    int, typer.Option("--html-points", help="Point budget of scene.html (0: no scene.html).")
]

# --- the compute ---------------------------------------------------------------------------------

ChunkMb = Annotated[
    float,
    typer.Option(
        "--chunk-mb",
        help="Work per Dask task, in MB of float32 output (memory per task stays a few hundred KB).",
    ),
]
Scheduler = Annotated[
    str,
    typer.Option(
        "--scheduler",
        help="Dask scheduler: threads, processes, sync, local:N (a LocalCluster of N worker "
        "processes) or the address of a dask.distributed scheduler (tcp://host:8786).",
    ),
]
Workers = Annotated[int | None, typer.Option("--workers", help="Threads (default: one per core).")]
MapDtype = Annotated[
    str,
    typer.Option(
        "--map-dtype",
        help="How accumulated.safetensors stores the map: float32, bfloat16 (half the bytes written, "
        "rounded to 0.4%; metrics and pictures still come from float32 sums), or none (no map: every other "
        "result the same, from the same pass; no per-weight values afterwards). bfloat16 and none are "
        "recomputed, not extended, when the run grows. auto: what was asked for OUT's map before (float32 or "
        "bfloat16), else float32 up to 2 GiB of map (536 million weights) and none above.",
    ),
]
Spectrum = Annotated[
    bool | None,
    typer.Option(
        "--spectrum/--no-spectrum",
        help="The singular values of each 2-D weight's update W(T) - W(0) (update_spectrum; reads the "
        "first and last checkpoint again). Default: on for local runs of at most 33.5 million matrix values.",
        show_default=False,
    ),
]
Full = Annotated[
    bool, typer.Option("--full", help="Recompute everything, even when OUT holds results to extend.")
]
Poll = Annotated[float, typer.Option("--poll", help="Seconds between two looks at the folder.")]

# --- what is read (wdiff.select.Selection) -------------------------------------------------------

Include = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        help="Read only tensors whose name (as in summary.json) matches this glob, e.g. "
        "'model.layers.*.self_attn.*'; repeatable (any may match).",
        show_default=False,
    ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Leave out tensors whose name matches this glob; repeatable.",
        show_default=False,
    ),
]
Steps = Annotated[
    str | None,
    typer.Option(
        "--steps",
        help="Only checkpoints of training steps A to B, inclusive: A:B, A: or :B.",
        show_default=False,
    ),
]
Every = Annotated[
    int,
    typer.Option(
        "--every",
        help="Every Nth of the selected checkpoints, starting from the first (the last is kept "
        "only when it falls on the stride).",
    ),
]

# --- how a watch ends besides Ctrl-C (what wdiff.integrations starts from a training script) --------

UntilFile = Annotated[
    Path | None,
    typer.Option(
        "--until-file",
        help="Stop once this file exists: finish the update under way, add every complete checkpoint, exit.",
        show_default=False,
    ),
]
ParentPid = Annotated[
    int | None,
    typer.Option(
        "--parent-pid",
        help="Stop once this process ends (the training script; killed too): add every complete "
        "checkpoint, exit.",
        show_default=False,
    ),
]

# --- exports (wdiff.export) ---------------------------------------------------------------------

LogDir = Annotated[
    Path,
    typer.Argument(
        help="The TensorBoard log folder to write into (made when missing); `tensorboard --logdir` "
        "its parent to see several runs side by side.",
        show_default=False,
    ),
]
TensorBoard = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        metavar="LOGDIR",
        help="Then export the results to this TensorBoard log folder, only what it does not hold yet "
        "(watch: after each update); see `wdiff tensorboard`.",
        show_default=False,
    ),
]
Wandb = Annotated[
    str | None,
    typer.Option(
        "--wandb",
        metavar="PROJECT",
        help="Then log the results to a new Weights & Biases run in this project (watch: one run, fed "
        "after each update); see `wdiff wandb`.",
        show_default=False,
    ),
]
Project = Annotated[
    str | None,
    typer.Option(
        "--project", help="W&B project (default: WANDB_PROJECT, else W&B's default).", show_default=False
    ),
]
