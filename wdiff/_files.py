"""Atomic file output (readers never see a half-written PLY or PNG), and carrying results files over."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], stem: str | None = None) -> Iterator[BinaryIO]:
    """Write to a temporary file in the target's folder, then ``os.replace`` it into place.

    Same folder, so the rename stays on one file system and is atomic; on error the target is left
    as it was and the temporary file is removed. Created with mode 0666 minus the umask, like
    ``open`` (``tempfile.mkstemp`` would leave results readable by the owner only). The temporary
    file is ``.<stem>.<pid>.<random>.tmp``, ``stem`` the target's name unless given (a name a
    reader of the folder must not take for the target's kind of file while it grows).
    """
    target = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(target))
    tmp = os.path.join(folder, f".{stem or base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
