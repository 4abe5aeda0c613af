"""A results folder as TensorBoard event files: ``wdiff tensorboard OUT LOGDIR``, ``--tensorboard``.

    from wdiff.export.tensorboard import export
    export("out/", "runs/wdiff")          # then: tensorboard --logdir runs/

Writes what ``wdiff.export.series`` holds: the scalars at each checkpoint's training step, each
interval's frame of ``frames.gif`` at the step that ends it, the renders and the texts (the run, the
findings, what to change) at the last step, and once a Custom Scalars layout that draws the tensors of
one block in one chart.

The events are TensorBoard's own protos (``tensorboard.compat.proto``) framed by its own
``RecordWriter``, in the legacy form TensorBoard and torch's ``SummaryWriter`` write without
TensorFlow: scalars as ``simple_value``, pictures as ``Summary.Image``, texts as string tensors of the
text plugin (``tensorboard.summary.v1`` would import TensorFlow).

Appending, never repeating. A grown run (the same checkpoints and more) is exported again by writing
only its new checkpoints: each export is one event file named ``events.out.tfevents.<time>.<host>.
wdiff-<N>``, N the number of checkpoints the folder holds after it, written under a name TensorBoard
does not read and renamed into place whole; the highest N in LOGDIR is where the next export starts.
``wdiff-export.json`` says which run LOGDIR holds (each exported checkpoint's step and fingerprint):
the results of another run are refused rather than mixed in. Unchanged results write nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wdiff._files import atomic_write
from wdiff.errors import WdiffError
from wdiff.export.series import FRAMES_TAG, METRICS, RunSeries

STATE = "wdiff-export.json"
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.\d+\..*\.wdiff-(\d+)")


def require() -> None:
    """A one-line ``WdiffError`` when the tensorboard package is missing (checked before a run starts)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise WdiffError(
            None, "exporting to TensorBoard needs the tensorboard package: pip install 'wdiff[tensorboard]'"
        )


@dataclass(frozen=True)
class Exported:
    """What one export wrote: the event file (None when the results held nothing new) and its steps."""

    logdir: Path
    path: Path | None
    steps: list[int]  # training steps of the checkpoints written (the x of their points)
    scalars: int  # scalar points
    images: int
    texts: int
    checkpoints: int  # checkpoints LOGDIR holds now


def check_logdir(logdir: str | os.PathLike[str]) -> Path:
    """``logdir`` when it is a folder or can be one (checked before a run starts, without importing
    tensorboard); a one-line ``WdiffError`` otherwise."""
    path = Path(logdir)
    for parent in (path, *path.parents):
        if parent.is_dir():
            break
        if os.path.lexists(parent):
            what = (
                "is a file, not a folder" if parent == path else f"cannot be made: {parent} is not a folder"
            )
            raise WdiffError(path, f"TensorBoard log folder {what}")
    return path


def exported_count(logdir: Path) -> int:
    """How many checkpoints the wdiff event files in ``logdir`` hold (0: none)."""
    try:
        names = os.listdir(logdir)
    except FileNotFoundError:
        return 0
    counts = [int(m.group(1)) for m in map(_EVENT_FILE.fullmatch, names) if m]
    return max(counts, default=0)


def _read_state(logdir: Path) -> list[dict[str, Any]] | None:
    path = logdir / STATE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise WdiffError(path, f"cannot read: {e}") from None
    run = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(run, list) or not all(isinstance(c, dict) for c in run):
        raise WdiffError(path, "not an export state as wdiff writes it (no checkpoints list)")
    return run


def _check_same_run(logdir: Path, before: list[dict[str, Any]], now: list[dict[str, Any]]) -> None:
    """The checkpoints exported before are the first ones of these results (a grown run), else refuse."""
    for i, (a, b) in enumerate(zip(before, now)):
        same_print = a.get("fingerprint") is None or b.get("fingerprint") is None or a == b
        if a.get("step") != b.get("step") or not same_print:
            raise WdiffError(
                logdir,
                f"holds the TensorBoard export of another run (its checkpoint {i + 1} was step "
                f"{a.get('step')}, these results' is step {b.get('step')}"
                f"{'' if a.get('step') != b.get('step') else ' with other weight files'}); "
                "export into another folder, or empty this one",
            )


@contextlib.contextmanager
def _locked(logdir: Path) -> Iterator[None]:
    """One exporter at a time per LOGDIR (two would both write the same new steps)."""
    fd = os.open(logdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def export(out: str | os.PathLike[str], logdir: str | os.PathLike[str]) -> Exported:
    """Write what the results in ``out`` hold and ``logdir`` does not yet into ``logdir``."""
    require()
    logdir = check_logdir(logdir)
    series = RunSeries.load(out)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WdiffError(logdir, f"cannot make the TensorBoard log folder: {e.strerror or e}") from None
    with _locked(logdir):
        done = exported_count(logdir)
        before = _read_state(logdir)
        now = series.identity()
        if done and before is not None:
            _check_same_run(logdir, before[:done], now)
        if done > len(now):
            raise WdiffError(
                logdir,
                f"holds an export of {done} checkpoints, these results have {len(now)}: "
                "export into another folder, or empty this one",
            )
        if done >= len(now):
            return Exported(logdir, None, [], 0, 0, 0, done)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.wdiff-{len(now):08d}"
        counts = _write(logdir / name, series, done)
        state = {"format": "wdiff-tensorboard-export", "checkpoints": now}
        # after the events: a state that lags behind them (a kill in between) is checked as far as it goes
        with atomic_write(logdir / STATE) as f:
            f.write(json.dumps(state, indent=1).encode() + b"\n")
    return Exported(logdir, logdir / name, series.steps[done:], *counts, len(now))


def _write(path: Path, series: RunSeries, first: int) -> tuple[int, int, int]:
    """The events of checkpoints ``first`` .. last into ``path``, whole or not at all: written under a
    name without ``tfevents`` (which TensorBoard would read while it grows), then renamed."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    with atomic_write(path, stem="wdiff-export") as f:
        return _events(RecordWriter(f), series, first)


def _events(writer: Any, series: RunSeries, first: int) -> tuple[int, int, int]:
    import imageio.v3 as iio
    from tensorboard.compat.proto import event_pb2, summary_pb2

    wall = time.time()

    def emit(step: int, values: list[Any]) -> None:
        event = event_pb2.Event(wall_time=wall, step=step)
        event.summary.value.extend(values)
        writer.write(event.SerializeToString())

    def image(tag: str, png: bytes, height: int, width: int) -> Any:
        picture = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=png
        )
        return summary_pb2.Summary.Value(tag=tag, image=picture)

    writer.write(event_pb2.Event(wall_time=wall, file_version="brain.Event:2").SerializeToString())
    if first == 0:
        emit(series.steps[0], [_layout(series)])
    described: set[str] = set()
    frames = series.frames(first)  # decoded one at a time: a long film does not fit in memory
    frame = next(frames, None)
    scalars = images = texts = 0
    last = len(series.steps) - 1
    for i, step, values in series.points(first):
        batch = []
        for tag, value in values.items():
            v = summary_pb2.Summary.Value(tag=tag, simple_value=value)
            if tag not in described:  # TensorBoard keeps the first description of a tag
                v.metadata.plugin_data.plugin_name = "scalars"
                v.metadata.summary_description = series.descriptions[tag]
                described.add(tag)
            batch.append(v)
        scalars += len(batch)
        if frame is not None and frame[0] == i:
            picture = frame[1]
            frame = next(frames, None)
            png = iio.imwrite("<bytes>", picture, extension=".png")
            batch.append(image(FRAMES_TAG, png, *picture.shape[:2]))
            images += 1
        if i == last:
            for tag, file in series.pictures:
                png = file.read_bytes()
                height, width = iio.improps(png, extension=".png").shape[:2]
                batch.append(image(tag, png, height, width))
                images += 1
            for tag, markdown in series.texts.items():
                batch.append(_text(tag, markdown))
                texts += 1
        emit(step, batch)
    return scalars, images, texts


def _text(tag: str, markdown: str) -> Any:
    """A text-plugin value, as ``tensorboard.plugins.text.summary.pb`` makes it (without TensorFlow)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.text import metadata
    from tensorboard.util import tensor_util

    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=metadata.create_summary_metadata(display_name=tag, description=""),
        tensor=tensor_util.make_tensor_proto(markdown.encode("utf-8")),
    )


def _layout(series: RunSeries) -> Any:
    """The Custom Scalars layout: per block, one chart per tensor quantity with the block's tensors in
    it, and one chart per block quantity with every block in it (TensorBoard's time series shows one
    chart per tag; 200 tensors are 200 charts a quantity)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    from wdiff.naming import block_of

    def chart(title: str, pattern: str) -> Any:
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[pattern]))

    overview = layout_pb2.Category(title="wdiff: blocks")
    for metric in METRICS:
        if metric.level == "block":
            overview.chart.append(chart(f"block {metric.name}", f"^{re.escape(metric.tag(''))}"))
    categories = [overview]
    blocks = list(dict.fromkeys(block_of(name) for name in series.summary["tensors"]))
    for block in blocks:
        category = layout_pb2.Category(title=f"wdiff: {block}", closed=True)
        for metric in METRICS:
            if metric.level == "tensor":
                pattern = f"^{re.escape(metric.tag(block))}(\\.|$)"
                category.chart.append(chart(f"{block} {metric.name}", pattern))
        categories.append(category)
    layout = layout_pb2.Layout(category=categories)
    return summary_pb2.Summary.Value(
        tag=metadata.CONFIG_SUMMARY_TAG,
        metadata=metadata.create_summary_metadata(),
        tensor=tensor_util.make_tensor_proto(layout.SerializeToString()),
    )


__all__ = ["STATE", "Exported", "check_logdir", "export", "exported_count"]
