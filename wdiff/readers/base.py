"""What every reader hands to the rest of wdiff: where a tensor's bytes are and how to decode them.

A reader answers "which tensors, with what dtype and shape, where" cheaply from headers; the bytes are
read only inside compute, chunk by chunk, by offset.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar

import ml_dtypes
import numpy as np

from wdiff.errors import WdiffError
from wdiff.readers import remote

# Side files are read whole, so each has a cap well above real files (docs/reliability.md, "Limits").
MIB = 1 << 20
CONFIG_LIMIT = 16 * MIB  # config.json, adapter_config.json: real ones are a few KB
INDEX_LIMIT = 256 * MIB  # shard indexes: ~15 MB for 100,000 tensors
STATE_LIMIT = 256 * MIB  # trainer_state.json: tens of MB for long runs with eval logs


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path named when a checkpoint was scanned: device, inode, size, modification time
    and status-change time. The one place a file's identity is computed (``of``): the scan records
    it, ``fingerprint`` digests it, and compute checks every descriptor it reads from against it.

    ``ctime_ns`` is set by the kernel on every write, truncate, ``utime``, ``chmod`` or link and
    cannot be set back, so a rewrite in place that restores size and mtime (``cp -p``,
    ``rsync -t``) is still seen."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    tag: str = ""  # an object in a remote store: its ETag, LFS sha256 or blob id (device, inode, times 0)

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def remote(cls, entry: remote.Entry) -> FileIdentity:
        return cls(0, 0, entry.size, 0, 0, entry.tag)

    def change(self, now: FileIdentity) -> str:
        """What differs between the scanned file (``self``) and ``now``, in words."""
        if now.tag != self.tag:
            return f"replaced by another object: {self.tag or 'no tag'} -> {now.tag or 'no tag'}"
        if (now.device, now.inode) != (self.device, self.inode):
            return "replaced by another file"
        if now.size != self.size:
            return f"size {self.size} -> {now.size} bytes"
        if now.mtime_ns != self.mtime_ns:
            return "modified in place"
        return "modified in place, or its permissions or links changed"


@dataclass
class Recorded:
    """What was read of each input while one checkpoint was scanned (``recording``): the identity of
    every file opened, and a digest of every safetensors header parsed (``record_header``)."""

    files: dict[str, FileIdentity] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


# Scoped to the ``with recording()`` block of the caller, so the identity kept is that of the very
# descriptor a header was read from; no recording outside such a block.
_recorded: contextvars.ContextVar[Recorded | None] = contextvars.ContextVar("wdiff_recorded", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Recorded]:
    """Collect the identity of every input opened inside the block, by path. A path opened twice
    with different identities was replaced while it was scanned: a one-line error."""
    seen = Recorded()
    token = _recorded.set(seen)
    try:
        yield seen
    finally:
        _recorded.reset(token)


def header_digest(prefix_and_header: bytes) -> str:
    """What ``recheck`` compares: a digest of a safetensors file's length prefix and header bytes."""
    return hashlib.blake2b(prefix_and_header, digest_size=16).hexdigest()


def record_header(path: str | os.PathLike[str], prefix_and_header: bytes) -> None:
    seen = _recorded.get()
    if seen is not None:
        seen.headers[os.fspath(path)] = header_digest(prefix_and_header)


def changed(path: str | os.PathLike[str], scanned: FileIdentity, now: FileIdentity) -> WdiffError:
    return WdiffError(
        path,
        f"changed since it was scanned ({scanned.change(now)}); run wdiff again once it stops changing",
    )


def open_input(
    path: str | os.PathLike[str], expected: FileIdentity | None = None, *, nofollow: bool = False
) -> int:
    """Open an input read-only and return the descriptor, refusing anything but a regular file
    before a byte is read, and (``expected``) anything but the very file that was scanned.

    Every input wdiff reads is opened here. A named pipe would block ``open`` forever and a device
    never ends, so the open does not wait (O_NONBLOCK, no effect on regular files) and the kind is
    checked on the open descriptor, which is the one then read from. ``nofollow``: refuse a symlink
    as the last part of the path (ONNX external data, as the onnx library does).
    """
    if remote.is_url(path):  # remote bytes reach a descriptor only through InputFiles' fetch
        raise WdiffError(path, "cannot read a remote object by descriptor")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
            raise WdiffError(path, f"cannot read: {kind}, not a regular file")
        now = FileIdentity.of(st)
        if expected is not None and now != expected:
            raise changed(path, expected, now)
        seen = _recorded.get()
        if seen is not None:
            first = seen.files.setdefault(os.fspath(path), now)
            if first != now:
                raise WdiffError(path, f"changed while wdiff read it ({first.change(now)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def still_same(fd: int, path: str, expected: FileIdentity | None) -> None:
    """After reading: the descriptor's file was not modified in place meanwhile (a rename over it
    leaves the descriptor on the scanned file; a rewrite in place changes its size or mtime)."""
    if expected is not None:
        now = FileIdentity.of(os.fstat(fd))
        if now != expected:
            raise changed(path, expected, now)


def identity_of(path: str | os.PathLike[str]) -> FileIdentity:
    """The identity of the regular file at ``path`` now (opened, never blocking, and checked), or of
    the remote object at a URL (as listed)."""
    if remote.is_url(path):
        return _remote_identity(os.fspath(path))
    fd = open_input(path)
    try:
        return FileIdentity.of(os.fstat(fd))
    finally:
        os.close(fd)


def _remote_identity(url: str, expected: FileIdentity | None = None) -> FileIdentity:
    entry = remote.stat(url)
    if entry is None:
        raise WdiffError(url, "not found (404)")
    if entry.is_dir:
        raise WdiffError(url, "cannot read: a folder, not a file")
    now = FileIdentity.remote(entry)
    if expected is not None and now != expected:
        raise changed(url, expected, now)
    return now


def _wants(
    ranges: Mapping[str, list[tuple[int, int]]], expected: Mapping[str, FileIdentity]
) -> list[remote.Want]:
    """The ranges to fetch, each with the size and tag its object was scanned with."""
    wants = []
    for url, spans in ranges.items():
        known = expected.get(url)
        size, tag = (known.size, known.tag) if known else (0, "")
        wants += [remote.Want(url, offset, n, size, tag) for offset, n in spans]
    return wants


_prefetched: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "wdiff_prefetched", default=None
)


@contextlib.contextmanager
def prefetched(
    ranges: Mapping[str, list[tuple[int, int]]], expected: Mapping[str, FileIdentity]
) -> Iterator[None]:
    """Fetch these ranges of remote objects at once (adjacent ones in one request) for the
    ``InputFiles`` opened inside the block: a bundle of small tensors reads its tensors' ranges of one
    checkpoint file in a few requests rather than one per tensor. Nothing happens without ranges."""
    if not ranges:
        yield
        return
    fds = remote.fetch(_wants(ranges, expected))
    token = _prefetched.set(fds)
    try:
        yield
    finally:
        _prefetched.reset(token)
        for fd in fds.values():
            os.close(fd)


class InputFiles:
    """The input files one chunk task reads: each opened once by :func:`open_input`, checked to be
    the scanned file (``expected``: path -> identity) when opened and again by ``verify`` after the
    reads, closed on exit.

    A remote object (a URL) is never opened: ``ranges`` (URL -> [(offset, nbytes), ...]) says which of
    its bytes the task reads, and the first ``fd`` of any URL fetches them all at once into in-memory
    files (``readers.remote.fetch``) whose descriptors read like the object at the same offsets."""

    def __init__(
        self, expected: Mapping[str, FileIdentity], ranges: Mapping[str, list[tuple[int, int]]] | None = None
    ) -> None:
        self.expected = expected
        self.ranges = ranges or {}
        self.fds: dict[str, int] = {}
        self.fetched = False

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            if remote.is_url(path):
                self._fetch()
                if path not in self.fds:
                    raise WdiffError(path, "internal error: a remote object read with no range given")
                return self.fds[path]
            fd = self.fds[path] = open_input(path, self.expected.get(path))
        return fd

    def _fetch(self) -> None:
        if self.fetched:
            return
        self.fetched = True
        ready = _prefetched.get()
        if ready is not None and all(u in ready for u in self.ranges if remote.is_url(u)):
            self.fds.update({u: os.dup(ready[u]) for u in self.ranges if remote.is_url(u)})
            return
        wanted = {u: spans for u, spans in self.ranges.items() if remote.is_url(u)}
        self.fds.update(remote.fetch(_wants(wanted, self.expected)))

    def verify(self) -> None:
        for path, fd in self.fds.items():
            if not remote.is_url(path):  # remote: its tag was checked on every range read or is a commit's
                still_same(fd, path, self.expected.get(path))

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


def encodable(name: str) -> bool:
    """Whether ``name``, read from a checkpoint's own files, is a path this system can name: JSON's
    ``\\ud800`` (or a pickled string) can be a lone surrogate, which no file name encodes to, and every
    path operation on it raises UnicodeEncodeError."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def open_regular(path: str | os.PathLike[str], expected: FileIdentity | None = None) -> BinaryIO:
    """:func:`open_input` as a binary file object; a remote object (a URL) as a seekable file over
    range reads (``readers.remote.open_file``), recorded and checked like a local one."""
    if remote.is_url(path):
        url = os.fspath(path)
        now = _remote_identity(url, expected)
        seen = _recorded.get()
        if seen is not None:
            seen.files.setdefault(url, now)
        return remote.open_file(url, now.size, now.tag)  # type: ignore[return-value]
    return os.fdopen(open_input(path, expected), "rb")


def size_of(f: BinaryIO) -> int:
    """The size of a file opened by :func:`open_regular`, local or remote."""
    raw = getattr(f, "raw", None)
    if isinstance(raw, remote.RangeFile):
        return raw.size
    return os.fstat(f.fileno()).st_size


def first_bytes(path: str | os.PathLike[str], n: int) -> bytes:
    """Up to ``n`` bytes from the start of a regular file, to sniff its format; empty for anything
    that cannot be read (a folder, a pipe, a missing file): such a path is no format at all."""
    try:
        with open_regular(path) as f:
            return f.read(n)
    except (OSError, WdiffError):
        return b""


def read_json(path: str | os.PathLike[str], what: str, limit: int) -> Any:
    """Parse a JSON side file of a checkpoint (at most ``limit`` bytes), or raise a one-line error
    naming it. Python's json module on purpose: HF writes these files with ``json.dumps``, bare NaN
    included."""
    with open_regular(path) as f:
        size = size_of(f)
        too_big = f"{what} of {{}} bytes is over the {limit >> 20} MiB limit"
        if size > limit:
            raise WdiffError(path, too_big.format(size))
        try:
            data = f.read(size + 1)
            while len(data) > size:  # it grew after fstat: read on, never past the limit
                if len(data) > limit:
                    raise WdiffError(path, too_big.format(f"over {limit}"))
                more = f.read(min(MIB, limit + 1 - len(data)))
                if not more:
                    break
                data += more
            return json.loads(data.decode("utf-8"))
        except OSError as e:
            raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise WdiffError(path, f"{what} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class DType:
    """A checkpoint dtype: its size, the numpy type of its raw storage and how wdiff decodes it."""

    code: str  # the safetensors spelling: "BF16", "F8_E4M3", ...
    bits: int
    storage: str  # numpy dtype of the raw elements as stored ("<f4", "<u2", "u1", ...)
    decoded: np.dtype | None  # numpy/ml_dtypes type whose values the raw bits encode; None: not a float

    @property
    def is_float(self) -> bool:
        """Whether wdiff computes weight change for this dtype (real floating point, byte-sized)."""
        return self.decoded is not None


def _dtypes() -> dict[str, DType]:
    table = [
        DType("F64", 64, "<f8", np.dtype("<f8")),
        DType("F32", 32, "<f4", np.dtype("<f4")),
        DType("F16", 16, "<u2", np.dtype("<f2")),
        DType("BF16", 16, "<u2", np.dtype(ml_dtypes.bfloat16)),
        DType("F8_E4M3", 8, "u1", np.dtype(ml_dtypes.float8_e4m3fn)),
        DType("F8_E5M2", 8, "u1", np.dtype(ml_dtypes.float8_e5m2)),
        DType("F8_E4M3FNUZ", 8, "u1", np.dtype(ml_dtypes.float8_e4m3fnuz)),
        DType("F8_E5M2FNUZ", 8, "u1", np.dtype(ml_dtypes.float8_e5m2fnuz)),
        DType("F8_E8M0", 8, "u1", np.dtype(ml_dtypes.float8_e8m0fnu)),
        # Listed so headers validate, left out of the computation (integers, flags, complex, sub-byte).
        DType("BOOL", 8, "u1", None),
        DType("U8", 8, "u1", None),
        DType("I8", 8, "i1", None),
        DType("I16", 16, "<i2", None),
        DType("U16", 16, "<u2", None),
        DType("I32", 32, "<i4", None),
        DType("U32", 32, "<u4", None),
        DType("I64", 64, "<i8", None),
        DType("U64", 64, "<u8", None),
        DType("C64", 64, "<c8", None),
        DType("F4", 4, "u1", None),
        DType("F6_E2M3", 6, "u1", None),
        DType("F6_E3M2", 6, "u1", None),
    ]
    return {d.code: d for d in table}


DTYPES: dict[str, DType] = _dtypes()


@dataclass(frozen=True)
class TensorRef:
    """One tensor of one checkpoint: name, dtype, shape and where its bytes come from.

    The plain source (``source == "bytes"``): the row-major elements lie in one byte range of one file,
    ``nbytes`` from ``offset`` of ``path`` (safetensors, ONNX raw and external data, PyTorch storages).
    Subclasses are the other sources: ``PiecesRef`` (several byte ranges, in element order) and
    ``wdiff.readers.lora.LoraRef`` (computed: a LoRA product). Compute has one path per source kind.
    """

    source: ClassVar[str] = "bytes"

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str  # the file holding the bytes
    offset: int  # absolute byte offset of the first element in ``path``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> DType:
        return DTYPES[self.dtype]

    def files(self) -> tuple[str, ...]:
        """Every file this tensor's bytes are read from."""
        return (self.path,)


@dataclass(frozen=True)
class Piece:
    """``count`` consecutive elements (row-major) of a tensor, from element ``start``, stored from byte
    ``offset`` of ``path``."""

    start: int
    count: int
    path: str
    offset: int


@dataclass(frozen=True)
class PiecesRef(TensorRef):
    """A tensor whose row-major elements lie in several byte ranges, in element order, covering it
    exactly (torch.distributed.checkpoint shards, strided PyTorch views). ``path``/``offset`` are the
    first piece's, ``nbytes`` counts the bytes of every piece."""

    source: ClassVar[str] = "pieces"

    pieces: tuple[Piece, ...] = ()

    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.path, *(p.path for p in self.pieces)]))


@dataclass(frozen=True)
class Skipped:
    """A tensor (or a checkpoint) left out, and why, in words a user reads."""

    name: str
    reason: str


@dataclass(frozen=True)
class Contents:
    """What a reader found in one checkpoint: its tensors, what it saw but could not read, and for a
    pickled checkpoint where the weights were (``state_key``) and the training step it records."""

    tensors: dict[str, TensorRef]
    skipped: tuple[Skipped, ...] = ()
    state_key: str | None = None
    step: int | None = None
