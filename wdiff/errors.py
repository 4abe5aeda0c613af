"""The one error type users see: bad input or usage, said in one line that names the file."""

from __future__ import annotations

import os

from wdiff.terminal import visible


class WdiffError(Exception):
    """Bad input or usage. ``str()`` is one line: ``<file>: <problem>``, with control characters of
    the file name or the problem shown as escapes (``wdiff.terminal.visible``): safe to print.

    The CLI turns it into exit code 2 with that line on stderr and no traceback; anything else that
    escapes is an unexpected failure (exit code 1).
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.problem = " ".join(problem.split())  # always one line
        line = f"{self.path}: {self.problem}" if self.path else self.problem
        super().__init__(visible(line))
