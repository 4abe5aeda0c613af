"""A results folder as a Weights & Biases run: ``wdiff wandb OUT``, ``--wandb PROJECT``.

    from wdiff.export.wandb import export
    export("out/", project="my-finetune")       # one new W&B run with the whole series

    with WandbRun(project="my-finetune") as run:  # one W&B run fed as the results grow
        run.update("out/")                         # (wdiff watch --wandb, a training callback)
        ...
        run.update("out/")                         # logs only the checkpoints added since

Logs what ``wdiff.export.series`` holds, as the TensorBoard export does: the scalars at each
checkpoint's training step (``wandb.log(..., step=step)``, and ``define_metric`` so that every wdiff
series is drawn against ``train/global_step``, the key the Hugging Face Trainer's W&B integration
uses), each interval's frame of ``frames.gif`` as a ``wandb.Image`` at the step that ends it, and at
the last step the renders (``wandb.Image``), the film (``wandb.Video`` of ``frames.gif``), the tensors
table (``tensors.csv``), the findings and what to change (``wandb.Table``).

Runs are append-only, and a run's steps only increase: a ``WandbRun`` remembers which checkpoints it
logged and logs only later ones (results that are not a grown version of what it logged are refused).
``export`` and the ``wdiff wandb`` command start a new run each time, holding the whole series; ``wdiff
watch --wandb`` keeps one run for the whole watch. Given an active run (``run=wandb.run``: the
training's own), the series go into it against ``train/global_step`` without touching its ``step``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wdiff.errors import WdiffError
from wdiff.export.series import FRAMES_TAG, METRICS, STEP_KEY, RunSeries

#: The wdiff keys of a run, for ``define_metric`` (a training's own keys keep their x axis).
KEY_GLOBS = ("model/*", "block.*", "tensor.*", "frames/*", "render/*", "wdiff/*")
FILM = "frames/film"
TENSORS_TABLE = "wdiff/tensors"
FINDINGS_TABLE = "wdiff/findings"
ADVICE_TABLE = "wdiff/what_to_change"


def require() -> None:
    """A one-line ``WdiffError`` when the wandb package is missing (checked before a run starts)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise WdiffError(None, "exporting to W&B needs the wandb package: pip install 'wdiff[wandb]'")


@dataclass(frozen=True)
class Logged:
    """What one update logged: the W&B run, and the training steps of the checkpoints it added."""

    run_id: str
    run_dir: Path  # the run's local folder (its ``files/`` hold the media): ``wandb sync`` an offline one
    steps: list[int]
    scalars: int
    images: int
    tables: int
    checkpoints: int  # checkpoints the run holds now


class WandbRun:
    """A W&B run that results are logged into as they grow (see the module's docstring).

    ``project``, ``entity``, ``name`` and any other keyword go to ``wandb.init`` (``WANDB_MODE=offline``
    and ``WANDB_DIR`` work as for any run); or pass ``run``, an active run to log into (never finished
    here). The run starts at the first ``update``.
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        entity: str | None = None,
        name: str | None = None,
        run: Any = None,
        **init: Any,
    ) -> None:
        require()
        self._init = {"project": project, "entity": entity, "name": name, **init}
        self._run = run
        self._own = run is None
        self._logged: list[dict[str, Any]] = []  # identity of each checkpoint logged (series.identity)

    @property
    def run(self) -> Any:
        return self._run

    def _start(self, series: RunSeries) -> Any:
        import wandb

        if self._run is None:
            config = {"wdiff": {"source": series.summary["source"], "out": str(series.out)}}
            try:
                self._run = wandb.init(config=config, reinit="create_new", **self._init)
            except wandb.errors.Error as e:  # not logged in, no network in online mode, bad entity
                raise WdiffError(None, f"W&B: {' '.join(str(e).split())}") from None
        self._run.define_metric(STEP_KEY)
        for glob in KEY_GLOBS:
            self._run.define_metric(glob, step_metric=STEP_KEY)
        return self._run

    def update(self, out: str | os.PathLike[str]) -> Logged:
        """Log the checkpoints of the results in ``out`` that this run does not hold yet."""
        series = RunSeries.load(out)
        now = series.identity()
        done = len(self._logged)
        if now[:done] != self._logged or done > len(now):
            raise WdiffError(
                out,
                f"not the run this W&B run holds ({done} checkpoints, steps "
                f"{self._logged[0].get('step')} .. {self._logged[-1].get('step')}): log it into a new run",
            )
        if done >= len(now):
            run = self._run
            return Logged(run.id, Path(run.dir).parent, [], 0, 0, 0, done)
        run = self._run if self._run is not None and self._logged else self._start(series)
        counts = _log(run, series, done, step=self._own)
        self._logged = now
        return Logged(run.id, Path(run.dir).parent, series.steps[done:], *counts, len(now))

    def finish(self) -> None:
        """End the run (only a run this object started); a later ``update`` starts a new one."""
        if self._own and self._run is not None:
            self._run.finish()
            self._run = None
            self._logged = []

    def __enter__(self) -> WandbRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def flush() -> None:
    """Wait until W&B's service process has written everything, and stop it (``wandb.teardown``).

    ``run.finish()`` returns before the run's transaction log is complete (offline, 1 export in 6 of
    the sample still had its last 32 KiB block unwritten when it returned), and W&B's own teardown runs
    at exit through ``atexit``, which the wdiff CLI skips (it ends with ``os._exit``). Only for a
    process that is done with W&B: it ends the service of every run in the process.
    """
    import sys

    if "wandb" in sys.modules:
        import wandb

        wandb.teardown()


def export(
    out: str | os.PathLike[str],
    project: str | None = None,
    *,
    entity: str | None = None,
    name: str | None = None,
    run: Any = None,
    **init: Any,
) -> Logged:
    """Log the results in ``out`` as one new W&B run (or into ``run``, an active one)."""
    with WandbRun(project, entity=entity, name=name, run=run, **init) as r:
        return r.update(out)


def _log(run: Any, series: RunSeries, first: int, *, step: bool) -> tuple[int, int, int]:
    """Log checkpoints ``first`` .. last of ``series`` into ``run``: by ``step`` (a run of our own) or
    against ``train/global_step`` only (someone's active run, whose steps are its own)."""
    import wandb

    frames = series.frames(first)  # one frame decoded at a time
    frame = next(frames, None)
    last = len(series.steps) - 1
    scalars = images = tables = 0
    for i, at, values in series.points(first):
        row: dict[str, Any] = {**values, STEP_KEY: at}
        scalars += len(values)
        if frame is not None and frame[0] == i:
            span = f"step {series.steps[i - 1]} -> {at}"
            row[FRAMES_TAG] = wandb.Image(frame[1], caption=f"|W(t+1) - W(t)|, {span}")
            frame = next(frames, None)
            images += 1
        if i == last:
            for tag, file in series.pictures:
                row[tag] = wandb.Image(str(file), caption=series.texts["wdiff/run"])
                images += 1
            if series.frames_gif is not None:
                row[FILM] = wandb.Video(str(series.frames_gif), format="gif")
                images += 1
            row[TENSORS_TABLE] = _tensors_table(series)
            row[FINDINGS_TABLE] = wandb.Table(
                columns=["#", "kind", "tensor", "steps", "rows", "message"],
                data=[
                    [n, f.kind, f.tensor, _listed(f.steps), _listed(f.rows), f.message]
                    for n, f in enumerate(series.findings, start=1)
                ],
            )
            row[ADVICE_TABLE] = wandb.Table(
                columns=["line"], data=[[line.strip()] for line in series.advice] or [["nothing to change"]]
            )
            tables += 3
        if step:
            run.log(row, step=at)
        else:
            run.log(row)
    return scalars, images, tables


def _listed(value: list | None) -> str:
    return (
        ""
        if not value
        else ", ".join("-".join(map(str, v)) if isinstance(v, list) else str(v) for v in value)
    )


def _tensors_table(series: RunSeries) -> Any:
    """``tensors.csv`` as a W&B table: the same columns, one row per tensor."""
    import wandb

    from wdiff.report.build import TENSOR_COLUMNS

    def cell(column: str, t: dict[str, Any]) -> Any:
        value = t.get(column)
        if column == "shape":
            return "x".join(map(str, value)) or "scalar"
        return value

    data = [[cell(c, t) for c in TENSOR_COLUMNS] for t in series.tensors]
    return wandb.Table(columns=list(TENSOR_COLUMNS), data=data)


__all__ = ["METRICS", "Logged", "WandbRun", "export", "flush"]
