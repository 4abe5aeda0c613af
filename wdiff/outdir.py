"""Putting results in place without ever leaving half of them, and without touching what is not
wdiff's: one writer per output folder, a private staging folder, and a swap at the end.

OUT is results when it holds wdiff's marker (``wdiff.marker``); a non-empty OUT without one is refused.
Whatever OUT holds that the marker does not list is the user's: it is never deleted or overwritten.

Layout beside ``OUT`` (in its parent) while a run writes:

- ``.OUT.wdiff-lock``: held with ``flock`` by the one process writing ``OUT``; the kernel drops the
  lock when that process dies, even by SIGKILL, so a stale lock never blocks the next run;
- ``.OUT.wdiff-tmp-XXXX/``: the new results, complete before they are swapped in;
- ``.OUT.wdiff-old-PID/``: only where the filesystem cannot swap two folders atomically (see below).

(For an OUT name so long that these would pass 255 bytes, ``OUT`` is replaced by a prefix and a hash.)

Two ways to swap:

- **Whole folder** (OUT holds only wdiff's files): ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15;
  ext4, xfs, btrfs, tmpfs): OUT holds the old results or the new ones at every instant. Elsewhere it
  is two renames, and a run killed between them leaves the old results under the ``-old-`` name; the
  next run puts them back. A file the user drops into OUT while the run computes is moved back into
  the new OUT after the exchange.
- **File by file** (OUT is a mount point, where renaming it fails with EBUSY, or OUT holds the user's
  files too): the results are staged in ``OUT/.wdiff-tmp-XXXX/``; then ``OUT/.wdiff-journal`` names
  that folder and the old files to drop, the old marker is removed, each file is renamed into OUT, and
  the new marker is renamed in last. A run killed after the journal is written is finished by the next
  writer (roll forward: the staged generation is complete); killed before, its staging folder is
  removed and OUT keeps the previous results.

Whoever takes the lock cleans what killed runs left: a staging folder is removed only when it holds
wdiff's stamp or marker, and then only wdiff's files in it; anything else is moved back into OUT.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from wdiff.errors import WdiffError
from wdiff.marker import (
    JOURNAL,
    MARKER,
    MAX_MARKER_BYTES,
    STAGING_PREFIX,
    STAMP,
    contents,
    internal,
    is_wdiff_name,
    marker_text,
    read_small,
    regular_file,
)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NAME_MAX = 255
_CANNOT_SWAP = (errno.EBUSY, errno.EXDEV)  # a mount point, or a bind mount seen from its parent
CLASH = "is not a file wdiff wrote, and wdiff writes files of that name: move it or choose another -o"
NOT_RESULTS = "holds no wdiff results: it holds files wdiff did not write; choose another -o"


def target(out: str | os.PathLike[str]) -> Path:
    """The folder results go into: OUT, or the folder a symlinked OUT points at (so no link is ever
    swapped away or left behind)."""
    out = Path(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def base_name(out: Path) -> str:
    """The part of wdiff's names beside OUT that stands for OUT: its name, or for a name too long to
    leave room for ``.NAME.wdiff-tmp-XXXXXXXX`` within 255 bytes, a prefix of it and a hash."""
    name = out.name
    if len(os.fsencode(f".{name}.wdiff-tmp-XXXXXXXX")) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f"{name[:32]}~{digest}"


def sibling(out: Path, tag: str) -> Path:
    """``.OUT.wdiff-TAG`` beside OUT (tag: ``lock``, ``tmp-``, ``old-PID``, ``watch-next...``)."""
    return out.parent / f".{base_name(out)}.wdiff-{tag}"


def _leftovers(out: Path, tag: str) -> list[Path]:
    prefix = f".{base_name(out)}.wdiff-{tag}-"
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return sorted(out.parent / n for n in names if n.startswith(prefix))


def is_mount(path: Path) -> bool:
    """Whether ``path`` is a mount point, bind mounts on the same filesystem included (those share
    their parent's device, so ``os.path.ismount`` misses them: /proc/self/mountinfo lists them)."""
    if os.path.ismount(path):
        return True
    real = os.fsencode(os.path.realpath(path))
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    octal = re.compile(rb"\\([0-7]{3})")
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4 and octal.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4]) == real:
            return True
    return False


def _parent_problem(out: Path) -> str | None:
    """Why OUT's parent folder cannot exist: an ancestor that is a file."""
    for ancestor in out.parents:
        if ancestor.exists() or ancestor.is_symlink():
            return None if ancestor.is_dir() else f"cannot make the output folder: {ancestor} is not a folder"
    return None


def check_out(out: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an OUT results cannot go into (one-line ``WdiffError``s)."""
    out = target(out)
    problem = _parent_problem(out)
    if problem is not None:
        raise WdiffError(out, problem)
    if out.exists() and not out.is_dir():
        raise WdiffError(out, "output path exists and is not a folder")
    found = contents(out) if out.is_dir() else None
    if out.is_dir() and found is None:
        raise WdiffError(out, NOT_RESULTS)
    clash = [name for name in found.foreign if is_wdiff_name(name)] if found else []
    if clash:  # the new results may hold a file of that name: refused now, not after the compute
        raise WdiffError(out / clash[0], CLASH)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically; False where the system or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove_file(path: Path) -> None:
    """Remove a file wdiff wrote; never a folder (a folder at that name is not wdiff's)."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def link_or_copy(source: Path, target: Path) -> None:
    """Carry an unchanged results file into the new folder: a hard link (no copy of a map that can be
    tens of GB; the old folder is removed afterwards), or a copy where links are not possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def move(source: Path, dest: Path) -> None:
    """Rename a file, or copy it where the rename would cross a mount (EXDEV)."""
    try:
        os.replace(source, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, dest)
        source.unlink()


def _clear(folder: Path, home: Path | None) -> None:
    """Remove a staging folder a killed run left, or the previous results after a swap: wdiff's
    files only. Anything else in it is moved into ``home`` (OUT) when its name is free there; what
    cannot be moved stays, and so does the folder. The stamp or marker that makes the folder
    wdiff's goes last, so a kill midway leaves a folder the next writer still recognises."""
    if folder.is_symlink() or not folder.is_dir():
        return
    if regular_file(folder, STAMP) is not None:  # made by wdiff and never committed: all wdiff's
        for name in os.listdir(folder):
            if name != STAMP:
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    _remove_file(path)
        _remove_file(folder / STAMP)
    else:
        found = contents(folder)
        if found is None:  # not wdiff's (no stamp, no marker, not results): leave it alone
            return
        for name in os.listdir(folder):
            path = folder / name
            if name in found.ours or name == JOURNAL:
                _remove_file(path)
            elif name != MARKER and home is not None and home.is_dir() and not os.path.lexists(home / name):
                with contextlib.suppress(OSError):
                    os.replace(path, home / name)
        if len(os.listdir(folder)) == 1:  # the marker alone
            _remove_file(folder / MARKER)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _journal(out: Path) -> dict | None:
    try:
        data = json.loads(read_small(out / JOURNAL, MAX_MARKER_BYTES))
        ok = isinstance(data["staging"], str) and data["staging"].startswith(STAGING_PREFIX)
        ok = ok and all(isinstance(n, str) and "/" not in n for n in [*data["files"], *data["remove"]])
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    return data if ok and "/" not in data["staging"] else None


def roll_forward(out: Path) -> None:
    """Finish a file-by-file swap that ``OUT/.wdiff-journal`` describes (idempotent: each step can
    be done again after a kill at any point)."""
    journal = _journal(out)
    if journal is None:
        raise WdiffError(out / JOURNAL, "is damaged: the swap of these results cannot be finished")
    staging = out / journal["staging"]
    if regular_file(staging, MARKER) is not None:  # the staged generation is not in place yet
        _remove_file(out / MARKER)  # from here on OUT is not the old results any more
        for name in journal["remove"]:
            _remove_file(out / name)
        for name in journal["files"]:
            if regular_file(staging, name) is not None:
                os.replace(staging / name, out / name)
        os.replace(staging / MARKER, out / MARKER)  # the new generation is complete
    shutil.rmtree(staging, ignore_errors=True)
    (out / JOURNAL).unlink(missing_ok=True)


def _make_parent(out: Path) -> None:
    problem = _parent_problem(out)
    if problem is not None:
        raise WdiffError(out, problem)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WdiffError(out.parent, f"cannot make the output folder's parent: {e.strerror}") from None


class Staging:
    """The output folder's lock and the staging folder the new results are written into.

    ``Staging(out)`` takes the lock (a WdiffError if another wdiff is writing ``out``), finishes or
    removes what killed runs left, refuses an OUT that holds files but no results, and makes
    ``folder``. ``commit()`` puts ``folder``'s files into ``out``; ``close()`` removes whatever was not
    committed and releases the lock. Use it as a context manager.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = target(out)
        _make_parent(self.out)
        self._lock_path = sibling(self.out, "lock")
        self._fd = self._lock()
        self.folder: Path | None = None
        self._trash: Path | None = None  # the previous results after the swap, until removed
        try:
            self._recover()
            check_out(self.out)  # again, under the lock
            found = contents(self.out) if self.out.is_dir() else None
            self.in_place = self.out.is_dir() and (is_mount(self.out) or bool(found and found.foreign))
            self.folder = self._make_staging(self.out if self.in_place else None)
        except BaseException:
            self.close()
            raise

    def _make_staging(self, inside: Path | None) -> Path:
        if inside is not None:
            folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=inside))
        else:
            folder = Path(tempfile.mkdtemp(prefix=sibling(self.out, "tmp-").name, dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        folder.chmod(0o777 & ~umask)  # mkdtemp makes it private; results are ordinary files
        (folder / STAMP).write_text(f"{os.getpid()}\n")
        return folder

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                raise WdiffError(self.out.parent, f"cannot write here: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WdiffError(self.out, "another wdiff process is writing these results") from None
            # The previous holder unlinks the file when it is done: a lock on an unlinked file guards
            # nothing, so take it again on the file now at that name.
            try:
                if os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _recover(self) -> None:
        """Put back results a killed two-rename swap left aside, finish a killed file-by-file swap,
        remove every other leftover (wdiff's files only)."""
        old = _leftovers(self.out, "old")
        if not os.path.lexists(self.out) and old:
            os.replace(old[-1], self.out)
            old = old[:-1]
        if self.out.is_dir() and regular_file(self.out, JOURNAL) is not None:
            roll_forward(self.out)
        for leftover in _leftovers(self.out, "tmp") + old:
            _clear(leftover, self.out)
        if self.out.is_dir():
            for name in os.listdir(self.out):
                if name.startswith(STAGING_PREFIX):
                    _clear(self.out / name, self.out)

    def _ordinary_modes(self) -> None:
        """Results are ordinary files (0666 minus the umask): some writers, the safetensors library
        among them, create theirs private (0600), which would hide them from colleagues."""
        assert self.folder is not None
        umask = os.umask(0)
        os.umask(umask)
        for entry in self.folder.iterdir():
            if entry.is_file() and not entry.is_symlink():
                entry.chmod(0o666 & ~umask)

    def commit(self) -> None:
        """Put the finished results into ``out``; ``close()`` removes the previous ones.

        ``folder`` keeps naming the staging path until the swap is done, so an interruption at any
        point leaves ``close()`` removing the right folder: after an exchange that path holds the
        previous results (wdiff's files only are removed from it).
        """
        assert self.folder is not None
        self._ordinary_modes()
        files = sorted(name for name in os.listdir(self.folder) if not internal(name))
        (self.folder / MARKER).write_text(marker_text(files, secrets.token_hex(8)))
        (self.folder / STAMP).unlink()  # from here on its marker says which files are wdiff's
        if not os.path.lexists(self.out):
            os.replace(self.folder, self.out)
            self.folder = None
            return
        found = contents(self.out)
        if found is None:  # its marker went away while this run computed
            raise WdiffError(self.out, NOT_RESULTS)
        clash = [name for name in files if name in found.foreign]
        if clash:
            raise WdiffError(self.out / clash[0], CLASH)
        if not self.in_place and not found.foreign:
            try:
                if self._swap_folders():
                    return
            except OSError as e:
                if e.errno not in _CANNOT_SWAP:
                    raise
        self._commit_in_place(files, found.ours)

    def _swap_folders(self) -> bool:
        assert self.folder is not None
        if _exchange(self.folder, self.out):
            self.folder, self._trash = None, self.folder
        else:  # killed between these two renames, the next run puts the -old- folder back
            old = sibling(self.out, f"old-{os.getpid()}")
            os.replace(self.out, old)
            try:
                os.replace(self.folder, self.out)
            except OSError:
                os.replace(old, self.out)
                raise
            self.folder, self._trash = None, old
        _clear(self._trash, self.out)  # files the user added during the run go back into OUT
        self._trash = None
        return True

    def _commit_in_place(self, files: list[str], previous: frozenset[str]) -> None:
        assert self.folder is not None
        if self.folder.parent != self.out:  # staged beside an OUT that turned out not to move
            inner = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
            (inner / STAMP).write_text(f"{os.getpid()}\n")
            for name in [*files, MARKER]:
                move(self.folder / name, inner / name)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = inner
            (inner / STAMP).unlink()
        journal = {
            "staging": self.folder.name,
            "files": files,
            "remove": sorted(previous - set(files)),
        }
        pending = self.folder / JOURNAL
        with open(pending, "w") as f:
            json.dump(journal, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pending, self.out / JOURNAL)  # from here on the swap is finished, now or next run
        self.folder = None
        roll_forward(self.out)

    def close(self) -> None:
        for leftover in (self.folder, self._trash):
            if leftover is not None:
                _clear(leftover, self.out)
        self.folder = self._trash = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
