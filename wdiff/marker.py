"""What makes a folder wdiff's results: the marker ``.wdiff-results`` that every run writes into OUT,
never a file name.

The marker is JSON: ``{"format": "wdiff-results", "schema": 1, "wdiff_version": ..., "generation":
..., "files": [...]}``. ``files`` lists every file the run wrote, so whatever else is in OUT is the
user's and is never deleted or overwritten. A folder without a valid marker is results only when it
was written by a wdiff from before the marker existed: a ``summary.json`` with ``wdiff_version`` and
``tensors``, an ``accumulated.safetensors`` (unless the summary says no map was stored), and nothing
but file names wdiff writes (``LEGACY``).

Results are read back only through regular files directly inside OUT (``regular_file``): a symlink in
OUT is never followed, whatever it points at.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from wdiff import __version__
from wdiff.checks import NO_MAP

MARKER = ".wdiff-results"
JOURNAL = ".wdiff-journal"  # inside OUT while results are swapped in file by file (see outdir)
STAMP = ".wdiff-staging"  # inside every folder wdiff makes to write results into, until committed
STAGING_PREFIX = ".wdiff-tmp-"  # such a folder inside OUT (when OUT cannot be swapped as a whole)
FORMAT = "wdiff-results"
SCHEMA = 1
MAX_MARKER_BYTES = 16 << 20

# Every name a run, ``wdiff report`` or ``wdiff watch`` writes into OUT. Only used to recognise results
# of wdiff versions without the marker, and what a killed run left in its own staging folder.
WDIFF_FILES = frozenset(
    {
        "summary.json", "accumulated.safetensors", "rows.safetensors", "pooled.safetensors",
        "frames.safetensors", "points.ply", "render.png", "mesh.ply", "frames.gif", "frames.mp4",
        "scene.html", "findings.json", "metrics.csv", "tensors.csv", "report.html",
        "watch-first.safetensors", "watch-last.safetensors",
    }
)  # fmt: skip
_VIEW_RENDER = re.compile(r"render-(oblique|back|side|top|front)\.png")
_ATOMIC_TMP = re.compile(r"\.(.+)\.\d+\.[0-9a-f]{8}\.tmp")  # wdiff._files.atomic_write, killed midway


def is_wdiff_name(name: str) -> bool:
    """A name wdiff writes into OUT (or its atomic-write temporary file)."""
    if name in WDIFF_FILES or _VIEW_RENDER.fullmatch(name):
        return True
    tmp = _ATOMIC_TMP.fullmatch(name)
    return bool(tmp) and (tmp.group(1) in WDIFF_FILES or bool(_VIEW_RENDER.fullmatch(tmp.group(1))))


def internal(name: str) -> bool:
    """wdiff's own bookkeeping inside OUT: the marker, the journal, a staging folder."""
    return name in (MARKER, JOURNAL, STAMP) or name.startswith(STAGING_PREFIX)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def regular_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` when it is a regular file there (not a symlink, pipe or folder), else None."""
    path = folder / name
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return path if stat.S_ISREG(st.st_mode) else None


def read_small(path: Path, limit: int) -> bytes:
    """The bytes of a regular file, opened without following a symlink or blocking on a pipe."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > limit:
            raise OSError(0, f"{st.st_size} bytes, over the {limit >> 20} MiB limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Marker:
    files: tuple[str, ...]
    generation: str
    wdiff_version: str


def marker_text(files: list[str], generation: str) -> str:
    data = {
        "format": FORMAT,
        "schema": SCHEMA,
        "wdiff_version": __version__,
        "generation": generation,
        "files": sorted(files),
    }
    return json.dumps(data, indent=1) + "\n"


def read_marker(folder: Path) -> Marker | None:
    """The marker of ``folder`` when it is valid, else None (missing, a symlink, truncated, foreign)."""
    path = regular_file(folder, MARKER)
    if path is None:
        return None
    try:
        data = json.loads(read_small(path, MAX_MARKER_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not (
        isinstance(data, dict)
        and data.get("format") == FORMAT
        and type(data.get("schema")) is int
        and data["schema"] == SCHEMA
        and isinstance(data.get("generation"), str)
        and isinstance(data.get("wdiff_version"), str)
        and isinstance(data.get("files"), list)
        and all(_plain_name(f) and not internal(f) for f in data["files"])
    ):
        return None
    return Marker(tuple(data["files"]), data["generation"], data["wdiff_version"])


def _legacy(folder: Path, entries: list[str]) -> bool:
    """Results of a wdiff from before the marker: only names wdiff writes, and its summary."""
    if not entries or not all(is_wdiff_name(e) and regular_file(folder, e) for e in entries):
        return False
    summary = regular_file(folder, "summary.json")
    if summary is None:
        return False
    try:
        data = json.loads(read_small(summary, 1 << 30))
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("wdiff_version"), str)
        and isinstance(data.get("tensors"), dict)
        # the map, unless the summary says none was stored (``--map-dtype none``: a run's own staging
        # folder, read back before its marker is written)
        and (regular_file(folder, "accumulated.safetensors") is not None or data.get("map_dtype") == NO_MAP)
    )


@dataclass(frozen=True)
class Contents:
    """What a results folder holds: wdiff's files and the others (the user's)."""

    ours: frozenset[str]  # files wdiff wrote (its marker's list, or every file of legacy results)
    foreign: tuple[str, ...]  # everything else but wdiff's bookkeeping
    marker: Marker | None  # None for legacy results, or while a file-by-file swap is unfinished


def contents(folder: Path) -> Contents | None:
    """wdiff's files and the user's in ``folder``; None when it holds files but is not results.

    An empty folder is results with nothing in them. A folder whose file-by-file swap was killed (a
    journal, no marker yet) counts as results: the next writer finishes the swap under the lock.
    """
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return None
    visible = [e for e in entries if not internal(e)]
    marker = read_marker(folder)
    if marker is not None:
        listed = set(marker.files)
    elif regular_file(folder, JOURNAL) is not None:
        listed = set(_journal_files(folder))
    elif not visible:
        listed = set()
    elif _legacy(folder, visible):
        listed = set(visible)
    else:
        return None
    # wdiff writes regular files only: a folder or symlink at a listed name was put there by the user;
    # the atomic-write leftovers of a killed `wdiff report` (``.report.html.PID.XXXX.tmp``) are wdiff's
    present = {e for e in visible if e in listed or (e.startswith(".") and is_wdiff_name(e))}
    ours = frozenset(e for e in present if regular_file(folder, e) is not None) | (listed - set(visible))
    return Contents(ours, tuple(e for e in visible if e not in ours), marker)


def _journal_files(folder: Path) -> list[str]:
    try:
        data = json.loads(read_small(folder / JOURNAL, MAX_MARKER_BYTES))
        names = [*data["files"], *data["remove"]]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return []
    return [n for n in names if _plain_name(n)] if isinstance(names, list) else []
