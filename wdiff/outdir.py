"""Putting results in place without ever leaving half of them: one writer per output folder, a private
temporary folder beside it, and an atomic swap at the end.

Layout beside ``OUT`` (in its parent) while a run writes:

- ``.OUT.wdiff-lock``: held with ``flock`` by the one process writing ``OUT``; the kernel drops the
  lock when that process dies, even by SIGKILL, so a stale lock never blocks the next run;
- ``.OUT.wdiff-tmp-XXXX/``: the new results, complete before they are swapped in;
- ``.OUT.wdiff-old-PID/``: only where the filesystem cannot swap two folders atomically (see below).

The swap is ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15; ext4, xfs, btrfs, tmpfs): ``OUT`` holds the
old results or the new ones at every instant, never nothing. Elsewhere it is two renames, and a run
killed between them leaves the old results under the ``-old-`` name; the next run puts them back.
Whoever takes the lock removes what killed runs left behind: nothing under those names is ever read
as results, since only a folder named exactly ``OUT`` is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from wdiff.errors import WdiffError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _leftovers(out: Path, tag: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.wdiff-{tag}-*"))


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


class Staging:
    """The output folder's lock and the temporary folder the new results are written into.

    ``Staging(out)`` takes the lock (a WdiffError if another wdiff is writing ``out``), restores or
    removes what killed runs left, and makes ``folder``. ``commit()`` swaps ``folder`` into ``out``;
    ``close()`` removes whatever was not committed and releases the lock. Use it as a context manager.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.out.parent / f".{self.out.name}.wdiff-lock"
        self._fd = self._lock()
        self.folder: Path | None = None
        self._trash: Path | None = None  # the previous results after the swap, until removed
        try:
            self._recover()
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.wdiff-tmp-", dir=self.out.parent))
            umask = os.umask(0)
            os.umask(umask)
            self.folder.chmod(0o777 & ~umask)  # mkdtemp makes it private; results are ordinary files
        except BaseException:
            self.close()
            raise

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
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
        """Put back results a killed two-rename swap left aside; remove every other leftover."""
        old = _leftovers(self.out, "old")
        if not self.out.exists() and old:
            os.replace(old[-1], self.out)
            old = old[:-1]
        for leftover in _leftovers(self.out, "tmp") + old:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)

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
        """Swap the finished results into ``out``; ``close()`` removes the previous ones.

        ``folder`` keeps naming the temporary path until the swap is done, so an interruption at any
        point leaves ``close()`` removing the right folder: after an exchange that path holds the
        previous results.
        """
        assert self.folder is not None
        self._ordinary_modes()
        if not self.out.exists():
            os.replace(self.folder, self.out)
            self.folder = None
        elif _exchange(self.folder, self.out):
            self.folder, self._trash = None, self.folder
        else:  # killed between these two renames, the next run puts the -old- folder back
            old = self.out.with_name(f".{self.out.name}.wdiff-old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.folder, self.out)
            self.folder, self._trash = None, old

    def close(self) -> None:
        for leftover in (self.folder, self._trash):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
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
