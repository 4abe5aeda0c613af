"""Checkpoints in a remote store, read by byte range with no local copy: ``s3://``, ``gs://``,
``http(s)://`` and ``hf://`` URLs, through fsspec and the filesystems made for each store (s3fs,
gcsfs, fsspec's aiohttp client, huggingface_hub's ``HfFileSystem``).

What the rest of wdiff sees of a store, three things:

- :class:`RemotePath`: the part of ``pathlib`` the scan and the readers use (``name``, ``parent``,
  ``/``, ``is_dir``, ``iterdir``, ``glob`` ...), answered from one listing per folder, so a run folder on
  S3 is found exactly as on disk;
- :func:`open_file`: a seekable binary file over range reads (safetensors headers, side files, a zip's
  directory), read ahead in small blocks;
- :func:`fetch`: the byte ranges one chunk task needs, cut into parts and many of them in flight, with
  retries and back-off on transient errors, put into an in-memory file at their own offsets: the kernels
  then read it by descriptor exactly as they read a local file. Nothing goes to disk.

Every object's identity (its size and the store's tag: an ETag, a Hub LFS sha256 or blob id) is taken
when it is listed; reads of an ``https`` object send it back (``If-Match``), and the Hub is read at a
commit sha, which never changes. A permanent error (404, a refused credential, a revision that does not
exist, a server that ignores ``Range``) is one line naming the URL; a transient one (5xx, 429, a dropped
connection, a short body) is retried with back-off.

This module imports nothing of wdiff but ``wdiff.errors``: ``readers.base`` builds on it.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from wdiff.errors import WdiffError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The packages each protocol needs (fsspec names the missing one too, less plainly).
_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
    "hf": "huggingface_hub",
}  # fmt: skip

# The formats read from local disk only (their readers map or seek through whole files).
LOCAL_ONLY = (
    "{kind} are read from local disk only: copy the checkpoints first (safetensors and PyTorch files are "
    "read remotely)"
)
PART_BYTES = 8 << 20  # one range request: big enough for the link, small enough to retry
IN_FLIGHT = 16  # range requests in flight at once, over every chunk task of this process
READ_AHEAD = 1 << 16  # what a header or side-file read fetches at once
RETRIES = 6  # attempts after the first, for a transient error
BACKOFF = 0.25  # seconds before the first retry; doubled each time, with jitter, at most 8 s


def is_url(path: object) -> bool:
    """Whether ``path`` names an object in a remote store (``scheme://...``, not ``file://``)."""
    if isinstance(path, RemotePath):
        return True
    if not isinstance(path, str):
        return False
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() != "file"


_FOLDED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")  # "s3:/bucket": a URL through pathlib.Path


def is_folded_url(path: object) -> bool:
    """Whether ``path`` is a URL that went through ``pathlib.Path``, which folds ``//`` into ``/``
    (``s3://b`` became ``s3:/b``): a URL given where a local path is needed, or a lost one."""
    return _FOLDED.match(os.fspath(path)) is not None if isinstance(path, (str, os.PathLike)) else False


def protocol_of(url: str) -> str:
    m = _SCHEME.match(url)
    assert m is not None, url
    return m.group(1).lower()


_filesystems: dict[tuple[str, ...], Any] = {}
# The environment that points a protocol's library at another server: a new value, a new filesystem.
_ENDPOINTS = {
    "hf": ("HF_ENDPOINT", "HF_TOKEN"),
    "s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"),
    "gs": ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"),
}
_fs_lock = threading.Lock()


def filesystem(url: str) -> Any:
    """The fsspec filesystem for ``url``'s protocol, one per process, configured from the environment
    (``AWS_*``, ``HF_ENDPOINT``, ``HF_TOKEN``, ``GOOGLE_APPLICATION_CREDENTIALS``) as each library
    reads it."""
    protocol = protocol_of(url)
    key = (protocol, *(os.environ.get(v, "") for v in _ENDPOINTS.get(protocol, ())))
    with _fs_lock:
        fs = _filesystems.get(key)
        if fs is None:
            fs = _filesystems[key] = _make_filesystem(protocol)
    return fs


def _make_filesystem(protocol: str) -> Any:
    try:
        import fsspec

        if protocol == "hf":
            from huggingface_hub import HfFileSystem

            # HF_ENDPOINT read now, not when huggingface_hub was imported
            endpoint = os.environ.get("HF_ENDPOINT") or None
            return HfFileSystem(endpoint=endpoint) if endpoint else HfFileSystem()
        if protocol in ("http", "https"):
            import aiohttp

            # no total time limit (a part of 8 MiB on a slow link); a stalled socket is an error
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
            return fsspec.filesystem(protocol, client_kwargs={"timeout": timeout}, skip_instance_cache=True)
        return fsspec.filesystem(protocol)
    except ImportError as e:
        package = _PACKAGES.get(protocol, e.name or "an fsspec implementation")
        raise WdiffError(
            f"{protocol}://",
            f"reading {protocol}:// needs the {package} package: pip install 'wdiff[remote]'",
        ) from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise WdiffError(f"{protocol}://", f"not a store wdiff can read: {e}") from None


# ---- errors -------------------------------------------------------------------------------------------


class Transient(Exception):
    """A failure worth retrying (5xx, 429, a dropped connection, a short body)."""


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(e, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(e, "response", None)
    value = getattr(response, "status_code", None)
    if isinstance(value, int):
        return value
    if isinstance(response, dict):  # botocore ClientError
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    return None


def store_error(url: str, e: BaseException) -> WdiffError | None:
    """The one-line error for a permanent failure, or None for a transient one."""
    name = type(e).__name__
    if name == "RevisionNotFoundError":
        return WdiffError(url, "no such revision in the repository (404)")
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return WdiffError(url, "repository not found, or it is private or gated and no token gives access")
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError") or isinstance(e, FileNotFoundError):
        return WdiffError(url, "not found (404)")
    if isinstance(e, PermissionError):
        return WdiffError(url, "access denied (401/403): check the store's credentials")
    status = _status(e)
    if status == 412:
        return WdiffError(url, "changed since it was scanned (its ETag no longer matches); run wdiff again")
    if status == 416:
        return WdiffError(url, "the object is shorter than it was when scanned (416 on a range read)")
    if status is not None and 400 <= status < 500 and status not in (408, 425, 429):
        what = {401: "access denied", 403: "access denied", 404: "not found"}.get(status, "refused")
        return WdiffError(url, f"{what} ({status})")
    if isinstance(e, (WdiffError, ValueError, TypeError, NotImplementedError)):
        return e if isinstance(e, WdiffError) else WdiffError(url, f"cannot read: {e}")
    return None  # 5xx, 408, 429, connection errors, time-outs, short bodies: try again


def _retrying(url: str, attempt: Any) -> Any:
    """``attempt()``, retried with exponential back-off and jitter while it fails transiently."""
    delay = BACKOFF
    for n in range(RETRIES + 1):
        try:
            return attempt()
        except Exception as e:  # noqa: BLE001 - sorted into permanent and transient below
            permanent = store_error(url, e)
            if permanent is not None:
                raise permanent from None
            if n == RETRIES:
                why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise WdiffError(url, f"cannot read after {RETRIES + 1} attempts: {why}") from None
            _count(retries=1)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


# ---- objects and their identity -----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One listed object or folder: its kind, size and the store's identity tag."""

    is_dir: bool
    size: int = 0
    tag: str = ""  # ETag, LFS sha256 or git blob id; "" where the store gives none


def _tag(info: dict) -> str:
    lfs = info.get("lfs")
    if isinstance(lfs, dict):
        sha = lfs.get("sha256") or lfs.get("oid")
        if sha:
            return f"sha256:{sha}"
    for key in ("ETag", "etag", "md5Hash", "blob_id", "generation", "VersionId"):
        value = info.get(key)
        if value:
            return str(value).strip('"') if key in ("ETag", "etag") else f"{key}:{value}"
    return ""


def _entry(info: dict) -> Entry:
    """The entry of a listing or an info; a file's size -1 when the store did not say (an HTML listing)."""
    is_dir = info.get("type") == "directory"
    size = info.get("size")
    known = int(size) if isinstance(size, int) else -1
    return Entry(is_dir, 0 if is_dir else known, "" if is_dir else _tag(info))


class _Listings:
    """What one process has listed: each folder once, each object's entry once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.folders: dict[str, dict[str, Entry]] = {}
        self.entries: dict[str, Entry | None] = {}
        self.unlistable: set[str] = set()  # folders the store would not list (a web server without index)


_listed = _Listings()


def forget_listings() -> None:
    """Drop what was listed and read (a new scan of a store sees what is there now), here and in the
    filesystems' own listing caches."""
    with _listed.lock:
        _listed.folders.clear()
        _listed.entries.clear()
        _listed.unlistable.clear()
    with _recent.lock:
        _recent.held.clear()
        _recent.size = 0
    with _fs_lock:
        for fs in _filesystems.values():
            fs.invalidate_cache()


def list_folder(url: str) -> dict[str, Entry]:
    """The children of a remote folder, by name (one listing, remembered for the process)."""
    with _listed.lock:
        known = _listed.folders.get(url)
    if known is not None:
        return known
    fs = filesystem(url)
    target = url + "/" if protocol_of(url) in ("http", "https") else url
    try:
        infos = _retrying(url, lambda: fs.ls(target, detail=True))
    except WdiffError:
        with _listed.lock:
            _listed.unlistable.add(url)
        raise
    children: dict[str, Entry] = {}
    for info in infos:
        name = posixpath.basename(str(info.get("name", "")).rstrip("/"))
        if name and name not in (".", ".."):
            children[unquote(name) if protocol_of(url) in ("http", "https") else name] = _entry(info)
    with _listed.lock:
        _listed.folders[url] = children
        for name, entry in children.items():
            _listed.entries.setdefault(f"{url}/{name}", entry)
    return children


def stat(url: str) -> Entry | None:
    """The entry of ``url`` (None: nothing there), from its folder's listing when that was listed,
    else asked of the store (an ``https`` URL is a file unless it ends in ``/``)."""
    url = _normal(url)
    with _listed.lock:
        known = _listed.entries.get(url, ...)
    if known is not ... and (known is None or known.is_dir or known.size >= 0):
        return known
    fs = filesystem(url)

    def ask() -> Entry | None:
        try:
            info = fs.info(url)
        except FileNotFoundError:
            return None
        if protocol_of(url) in ("http", "https"):
            return Entry(False, int(info.get("size") or 0), _tag(info))
        return _entry(info)

    entry = _retrying(url, ask)
    with _listed.lock:
        _listed.entries[url] = entry
    return entry


def _normal(url: str) -> str:
    """``url`` without a trailing ``/`` and with ``.`` and ``..`` folded (never above its root)."""
    m = _SCHEME.match(url)
    assert m is not None, url
    rest = url[m.end() :]
    trailing = rest.endswith("/")
    root, _, path = rest.partition("/")
    path = posixpath.normpath("/" + path).lstrip("/") if path else ""
    folded = m.group(0) + root + ("/" + path if path else "")
    return folded.rstrip("/") if trailing or folded.endswith("/") else folded


class RemotePath:
    """A URL with the part of ``pathlib.Path`` wdiff's scan and readers use; every answer comes from a
    listing of the folder (made once) or from the store's info on one object."""

    __slots__ = ("url", "folder_hint")

    def __init__(self, url: str | RemotePath, folder_hint: bool = False) -> None:
        text = url.url if isinstance(url, RemotePath) else str(url)
        self.folder_hint = folder_hint or text.endswith("/")
        self.url = _normal(text)

    # -- names
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __fspath__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return unquote(self.url.rsplit("/", 1)[-1]) if "/" in self._rest else unquote(self._rest)

    @property
    def _rest(self) -> str:
        return self.url[_SCHEME.match(self.url).end() :]  # type: ignore[union-attr]

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        suffix = self.suffix
        return self.name[: -len(suffix)] if suffix else self.name

    @property
    def parent(self) -> RemotePath:
        if "/" not in self._rest:
            return self
        return RemotePath(self.url.rsplit("/", 1)[0], folder_hint=True)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self._rest.split("/"))

    def __truediv__(self, part: str | os.PathLike[str]) -> RemotePath:
        text = os.fspath(part)
        if _SCHEME.match(text) or text.startswith("/"):
            return RemotePath(text) if _SCHEME.match(text) else RemotePath(self.url.split("/", 3)[0] + text)
        quoted = quote(text) if protocol_of(self.url) in ("http", "https") else text
        return RemotePath(f"{self.url}/{quoted}")

    def joinpath(self, *parts: str) -> RemotePath:
        out = self
        for p in parts:
            out = out / p
        return out

    def resolve(self) -> RemotePath:
        return self

    def is_relative_to(self, other: RemotePath | str) -> bool:
        base = other.url if isinstance(other, RemotePath) else _normal(str(other))
        return self.url == base or self.url.startswith(base + "/")

    def relative_to(self, other: RemotePath | str) -> str:
        base = other.url if isinstance(other, RemotePath) else _normal(str(other))
        if not self.is_relative_to(base):
            raise ValueError(f"{self.url} is not under {base}")
        return unquote(self.url[len(base) + 1 :])

    # -- what is there
    def _entry(self) -> Entry | None:
        parent = self.parent
        if parent.url != self.url and _is_listed_folder(parent):
            try:
                return list_folder(parent.url).get(self.name)
            except WdiffError:  # the folder cannot be listed (a web server without an index): ask
                pass
        if self.folder_hint and protocol_of(self.url) in ("http", "https"):
            try:
                list_folder(self.url)
            except WdiffError:
                return None
            return Entry(True)
        return stat(self.url)

    def exists(self) -> bool:
        return self._entry() is not None

    def is_dir(self) -> bool:
        entry = self._entry()
        return entry is not None and entry.is_dir

    def is_file(self) -> bool:
        entry = self._entry()
        return entry is not None and not entry.is_dir

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[RemotePath]:
        if not self.is_dir():
            raise WdiffError(self.url, "not a folder")
        web = protocol_of(self.url) in ("http", "https")
        for name, entry in sorted(list_folder(self.url).items()):
            yield RemotePath(f"{self.url}/{quote(name) if web else name}", folder_hint=entry.is_dir)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Children matching ``pattern``, one ``fnmatch`` pattern per ``/``-separated level."""
        level, _, deeper = pattern.partition("/")
        if not self.is_dir():
            return
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, level):
                if deeper:
                    yield from child.glob(deeper)
                else:
                    yield child


def _is_listed_folder(folder: RemotePath) -> bool:
    """Whether ``folder`` is a folder whose listing answers for its children (known without asking when
    it was listed already, else asked once)."""
    with _listed.lock:
        if folder.url in _listed.folders:
            return True
        if folder.url in _listed.unlistable:
            return False
        known = _listed.entries.get(folder.url, ...)
    if known is ...:
        if folder.folder_hint and protocol_of(folder.url) in ("http", "https"):
            return True
        if protocol_of(folder.url) in ("http", "https"):
            return False  # a listing of an https URL that may be a file downloads the file
        try:
            known = stat(folder.url)
        except WdiffError:
            return False
    return known is not None and known.is_dir  # type: ignore[union-attr]


def location(path: str | os.PathLike[str]) -> Any:
    """``RemotePath`` for a URL, ``pathlib.Path`` otherwise (``file://`` is a local path)."""
    from pathlib import Path

    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path)
    if is_url(text):
        return RemotePath(text)
    if text.startswith("file://"):
        return Path(unquote(text[len("file://") :]))
    return Path(text)


# ---- reading ------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """What this process asked of remote stores: range requests answered, bytes they brought, retries."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    cached: int = 0  # small reads answered from the cache of recent ones


counts = Counts()
_counts_lock = threading.Lock()


def _count(**add: int) -> None:
    with _counts_lock:
        for k, v in add.items():
            setattr(counts, k, getattr(counts, k) + v)


class _Recent:
    """The last small reads of headers and side files (``RangeFile``), by exact range, so that sniffing
    a file's format and then parsing its header does not read the same bytes twice."""

    LIMIT = 64 << 20  # bytes held at most
    BIGGEST = 1 << 20  # reads above this are not kept

    def __init__(self) -> None:
        from collections import OrderedDict

        self.lock = threading.Lock()
        self.held: OrderedDict[tuple[str, str, int, int], bytes] = OrderedDict()
        self.size = 0

    def get(self, key: tuple[str, str, int, int]) -> bytes | None:
        with self.lock:
            data = self.held.get(key)
            if data is not None:
                self.held.move_to_end(key)
            return data

    def prefix(self, url: str, tag: str, start: int, end: int) -> bytes:
        """The longest start of bytes [start, end) of ``url`` that a held read covers."""
        best = b""
        with self.lock:
            for (u, t, a, b), data in self.held.items():
                if u == url and t == tag and a <= start < b and b - start > len(best):
                    best = data[start - a : min(b, end) - a]
        return best

    def put(self, key: tuple[str, str, int, int], data: bytes) -> None:
        if len(data) > self.BIGGEST:
            return
        with self.lock:
            if key not in self.held:
                self.held[key] = data
                self.size += len(data)
            while self.size > self.LIMIT:
                self.size -= len(self.held.popitem(last=False)[1])


_recent = _Recent()


def _read_range(url: str, start: int, end: int, tag: str, size: int) -> bytes:
    """Bytes [start, end) of ``url``, retried; a body of another length is refused (a server that
    ignores ``Range`` sends the whole object), never used."""
    fs = filesystem(url)
    kwargs: dict[str, Any] = {}
    if tag and protocol_of(url) in ("http", "https") and not tag.startswith("W/"):
        kwargs["headers"] = {"If-Match": f'"{tag}"'}
    if protocol_of(url) == "hf":  # the Hub's file object: the bytes asked for, no read-ahead block
        kwargs["cache_type"] = "none"

    def attempt() -> bytes:
        data = fs.cat_file(url, start=start, end=end, **kwargs)
        _count(requests=1, bytes=len(data))
        if len(data) == end - start:
            return data
        if size and len(data) == size:  # and not the length asked for
            raise WdiffError(
                url, "the server ignores HTTP Range requests (it sent the whole object): wdiff reads remote "
                "checkpoints by range; copy them to local disk and run wdiff there",
            )  # fmt: skip
        raise Transient(f"short read: {len(data)} of {end - start} bytes from offset {start}")

    return _retrying(url, attempt)


class PositionedFile(io.RawIOBase):
    """A read-only, seekable raw file of ``size`` bytes whose subclass reads at ``pos`` (``readinto``):
    a remote object here, one item of a DCP file in ``readers.dcp``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.pos = size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self.pos = base + offset
        return self.pos


class RangeFile(PositionedFile):
    """A remote object as a seekable raw binary file: every read is a range request."""

    def __init__(self, url: str, entry: Entry) -> None:
        super().__init__(entry.size)
        self.url, self.tag = url, entry.tag

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.size, self.pos + len(view))
        if end <= self.pos:
            return 0
        key = (self.url, self.tag, self.pos, end)
        data = _recent.get(key) if self.tag else None  # without a tag, nothing says it is the same object
        if data is None:
            data = _read_range(self.url, self.pos, end, self.tag, self.size)
            if self.tag:
                _recent.put(key, data)
        else:
            _count(cached=1)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_file(
    url: str, expected_size: int | None = None, expected_tag: str | None = None
) -> io.BufferedReader:
    """A remote object opened for reading; refused when it is a folder, missing, or no longer the
    object scanned (``expected_size``/``expected_tag``)."""
    entry = stat(url)
    if entry is None:
        raise WdiffError(url, "not found (404)")
    if entry.is_dir:
        raise WdiffError(url, "cannot read: a folder, not a file")
    if expected_size is not None and (entry.size, entry.tag) != (expected_size, expected_tag or entry.tag):
        raise WdiffError(url, f"changed since it was scanned (size {expected_size} -> {entry.size} bytes)")
    return io.BufferedReader(RangeFile(_normal(url), entry), READ_AHEAD)


def refresh(url: str) -> Entry | None:
    """The object's entry asked of the store again now (to see that it did not change)."""
    url = _normal(url)
    with _listed.lock:
        _listed.entries.pop(url, None)
    return stat(url)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="wdiff-fetch")
        return _pool


@dataclass(frozen=True)
class Want:
    """Bytes [offset, offset + nbytes) of ``url``, scanned with this size and tag."""

    url: str
    offset: int
    nbytes: int
    size: int = 0
    tag: str = ""


def fetch(wants: Sequence[Want]) -> dict[str, int]:
    """Every range of ``wants``, read at once (cut into parts of ``PART_BYTES``, ``IN_FLIGHT`` at a time
    for the whole process), each written at its own offset into one in-memory file per URL. Returns
    the descriptors by URL; the caller closes them. A file's unread regions are holes that take no
    memory; only the ranges asked for are held."""
    parts = [
        (w, at, min(at + PART_BYTES, w.offset + w.nbytes))
        for w in _coalesced(wants)
        for at in range(w.offset, w.offset + w.nbytes, PART_BYTES)
    ]
    fds: dict[str, int] = {}
    try:
        for w in wants:
            if w.url not in fds:
                fds[w.url] = _memory_file(w.url)
        pool = _fetch_pool()
        # each part is written by the thread that read it, as it arrives: no part's bytes outlive it
        futures = [pool.submit(_fetch_part, fds[w.url], w, a, b) for w, a, b in parts]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _fetch_part(fd: int, w: Want, start: int, end: int) -> None:
    """Bytes [start, end) of ``w.url`` read and written at ``start`` of the in-memory file ``fd``."""
    data = _read_part(w, start, end)
    if os.pwrite(fd, data, start) != len(data):
        raise WdiffError(w.url, "could not hold the bytes read in memory")


def _read_part(w: Want, start: int, end: int) -> bytes:
    """Bytes [start, end) of ``w.url``: what a header read brought already (a small file is read
    whole with its header), then the rest from the store."""
    have = _recent.prefix(w.url, w.tag, start, end) if w.tag else b""
    if have:
        _count(cached=1)
    if len(have) == end - start:
        return have
    return have + _read_range(w.url, start + len(have), end, w.tag, w.size)


MERGE_GAP = 1 << 18  # two ranges of one object closer than this are read in one request


def _coalesced(wants: Sequence[Want]) -> list[Want]:
    """The ranges of each object sorted, overlapping or nearby ones merged (the small tensors of one
    safetensors file lie side by side), empty ones dropped."""
    merged: list[Want] = []
    for w in sorted((w for w in wants if w.nbytes > 0), key=lambda w: (w.url, w.offset)):
        last = merged[-1] if merged else None
        if last is not None and last.url == w.url and w.offset <= last.offset + last.nbytes + MERGE_GAP:
            end = max(last.offset + last.nbytes, w.offset + w.nbytes)
            merged[-1] = Want(last.url, last.offset, end - last.offset, last.size, last.tag)
        else:
            merged.append(w)
    return merged


def _memory_file(name: str) -> int:
    """An anonymous file in memory (Linux ``memfd``), else an unnamed temporary file."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("wdiff-" + posixpath.basename(name)[:200], os.MFD_CLOEXEC)
    import tempfile

    return os.dup(tempfile.TemporaryFile().fileno())
