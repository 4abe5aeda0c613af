"""One ``wdiff watch`` process beside a training run, started and stopped by a training callback.

Why a process of its own, started as ``python -m wdiff watch ...`` in a session of its own (and not
with ``multiprocessing``):

- a fresh interpreter: it inherits nothing of the trainer (no CUDA context, no torch threads) and never
  imports torch. ``multiprocessing`` with fork copies a CUDA context (which CUDA does not support);
  with spawn it imports the training script's ``__main__`` module again (torch, the model code) in
  the child, and its children end with the trainer;
- it outlives the trainer: a crash, SIGKILL, or Ctrl-C in the terminal (a process in another session
  gets no SIGINT from it) leave it running; it sees the training process gone (``--parent-pid``), adds
  every checkpoint that is complete and exits. At the end of training the callback creates the
  ``--until-file`` and the watch does the same. Either way OUT ends as a finished result;
- a training step never waits on it: the callback starts it once (a ``fork``/``exec`` of a few ms,
  before the first step), then at each save only asks whether it is still running (one ``waitpid``
  that does not block, microseconds). The watch finds new checkpoints by itself, every ``poll``
  seconds, and waits until their files stop changing (``wdiff.watcher``).

Its output (one line per update, warnings, the closing line) goes to ``OUT-watch.log`` beside OUT; the
callback prints one line when it starts it and one when it ended, and a warning (with the log's last
line) if it stopped with an error.
"""

from __future__ import annotations

import logging
import os
import site
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wdiff import checks
from wdiff.errors import WdiffError
from wdiff.outdir import sibling

if TYPE_CHECKING:
    from wdiff.results import Results

logger = logging.getLogger("wdiff.integrations")

RESULTS_NAME = "wdiff"  # the results folder inside the checkpoint folder, unless ``out`` says otherwise
LOG_SUFFIX = "-watch.log"


class BackgroundWatch:
    """The ``wdiff watch`` process of a training run and the options it runs with.

    ``out``: the results folder (default ``FOLDER/wdiff``, FOLDER being where the checkpoints are:
    the Trainer's ``output_dir``, the ModelCheckpoint's ``dirpath``; wdiff never takes its own results
    for a checkpoint). ``folder``: where the checkpoints are, when not the framework's folder.
    ``poll``: seconds between two looks at the folder. ``render``, ``frames``, ``mesh``, ``max_points``,
    ``html_points``, ``spectrum``, ``scheduler``, ``workers``, ``chunk_mb``: as ``wdiff watch``'s
    options. ``tensorboard=LOGDIR``, ``wandb=PROJECT``: ``--tensorboard``, ``--wandb``. ``extra_args``:
    any other ``wdiff watch`` flags, as on the command line. ``wait``: at the end of training, wait
    until the watch has added every checkpoint (at most ``timeout`` seconds; it goes on in the
    background after that). ``nice``: how much lower the watch's CPU priority is than the trainer's.
    ``quiet``: no line on stderr when the watch starts and ends (warnings still go to logging).
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | None = None,
        *,
        folder: str | os.PathLike[str] | None = None,
        poll: float = 1.0,
        render: bool = True,
        frames: bool = False,
        mesh: bool = False,
        max_points: int | None = None,
        html_points: int | None = None,
        spectrum: bool | None = None,
        scheduler: str | None = None,
        workers: int | None = None,
        chunk_mb: float | None = None,
        tensorboard: str | os.PathLike[str] | None = None,
        wandb: str | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        timeout: float | None = 600.0,
        nice: int = 10,
        quiet: bool = False,
    ) -> None:
        # checked now, in the training script, not later in a log nobody reads
        checks.number("poll", poll, *checks.POLL, integer=False)
        if max_points is not None:
            checks.number("max_points", max_points, *checks.POINTS)
        if html_points is not None:
            checks.number("html_points", html_points, 0, checks.POINTS[1])
        if workers is not None:
            checks.number("workers", workers, *checks.WORKERS)
        if chunk_mb is not None:
            checks.number("chunk_mb", chunk_mb, *checks.CHUNK_MB, integer=False, above=True)
        if scheduler is not None:
            checks.scheduler("scheduler", scheduler)
        if timeout is not None:
            checks.number("timeout", timeout, 0, 1e9, integer=False)
        checks.number("nice", nice, 0, 19)
        if isinstance(extra_args, (str, bytes)) or not all(isinstance(a, str) for a in extra_args):
            raise checks.OptionError("extra_args", f"must be a list of strings, got {extra_args!r}")
        self.options = {
            "poll": poll, "render": render, "frames": frames, "mesh": mesh, "max_points": max_points,
            "html_points": html_points, "spectrum": spectrum, "scheduler": scheduler, "workers": workers,
            "chunk_mb": chunk_mb, "tensorboard": tensorboard, "wandb": wandb,
        }  # fmt: skip
        self.extra_args = list(extra_args)
        self.wait = wait
        self.timeout = timeout
        self.nice = nice
        self.quiet = quiet
        self._out = None if out is None else Path(out)
        self._folder = None if folder is None else Path(folder)
        self.out: Path | None = None  # once started: the results folder
        self.log: Path | None = None  # and the watch's log beside it
        self.process: subprocess.Popen | None = None
        self._stop_file: Path | None = None
        self._told = False  # a watch that ended early is reported once
        super().__init__()

    # -- the command -------------------------------------------------------------------------------
    def command_line(self, folder: Path, out: Path, stop_file: Path, parent: int) -> list[str]:
        """The ``wdiff watch`` command that follows ``folder`` into ``out``."""
        o = self.options
        flags = [
            "--poll",
            repr(float(o["poll"])),
            "--until-file",
            str(stop_file),
            "--parent-pid",
            str(parent),
        ]
        flags += ["--no-render"] * (not o["render"]) + ["--frames"] * bool(o["frames"])
        flags += ["--mesh"] * bool(o["mesh"])
        valued = {
            "max_points": "--max-points", "html_points": "--html-points", "scheduler": "--scheduler",
            "workers": "--workers", "chunk_mb": "--chunk-mb", "wandb": "--wandb",
        }  # fmt: skip
        for name, flag in valued.items():
            if o[name] is not None:
                flags += [flag, str(o[name])]
        if o["tensorboard"] is not None:
            flags += ["--tensorboard", str(Path(o["tensorboard"]).absolute())]
        if o["spectrum"] is not None:
            flags.append("--spectrum" if o["spectrum"] else "--no-spectrum")
        return [sys.executable, "-m", "wdiff", "watch", str(folder), "-o", str(out), *flags, *self.extra_args]

    # -- start, check, stop ------------------------------------------------------------------------
    def start(self, folder: str | os.PathLike[str] | None) -> None:
        """Start the watch of the checkpoints in ``folder`` (``self``'s ``folder`` if one was given);
        nothing if this callback's watch is already running."""
        if self.process is not None and self.process.poll() is None:
            if self._stop_file is None or not self._stop_file.exists():
                return  # train() called again: the same watch goes on
            self.stop(wait=True)  # the previous train() asked it to finish: let it, then start anew
            if self.process.poll() is None:
                logger.warning("wdiff: the previous watch (PID %d) still runs: no new one", self.process.pid)
                return
        where = self._folder or (Path(folder) if folder is not None else None)
        if where is None:
            raise WdiffError(None, "no checkpoint folder to follow: pass folder=...")
        where = where.absolute()
        out = (self._out or where / RESULTS_NAME).absolute()
        where.mkdir(parents=True, exist_ok=True)  # the trainer makes it at its first save
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.log = out, out.parent / f"{out.name}{LOG_SUFFIX}"
        self._stop_file = sibling(out, "watch-stop")
        self._stop_file.unlink(missing_ok=True)  # left by a watch that was not waited for
        if not sys.executable:
            raise WdiffError(
                None, "no Python interpreter to start `wdiff watch` with (sys.executable is empty)"
            )
        command = self.command_line(where, out, self._stop_file, os.getpid())
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=_environment(),
            )  # fmt: skip
        self._told = False
        if self.nice:
            try:  # the whole process: it has one thread yet (Linux gives new threads their creator's nice)
                mine = os.getpriority(os.PRIO_PROCESS, 0)
                os.setpriority(os.PRIO_PROCESS, self.process.pid, min(19, mine + self.nice))
            except (AttributeError, OSError):  # no setpriority (Windows), or not allowed
                pass
        self._say(f"following {where} into {out} in the background (PID {self.process.pid}, log {self.log})")

    def begin(self, folder: str | os.PathLike[str] | None) -> None:
        """:meth:`start` from a training hook: a watch that cannot start (a folder that cannot be written,
        no interpreter) is a logging warning, never the end of the training."""
        try:
            self.start(folder)
        except (OSError, WdiffError) as e:
            logger.warning("wdiff: no watch of this run: %s", e)

    def check(self) -> None:
        """Tell once (a logging warning) when the watch ended before it was asked to. Costs a ``waitpid``
        that does not block: what a training step pays at each save."""
        p = self.process
        if p is None or self._told or p.poll() is None:
            return
        self._told = True
        if p.returncode != 0:
            logger.warning(
                "wdiff watch stopped (exit code %s): %s (log: %s)", p.returncode, self._last_line(), self.log
            )

    def stop(self, wait: bool | None = None, timeout: float | None = None) -> Results | None:
        """Ask the watch to add every complete checkpoint and exit. ``wait`` (default: the callback's):
        return once it has, at most ``timeout`` seconds (default: the callback's) later. Returns the
        results when it waited and they exist."""
        p = self.process
        if p is None or self._stop_file is None:
            return None
        if p.poll() is None:
            self._stop_file.touch()
            if not (self.wait if wait is None else wait):
                return None
            timeout = self.timeout if timeout is None else timeout
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "wdiff watch (PID %d) is still adding checkpoints after %g s; it goes on in the "
                    "background (log: %s)", p.pid, timeout, self.log,
                )  # fmt: skip
                return None
        self._stop_file.unlink(missing_ok=True)
        if p.returncode != 0:
            self.check()  # the warning, once
            return None
        if not self._told:
            self._told = True
            self._say(self._last_line())
        return self.results

    @property
    def results(self) -> Results | None:
        """The results in OUT as they are now (None before the first two checkpoints were added)."""
        from wdiff.results import Results
        from wdiff.schema import SUMMARY

        if self.out is None or not (self.out / SUMMARY).is_file():
            return None
        return Results.load(self.out)

    # -- helpers -----------------------------------------------------------------------------------
    def _last_line(self) -> str:
        """The last line the watch wrote into its log (its closing line, or its error)."""
        if self.log is None:
            return ""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
        except OSError:
            return ""
        return next((line for line in reversed(lines) if line), "")

    def _say(self, line: str) -> None:
        logger.info(line)
        if not self.quiet:
            print(f"wdiff: {line}", file=sys.stderr, flush=True)


def _environment() -> dict[str, str]:
    """The trainer's environment, where the child finds this very wdiff: its folder is put on
    ``PYTHONPATH`` unless the child finds it anyway (installed, or on ``PYTHONPATH`` already)."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    found = [*site.getsitepackages(), site.getusersitepackages(), *paths]
    if not any(_same(root, p) for p in found):
        env["PYTHONPATH"] = os.pathsep.join([str(root), *paths])
    env["PYTHONUNBUFFERED"] = "1"  # the log follows the watch line by line
    return env


def _same(a: Path, b: str) -> bool:
    try:
        return a == Path(b).resolve()
    except OSError:
        return False


class LightningHooks(BackgroundWatch):
    """The hooks of the Lightning callback, shared by ``lightning.pytorch`` and ``pytorch_lightning``
    (whose ``Callback`` classes differ): start with training, check at each save, stop at its end."""

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        folder = None
        if trainer.checkpoint_callback is not None:  # the first ModelCheckpoint, its dirpath set up by now
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None and self._folder is None:
            logger.warning(
                "wdiff: no ModelCheckpoint saves checkpoints (enable_checkpointing=False?): no watch"
            )
            return
        self.begin(folder)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.is_global_zero:  # training failed: what is complete is added, nobody waits for it
            self.stop(wait=False)
