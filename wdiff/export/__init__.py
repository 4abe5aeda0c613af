"""Exports of a results folder to where ML engineers already watch training: TensorBoard and Weights &
Biases. Both log the same series (``wdiff.export.series``): per block and per tensor, at each
checkpoint's training step, with the renders, the film's frames and the findings. Neither writer's
package is imported before an export runs.

    from wdiff.export import to_tensorboard, to_wandb
    to_tensorboard("out/", "runs/wdiff")        # wdiff.export.tensorboard.export
    to_wandb("out/", project="my-finetune")     # wdiff.export.wandb.export

(The functions are not named ``tensorboard`` and ``wandb``: those are the submodules.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wdiff.export.tensorboard import Exported
    from wdiff.export.wandb import Logged

__all__ = ["Exports", "describe", "to_tensorboard", "to_wandb"]


def to_tensorboard(out: str | os.PathLike[str], logdir: str | os.PathLike[str]) -> Exported:
    """``wdiff.export.tensorboard.export``: what ``out`` holds and ``logdir`` does not yet."""
    from wdiff.export.tensorboard import export

    return export(out, logdir)


def to_wandb(out: str | os.PathLike[str], project: str | None = None, **options: Any) -> Logged:
    """``wdiff.export.wandb.export``: the results in ``out`` as one new W&B run."""
    from wdiff.export.wandb import export

    return export(out, project=project, **options)


def describe(done: Exported | Logged) -> str:
    """One line saying what an export wrote (for the CLI)."""
    from wdiff.export.tensorboard import Exported

    where = f"{done.logdir}" if isinstance(done, Exported) else f"W&B run {done.run_id} ({done.run_dir})"
    if not done.steps:
        return f"{where}: up to date ({done.checkpoints} checkpoints)"
    what = f"{done.scalars} scalars, {done.images} images, " + (
        f"{done.texts} texts" if isinstance(done, Exported) else f"{done.tables} tables"
    )
    span = f"step {done.steps[0]}" if len(done.steps) == 1 else f"steps {done.steps[0]} .. {done.steps[-1]}"
    count = f"{len(done.steps)} new checkpoint{'s' if len(done.steps) > 1 else ''}"
    return f"{where}: {count} ({span}): {what}"


class Exports:
    """The exports ``--tensorboard LOGDIR`` and ``--wandb PROJECT`` ask for, on ``wdiff run`` and
    ``wdiff watch``: checked when made (before any compute), ``update(out)`` after a run or each
    watch update (what is new only), ``close()`` at the end (ends the W&B run)."""

    def __init__(self, tensorboard: str | os.PathLike[str] | None = None, wandb: str | None = None) -> None:
        from wdiff.errors import WdiffError

        self.tensorboard = None
        self.wandb = None
        if tensorboard is not None:
            from wdiff.export.tensorboard import check_logdir, require

            require()
            self.tensorboard = check_logdir(tensorboard)
        if wandb is not None:
            from wdiff.export.wandb import WandbRun, require

            require()
            if not wandb.strip():
                raise WdiffError(None, "the W&B project name is empty")
            self.wandb = WandbRun(wandb)

    def update(self, out: str | os.PathLike[str]) -> list[str]:
        """Export what ``out`` holds and the destinations do not yet; one line each."""
        lines = []
        if self.tensorboard is not None:
            from wdiff.export.tensorboard import export

            lines.append(describe(export(out, self.tensorboard)))
        if self.wandb is not None:
            lines.append(describe(self.wandb.update(out)))
        return lines

    def close(self) -> None:
        """End the W&B run and wait until W&B wrote it all (the CLI's process ends right after)."""
        if self.wandb is not None:
            from wdiff.export.wandb import flush

            self.wandb.finish()
            flush()

    def __enter__(self) -> Exports:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
