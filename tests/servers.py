"""Real local servers for the remote-input tests (s3://, https://, hf://), each in its own process.

The real services (AWS S3, a web server, the Hugging Face Hub) are not reachable from the test
machines, so the tests start local stand-ins on 127.0.0.1 (a free port chosen by the child process
itself) and talk to them through the real client libraries (s3fs/aiobotocore, fsspec's
HTTPFileSystem/aiohttp, huggingface_hub's HfFileSystem/HfApi/httpx2). Every server is a child
process (``python tests/servers.py KIND CONFIG``), so it never competes for the test process's GIL.
A child stops by itself when its stdin reaches EOF, which is when the test process closes it at
teardown or when the test process dies in any way; a child also stops after ``MAX_LIFETIME``
seconds (1 h, env ``WDIFF_TEST_SERVER_MAX_LIFETIME``) whatever happens. Teardown also terminates,
then kills, a child that has not gone within seconds.

Fixtures (registered by ``pytest_plugins = ["servers"]`` in tests/conftest.py) and helpers:

* ``s3_server`` (session): the endpoint URL of a moto S3 server; ``s3_env``: the environment in
  which a plain ``s3fs.S3FileSystem()`` reaches it (yields the endpoint);
  ``upload_folder(endpoint, local_dir, "s3://bucket/prefix")``, ``s3_storage_options(endpoint)``,
  ``s3_env_vars(endpoint)``, ``s3_reset(endpoint)``.
* ``http_server``: factory ``http_server(root_dir, **faults) -> base URL``.
* ``hub_server``: factory ``hub_server({"org/model": {"step0": dir0, ...}}, lfs_redirect=True,
  page_size=None, **faults) -> endpoint URL``; ``hf_env``: ``hf_env(endpoint)`` points
  huggingface_hub at it; ``hub_reload(url, repos=None)``, ``hub_commit_sha(url, repo, revision)``.
* ``start_s3_server()``, ``start_http_server(...)``, ``start_hub_server(...)``: the same servers
  outside a test (e.g. in a module-scoped fixture); stop them with ``url.stop()``.

Every URL returned is a ``ServerURL``: a ``str`` with ``.log()``, ``.reset()``, ``.log_path``,
``.stop()`` (and ``.cdn`` for the Hub); pickled or copied, it is a plain ``str``. The factory
fixtures stop their servers when the test ends, failed or not.

What each server emulates, and what it does not
-----------------------------------------------

S3 (``s3_server``, ``start_s3_server``): moto's own server (``moto.server.ThreadedMotoServer``,
the WSGI app ``python -m moto.server`` runs) in a child process: moto's S3 emulation (buckets,
ListObjectsV2, HEAD, ranged GET with 206, ETag, multipart uploads). It keeps no request log. Any
credentials are accepted; no TLS; virtual-host addressing is not used (path style on 127.0.0.1). Plain
``s3fs.S3FileSystem()`` with no arguments reaches it when these are set (``s3_env`` sets them):
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``; botocore 1.43 honours both, checked with
s3fs 2026.9 + aiobotocore 3.10), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (any value),
``AWS_DEFAULT_REGION=us-east-1``; ``s3_env`` also points ``AWS_CONFIG_FILE`` and
``AWS_SHARED_CREDENTIALS_FILE`` at nothing and unsets ``AWS_PROFILE``/``AWS_SESSION_TOKEN`` so a
developer's ~/.aws cannot redirect the tests, and clears s3fs's instance cache before and after the
test (``S3FileSystem()`` made earlier with other settings would otherwise be reused).

HTTP (``http_server``, ``start_http_server``): a static file server for one local folder
(``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive, one thread per connection). GET/HEAD;
single byte ranges ``bytes=a-b``, ``bytes=a-``, ``bytes=-n`` answered 206 with ``Content-Range``
and ``Content-Length``; 416 with ``Content-Range: bytes */size`` when unsatisfiable; a multi-range
or malformed ``Range`` is ignored (200 and the whole body, which RFC 9110 allows); ``If-Range``
(ETag or date) honoured; ``Accept-Ranges: bytes``, a strong ``ETag`` (inode, size, mtime_ns: it
changes when a file is rewritten) and ``Last-Modified`` on every file. A folder URL ending in ``/``
gives an HTML listing with relative links (``name``, ``sub/``, and ``../``), which is what
fsspec's ``HTTPFileSystem.ls``/``find`` parse; a folder URL without the slash redirects (301) to
it; anything else missing is 404. Not emulated: compression, 304/If-None-Match, auth, TLS.

Hugging Face Hub (``hub_server``, ``start_hub_server``): the endpoints huggingface_hub 2.4.0's
``HfFileSystem`` and ``HfApi`` call for reading model repos, read from their source:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info with ``sha``,
  ``siblings`` (with ``size``/``blobId``/``lfs`` when ``blobs=true``), ``lastModified``;
  ``expand=`` keeps only the named properties. ``HfFileSystem`` calls it once per repo and
  revision to check they exist.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=``: entries
  ``{type, oid, size, path}`` and ``lfs: {oid (sha256), size, pointerSize}`` for LFS files;
  folders are entries too (also in recursive listings, as on the Hub); with ``expand=true``
  ``lastCommit {id, title, date}`` and ``securityFileStatus``. Paginated with a ``Link: <...>;
  rel="next"`` header and an opaque cursor, 1000 entries a page (50 with expand) as on the Hub,
  or ``page_size`` entries. A missing path is 404 ``EntryNotFound``; a file path lists the file.
* ``POST /api/models/{repo}/paths-info/{rev}`` (form or JSON ``paths``, ``expand``): the same
  entries for the paths that exist (``HfFileSystem.info`` calls it when the parent listing is not
  cached, and always with ``expand_info=True``).
* ``GET /api/models/{repo}/refs``: ``branches`` (``name``, ``ref``, ``targetCommit``), empty
  ``tags``/``converts`` (and ``pullRequests`` with ``include_prs``).
* ``GET /api/models/{repo}/commits/{rev}``: the revision's one commit (``HfFileSystem.info`` of the
  repo root with ``expand_info=True`` uses it).
* ``GET``/``HEAD /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit`` on every answer. A plain (git)
  file is served right there (200/206/416 with ranges as above, ``ETag: "<git blob sha1>"``). An LFS
  file is, as on the Hub, a 302 to a "CDN" on a second port of the same child process (a
  different origin, so huggingface_hub does not follow it for metadata and does for content), with
  ``X-Linked-Size``, ``X-Linked-Etag: "<sha256>"`` and ``ETag`` on the 302; the CDN serves
  ``/lfs/<sha256>`` with ranges and ``ETag: "<sha256>"``. ``lfs_redirect=False`` serves LFS bytes
  from ``resolve`` directly instead (with the same ``X-Linked-*`` headers).

Revisions are branches, one per folder given (``{"org/model": {"step0": dir0, ...}}``); each has
its own 40-hex commit sha (deterministic: sha1 of repo, branch and content) and can also be asked
for by that sha. If no ``main`` is given, ``main`` is the last branch listed (same commit, as
when a trainer pushes to main and branches from it). Revisions containing ``/`` work URL-encoded
(``%2F``, which is how huggingface_hub sends them) and plain. A file is LFS when its name matches
the Hub's default ``.gitattributes`` patterns (``*.safetensors``, ``*.bin``, ``*.pt``, ...) or it
is 10 MiB or more; blob oids are real git blob sha1s (of the LFS pointer for LFS files). Errors
are the Hub's: 404 with ``X-Error-Code: RepoNotFound`` (missing repo, or any dataset/space),
``RevisionNotFound`` (missing revision) and ``EntryNotFound`` (missing path), which huggingface_hub
maps to ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``EntryNotFoundError``
(``HfFileSystem`` turns all three into ``FileNotFoundError``). The repo holds exactly the files of
the folder (the real Hub always adds ``.gitattributes``; put one in the folder to have it). Files
are hashed when the server starts: after changing them (or to add a branch, as a trainer pushing a
checkpoint would), call ``hub_reload(url, repos)``.

Not emulated by the Hub server: Xet (no ``xetHash`` in listings, no ``X-Xet-*`` headers, so
huggingface_hub reads with plain HTTP range requests whether or not hf-xet is installed), auth
(any or no token is accepted; gated/private repos do not exist), tags, pull requests, datasets,
spaces, buckets, uploads/commits, rate limits, the web pages (``/tree/``, ``/blob/``).

Point huggingface_hub at it with ``HfFileSystem(endpoint=URL)`` / ``HfApi(endpoint=URL)``. The
``HF_ENDPOINT`` environment variable is read once, when huggingface_hub is imported
(``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE``), so setting it later only
reaches child processes; the ``hf_env`` fixture sets it for children and patches both constants
for this process (both are needed: ``hf_hub_url`` builds from the template and swaps the endpoint
only when its prefix matches ``ENDPOINT``). It also sets ``HF_HUB_DISABLE_XET=1`` (not needed with
this server, which never offers Xet, but it keeps a client from trying), unsets ``HF_HUB_OFFLINE``
(offline mode refuses every request before it is sent; read at import too, so the constant is
patched), and points ``HF_HOME``/``HF_HUB_CACHE`` at a temporary folder.

Faults and the request log (HTTP and Hub servers)
-------------------------------------------------

``fail_every=N``: every Nth counted request (deterministic, by a counter in the server; only
requests whose path matches the regex ``fail_match`` are counted when it is given) fails, with the
kinds in ``fail_kinds`` taken in turn: ``"503"`` (503 Service Unavailable, no Retry-After),
``"drop"`` (headers with the full Content-Length, then half the body, then the connection is
closed; a HEAD or an empty body is closed before the headers instead), ``"close"`` (connection
closed before any header). At most ``max_failures`` (default 50) failures are injected, so a
retrying client always gets through. ``ignore_range=True`` answers every GET of a file with 200 and
the whole body, whatever its Range, and sends no ``Accept-Ranges``. ``delay`` (seconds) waits
before every answer.

Every request except the admin ones is logged as ``{"n", "server" ("http", "hub" or "cdn"),
"method", "path" (raw, without the query), "query", "range" (the Range header or None), "status"
(0 when closed before the headers), "bytes" (body bytes sent), "fault" (None, "503", "drop",
"close"), "in_flight" (requests being answered at that moment, this one included: more than one
means they overlapped), "t"}``; a record is written before the body is sent, so it is there when
the client has the bytes. Read it with ``url.log()`` (GET ``/__log__``) or from the JSON-lines file
``url.log_path``; ``url.reset()`` (POST ``/__reset__``) empties it and restarts the fault counter.
Admin requests are never logged nor failed.

What the clients do (found with these servers; pinned in tests/test_servers.py)
--------------------------------------------------------------------------------

* s3fs 2026.9: ``cat_file(path, version_id=None, start=None, end=None)``: pass start/end by keyword.
* fsspec's HTTPFileSystem (aiohttp 3.14): no retry of a 503 (``ClientResponseError``) nor of a body
  cut short (``ClientPayloadError``); aiohttp itself re-sends an idempotent request once when a
  reused keep-alive connection closes before the response headers. Against a server that ignores
  Range, ``cat_file(url, start, end)`` returns the whole body unchecked; a file object reads from
  offset 0 by truncating the whole body and raises ``ValueError`` for any other offset.
* huggingface_hub 2.4 (HfFileSystem): listings go through ``tree`` (in parallel for recursive
  ones), ``info`` through the cached parent listing or ``paths-info``; file reads are GETs of
  ``resolve`` with a ``Range`` header, re-sent to the CDN after the 302 of an LFS file. Ranged reads
  go through ``http_backoff``: 5xx and broken connections are retried (sleeping 1, 2, 4... s).
  ``cat_file`` and buffered files read ahead a whole block (5 MiB by default) past the bytes asked
  for; ``cache_type="none"`` reads exactly; ``read()`` of a whole file streams it with one GET.
  A ranged answer is not checked: a server that ignores Range makes a read at an offset return the
  start of the file, silently.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import email.utils
import fnmatch
import hashlib
import html
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

MAX_LIFETIME = float(os.environ.get("WDIFF_TEST_SERVER_MAX_LIFETIME", "3600"))
START_TIMEOUT = 60.0  # seconds for a child to say it listens (moto imports take a few)
S3_REGION = "us-east-1"
S3_KEY = "testing"
S3_SECRET = "testing"

# --------------------------------------------------------------------------------------------------
# Parent side: start a child, wait until it listens, stop it


class ServerURL(str):
    """The base URL of a running server (a ``str``), with its request log and its process."""

    process: ServerProcess

    def __new__(cls, url: str, process: ServerProcess):
        obj = super().__new__(cls, url)
        obj.process = process
        return obj

    @property
    def log_path(self) -> Path:
        """The JSON-lines request log (HTTP and Hub servers)."""
        return self.process.log_path

    @property
    def cdn(self) -> str | None:
        """Hub server: base URL of its LFS "CDN" port."""
        port = self.process.info.get("cdn_port")
        return f"http://127.0.0.1:{port}" if port else None

    def log(self) -> list[dict[str, Any]]:
        """Every request logged since start or the last ``reset()`` (HTTP and Hub servers)."""
        with urllib.request.urlopen(self.rstrip("/") + "/__log__", timeout=30) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        """Empty the request log and restart the fault counter."""
        _post_json(self.rstrip("/") + "/__reset__", {})

    def stop(self) -> None:
        self.process.stop()

    def __reduce__(self):  # pickled (e.g. to a dask worker) or copied: a plain str, not the process
        return (str, (str(self),))


def _post_json(url: str, payload: Any) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


class ServerProcess:
    """One server in a child process; ``start()`` returns when it accepts connections."""

    def __init__(self, kind: str, config: Mapping[str, Any]):
        self.kind = kind
        self.config = dict(config)
        self.dir = Path(tempfile.mkdtemp(prefix=f"wdiff-{kind}-server-"))
        self.log_path = self.dir / "requests.jsonl"
        self.config.setdefault("log_path", str(self.log_path))
        self.config.setdefault("max_lifetime", MAX_LIFETIME)
        self.config["owned_dir"] = str(self.dir)  # the child removes it when it exits
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.url: ServerURL | None = None

    def start(self, timeout: float = START_TIMEOUT) -> ServerURL:
        cfg = self.dir / "config.json"
        cfg.write_text(json.dumps(self.config))
        self._stderr = open(self.dir / "stderr.txt", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), self.kind, str(cfg)],
            stdin=subprocess.PIPE,  # never written: its EOF (we close it, or we die) stops the child
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(self.dir),
            start_new_session=True,  # a Ctrl-C in the terminal is the test run's, not the servers'
        )
        _RUNNING.add(self)
        try:
            line = self._read_ready_line(timeout)
            self.info = json.loads(line)
        except BaseException:
            self.stop()
            raise
        self.url = ServerURL(f"http://127.0.0.1:{self.info['port']}", self)
        return self.url

    def _read_ready_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"{self.kind} server did not start in {timeout:.0f} s{self._stderr_tail()}"
                )
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise RuntimeError(
                        f"{self.kind} server exited ({self.proc.returncode}) before listening"
                        f"{self._stderr_tail()}"
                    )
                buf += chunk
        return buf.decode().strip().splitlines()[-1]

    def _stderr_tail(self) -> str:
        try:
            self._stderr.flush()
            text = (self.dir / "stderr.txt").read_text(errors="replace")
        except OSError:
            return ""
        return ":\n" + text[-4000:] if text.strip() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the child's stdin EOF: it exits by itself
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            with contextlib.suppress(OSError):
                proc.stdout.close()
        with contextlib.suppress(Exception):
            self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ServerURL:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_RUNNING: set[ServerProcess] = set()


@atexit.register
def _stop_all() -> None:  # servers started outside fixtures, or a fixture teardown that never ran
    for p in list(_RUNNING):
        p.stop()


_FAULT_KEYS = ("fail_every", "fail_kinds", "fail_match", "max_failures", "ignore_range", "delay")


def _faults(kw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(kw) - set(_FAULT_KEYS)
    if unknown:
        raise TypeError(f"unknown server options: {sorted(unknown)}")
    out = dict(kw)
    if "fail_kinds" in out:
        kinds = [out["fail_kinds"]] if isinstance(out["fail_kinds"], str) else list(out["fail_kinds"])
        bad = set(kinds) - {"503", "drop", "close"}
        if bad or not kinds:
            raise ValueError(f"fail_kinds are '503', 'drop', 'close'; got {kinds}")
        out["fail_kinds"] = kinds
    return out


def start_s3_server() -> ServerURL:
    """A moto S3 server process; returns its endpoint URL. Stop it with ``url.stop()``."""
    return ServerProcess("s3", {}).start()


def start_http_server(root_dir: str | os.PathLike, **faults: Any) -> ServerURL:
    """A static file server for ``root_dir`` (options: see the module docstring)."""
    root = Path(root_dir).resolve()
    if not root.is_dir():
        raise NotADirectoryError(root)
    return ServerProcess("http", {"root": str(root), **_faults(faults)}).start()


def _hub_repos_config(repos: Mapping[str, Mapping[str, str | os.PathLike]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for repo_id, revisions in repos.items():
        if repo_id.count("/") != 1:
            raise ValueError(f"repo ids are 'namespace/name', got {repo_id!r}")
        if not revisions:
            raise ValueError(f"{repo_id}: give at least one revision")
        out[repo_id] = {}
        for rev, folder in revisions.items():
            folder = Path(folder).resolve()
            if not folder.is_dir():
                raise NotADirectoryError(folder)
            out[repo_id][str(rev)] = str(folder)
    return out


def start_hub_server(
    repos: Mapping[str, Mapping[str, str | os.PathLike]],
    *,
    lfs_redirect: bool = True,
    page_size: int | None = None,
    **faults: Any,
) -> ServerURL:
    """A Hugging Face Hub emulation for ``{"org/model": {"step0": dir0, ...}}``; returns its endpoint."""
    config = {
        "repos": _hub_repos_config(repos),
        "lfs_redirect": bool(lfs_redirect),
        "page_size": page_size,
        **_faults(faults),
    }
    return ServerProcess("hub", config).start()


def hub_reload(url: str, repos: Mapping[str, Mapping[str, str | os.PathLike]] | None = None) -> None:
    """Rescan the Hub server's folders (after files changed), or serve ``repos`` from now on
    (e.g. with a new branch, as when a trainer pushes a checkpoint)."""
    _post_json(url.rstrip("/") + "/__reload__", {"repos": _hub_repos_config(repos) if repos else None})


def hub_commit_sha(url: str, repo_id: str, revision: str) -> str:
    """The commit sha the Hub server gives ``revision`` (what ``HfApi.model_info(...).sha`` says)."""
    rev = quote(revision, safe="")
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/models/{repo_id}/revision/{rev}", timeout=30) as r:
        return json.loads(r.read())["sha"]


# --------------------------------------------------------------------------------------------------
# S3 helpers (test process)


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    """Explicit s3fs arguments for the moto server (no environment needed)."""
    return {
        "endpoint_url": endpoint,
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"region_name": S3_REGION},
    }


def s3_env_vars(endpoint: str) -> dict[str, str | None]:
    """The environment that makes a plain ``s3fs.S3FileSystem()`` reach ``endpoint`` (None: unset)."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_DEFAULT_PROFILE": None,
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": None,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def upload_folder(endpoint: str, local_dir: str | os.PathLike, url: str) -> list[str]:
    """Upload the tree under ``local_dir`` to ``s3://bucket/prefix`` on ``endpoint`` (the bucket is
    created if needed); returns the keys written, as ``bucket/prefix/relative/path``."""
    import s3fs

    if not url.startswith("s3://"):
        raise ValueError(f"expected s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options(endpoint))
    if not fs.exists(bucket):
        # not fs.mkdir: it sends LocationConstraint=us-east-1, which S3 (and moto) refuse for that region
        fs.call_s3("create_bucket", Bucket=bucket)
        fs.invalidate_cache()
    root = Path(local_dir)
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        key = f"{bucket}/{prefix}/{rel}" if prefix else f"{bucket}/{rel}"
        fs.put_file(str(path), key)
        keys.append(key)
    fs.invalidate_cache()
    return keys


def s3_reset(endpoint: str) -> None:
    """Forget every bucket on the moto server (moto's own reset API)."""
    req = urllib.request.Request(endpoint.rstrip("/") + "/moto-api/reset", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=30).close()


def _forget_hf_filesystems() -> None:
    """Drop cached ``HfFileSystem`` instances: a later server may get the same port, and a cached
    instance for that endpoint would answer from the listings and revisions of the old one."""
    module = sys.modules.get("huggingface_hub.hf_file_system")
    if module is not None:
        module.HfFileSystem.clear_instance_cache()


# --------------------------------------------------------------------------------------------------
# pytest fixtures (registered by tests/conftest.py: pytest_plugins = ["servers"])

try:
    import pytest
except ImportError:  # the child processes do not need pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[ServerURL]:
        """Endpoint URL of a moto S3 server process, for the whole session (buckets persist: use
        names of your own, or ``s3_reset(endpoint)``)."""
        url = start_s3_server()
        try:
            yield url
        finally:
            url.stop()

    @pytest.fixture
    def s3_env(monkeypatch, s3_server) -> Iterator[str]:
        """Environment in which ``s3fs.S3FileSystem()`` (no arguments) reaches ``s3_server``."""
        import s3fs

        for name, value in s3_env_vars(s3_server).items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield str(s3_server)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()

    def _factory(start: Callable[..., ServerURL]) -> Iterator[Callable[..., ServerURL]]:
        """A fixture's factory: ``start(...)`` servers, each stopped when the test ends."""
        started: list[ServerURL] = []

        def make(*args: Any, **options: Any) -> ServerURL:
            url = start(*args, **options)
            started.append(url)
            return url

        try:
            yield make
        finally:
            for url in started:
                url.stop()

    @pytest.fixture
    def http_server() -> Iterator[Callable[..., ServerURL]]:
        """Factory ``http_server(root_dir, **faults) -> base URL``; servers stop after the test."""
        yield from _factory(start_http_server)

    @pytest.fixture
    def hub_server() -> Iterator[Callable[..., ServerURL]]:
        """Factory ``hub_server({"org/model": {"step0": dir0, ...}}, lfs_redirect=True,
        page_size=None, **faults) -> endpoint URL``; servers stop after the test."""
        try:
            yield from _factory(start_hub_server)
        finally:
            _forget_hf_filesystems()

    @pytest.fixture
    def hf_env(monkeypatch, tmp_path) -> Callable[[str], None]:
        """``hf_env(endpoint)``: huggingface_hub (this process and its children) uses ``endpoint``."""

        def use(endpoint: str) -> None:
            from huggingface_hub import constants

            endpoint = str(endpoint).rstrip("/")
            home = tmp_path / "hf_home"
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
            monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
            monkeypatch.setenv("HF_HOME", str(home))
            monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
            monkeypatch.setattr(
                constants,
                "HUGGINGFACE_CO_URL_TEMPLATE",
                endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            )
            monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))

        return use


# --------------------------------------------------------------------------------------------------
# Child side: shared request handling (faults, log, ranges)

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """``(first, last)`` inclusive for a satisfiable single range; False when unsatisfiable (416);
    None when there is no Range or it is ignored (multi-range, malformed): the whole body, 200."""
    if header is None:
        return None
    m = _RANGE_RE.match(header)
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.groups()
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return (max(0, size - n), size - 1)
    a = int(first)
    if last != "" and int(last) < a:
        return None
    if a >= size:
        return False
    return (a, size - 1 if last == "" else min(int(last), size - 1))


class _State:
    """What the server threads share: options, the fault counter and the request log."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.lock = threading.Lock()
        self.fail_every = int(config.get("fail_every") or 0)
        self.fail_kinds = list(config.get("fail_kinds") or ["503"])
        self.fail_match = re.compile(config["fail_match"]) if config.get("fail_match") else None
        self.max_failures = int(config.get("max_failures", 50))
        self.ignore_range = bool(config.get("ignore_range"))
        self.delay = float(config.get("delay") or 0)
        self.log_path = config.get("log_path")
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.counter = 0
            self.failures = 0
            self.records: list[dict[str, Any]] = []
            if self.log_path:
                open(self.log_path, "w").close()

    def fault_for(self, path: str) -> str | None:
        with self.lock:
            if self.fail_match is not None and not self.fail_match.search(path):
                return None
            self.counter += 1
            if self.fail_every and self.counter % self.fail_every == 0 and self.failures < self.max_failures:
                kind = self.fail_kinds[self.failures % len(self.fail_kinds)]
                self.failures += 1
                return kind
            return None

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Counts the requests being answered (``in_flight`` in the log: several at once = threaded)."""
        with self.lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1

    def record(self, rec: dict[str, Any]) -> None:
        with self.lock:
            rec["n"] = len(self.records) + 1
            rec["in_flight"] = self.in_flight
            self.records.append(rec)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")


class _Body:
    """A response body: bytes, or a slice of a local file read when sent."""

    def __init__(
        self, data: bytes = b"", path: str | None = None, offset: int = 0, length: int | None = None
    ):
        self.data, self.path, self.offset = data, path, offset
        self.length = len(data) if path is None else int(length or 0)

    def chunks(self, limit: int) -> Iterator[bytes]:
        if self.path is None:
            yield self.data[:limit]
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = min(limit, self.length)
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients use it
    server_version = "wdiff-test-server"
    sys_version = ""
    timeout = 30  # an idle keep-alive connection is closed after this: no thread waits for ever
    server_name_in_log = "http"
    state: _State  # set on the subclass made for each server

    def log_message(self, format, *args):  # noqa: A002 - the request log is ours
        pass

    # ---- plumbing
    def _split(self) -> tuple[str, str]:
        parts = urlsplit(self.path)
        return parts.path, parts.query

    def _admin(self) -> bool:
        raw, _ = self._split()
        if raw == "/__log__" and self.command == "GET":
            with self.state.lock:
                data = json.dumps(self.state.records).encode()
            self._plain(200, {"Content-Type": "application/json"}, data)
        elif raw == "/__reset__" and self.command == "POST":
            self._read_body()
            self.state.reset()
            self._plain(200, {"Content-Type": "application/json"}, b"{}")
        elif raw == "/__reload__" and self.command == "POST" and hasattr(self, "admin_reload"):
            self.admin_reload(json.loads(self._read_body() or b"{}"))
            self._plain(200, {"Content-Type": "application/json"}, b"{}")
        else:
            return False
        return True

    def _plain(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
        """An admin answer: not logged, never failed."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status: int, headers: Mapping[str, str], body: _Body, fault: str | None) -> None:
        """Answer (or fail as ``fault`` says), logging the request before any body byte is sent."""
        raw, query = self._split()
        rec = {
            "server": self.server_name_in_log,
            "method": self.command,
            "path": raw,
            "query": query,
            "range": self.headers.get("Range"),
            "status": status,
            "bytes": 0,
            "fault": fault,
            "t": time.time(),
        }
        head = self.command == "HEAD"
        if fault == "drop" and (head or body.length < 2):
            fault = rec["fault"] = "close"
        if fault == "close":
            rec["status"] = 0
            self.state.record(rec)
            self.close_connection = True
            return
        if fault == "503":
            status = rec["status"] = 503
            headers = {"Content-Type": "text/plain"}
            body = _Body(b"Service Unavailable (injected by the test server)\n")
        send = 0 if head else body.length
        if fault == "drop":
            send = body.length // 2
        rec["bytes"] = send
        self.state.record(rec)
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(body.length))
            self.end_headers()
            for chunk in body.chunks(send):
                self.wfile.write(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _serve_file(
        self, fault: str | None, local: str, headers: dict[str, str], etag: str, mtime: float
    ) -> None:
        """GET/HEAD of a local file with the Range rules of the module docstring."""
        size = os.path.getsize(local)
        last_modified = email.utils.formatdate(mtime, usegmt=True)
        headers = {**headers, "ETag": etag, "Last-Modified": last_modified}
        rng = None if self.state.ignore_range else parse_range(self.headers.get("Range"), size)
        if not self.state.ignore_range:
            headers["Accept-Ranges"] = "bytes"
            if_range = self.headers.get("If-Range")
            if rng is not None and if_range is not None and if_range.strip() not in (etag, last_modified):
                rng = None  # the client's copy is stale: send it all
        if rng is False:
            self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, _Body(), fault)
        elif rng is None:
            self._send(200, headers, _Body(path=local, length=size), fault)
        else:
            a, b = rng
            headers["Content-Range"] = f"bytes {a}-{b}/{size}"
            self._send(206, headers, _Body(path=local, offset=a, length=b - a + 1), fault)

    def _begin(self) -> str | None | bool:
        """Admin requests are answered here (returns True); otherwise the fault to inject."""
        if self._admin():
            return True
        raw, _ = self._split()
        fault = self.state.fault_for(raw)
        if self.state.delay:
            time.sleep(self.state.delay)
        return fault


def _make_server(handler: type[_Handler], port: int = 0) -> ThreadingHTTPServer:
    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128
        allow_reuse_address = True

    return Server(("127.0.0.1", port), handler)


# --------------------------------------------------------------------------------------------------
# Child side: static HTTP server


def _etag_of(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class _StaticHandler(_Handler):
    root: Path
    server_name_in_log = "http"

    def do_GET(self):
        with self.state.request():
            self._serve()

    def do_HEAD(self):
        with self.state.request():
            self._serve()

    def do_POST(self):
        if not self._admin():
            self._read_body()
            self._send(405, {"Allow": "GET, HEAD"}, _Body(b"Method Not Allowed\n"), None)

    def _serve(self) -> None:
        fault = self._begin()
        if fault is True:
            return
        raw, query = self._split()
        rel = unquote(raw).lstrip("/")
        local = (self.root / rel).resolve()
        if local != self.root and self.root not in local.parents:
            self._send(404, {"Content-Type": "text/plain"}, _Body(b"Not Found\n"), fault)
        elif local.is_dir():
            if not raw.endswith("/"):
                location = raw + "/" + (f"?{query}" if query else "")
                self._send(301, {"Location": location}, _Body(), fault)
            else:
                self._send(
                    200, {"Content-Type": "text/html; charset=utf-8"}, _Body(_listing(raw, local)), fault
                )
        elif local.is_file():
            st = local.stat()
            self._serve_file(
                fault, str(local), {"Content-Type": "application/octet-stream"}, _etag_of(st), st.st_mtime
            )
        else:
            self._send(404, {"Content-Type": "text/plain"}, _Body(b"Not Found\n"), fault)


def _listing(raw_path: str, folder: Path) -> bytes:
    title = html.escape(unquote(raw_path))
    items = ['<li><a href="../">../</a></li>'] if raw_path != "/" else []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name + ("/" if entry.is_dir() else "")
        items.append(
            f'<li><a href="{quote(entry.name)}{"/" if entry.is_dir() else ""}">{html.escape(name)}</a></li>'
        )
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Index of {title}</title></head>\n'
        f"<body><h1>Index of {title}</h1>\n<ul>\n" + "\n".join(items) + "\n</ul></body></html>\n"
    )
    return page.encode()


def _run_http(config: Mapping[str, Any]) -> None:
    state = _State(config)
    handler = type("Handler", (_StaticHandler,), {"state": state, "root": Path(config["root"])})
    server = _make_server(handler)
    _ready({"port": server.server_address[1]})
    server.serve_forever(poll_interval=0.5)


# --------------------------------------------------------------------------------------------------
# Child side: Hugging Face Hub emulation

# The Hub's default .gitattributes (files matching are stored with LFS), and its size limit for git.
LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack "
    "*.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar.* "
    "*.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
LFS_MIN_SIZE = 10 * 1024 * 1024
_BASE_DATE = 1_704_067_200  # 2024-01-01T00:00:00Z


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class _HubFile:
    def __init__(self, path: str, local: str):
        self.path, self.local = path, local
        st = os.stat(local)
        self.size, self.mtime = st.st_size, st.st_mtime
        sha1_git, sha256 = hashlib.sha1(b"blob %d\0" % self.size), hashlib.sha256()
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha1_git.update(chunk)
                sha256.update(chunk)
        self.sha256 = sha256.hexdigest()
        name = path.rsplit("/", 1)[-1]
        self.lfs = self.size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)
        if self.lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
            )
            self.pointer_size = len(pointer)
            self.oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer.encode()).hexdigest()
        else:
            self.oid = sha1_git.hexdigest()


class _HubRevision:
    def __init__(self, repo_id: str, name: str, folder: str, index: int):
        self.repo_id, self.name, self.folder = repo_id, name, folder
        self.date = _iso(_BASE_DATE + 3600 * index)
        self.files: dict[str, _HubFile] = {}
        root = Path(folder)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                self.files[rel] = _HubFile(rel, str(p))
        self.dirs: set[str] = set()
        for rel in self.files:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                self.dirs.add("/".join(parts[:i]))
        content = hashlib.sha1()
        for rel, f in sorted(self.files.items()):
            content.update(f"{rel}\0{f.oid}\n".encode())
        self.tree_oid = content.hexdigest()
        self.sha = hashlib.sha1(f"{repo_id}\0{name}\0{self.tree_oid}".encode()).hexdigest()
        self.title = f"Upload {name}"

    def dir_oid(self, path: str) -> str:
        h = hashlib.sha1(path.encode())
        for rel, f in sorted(self.files.items()):
            if rel.startswith(path + "/"):
                h.update(f"{rel}\0{f.oid}\n".encode())
        return h.hexdigest()

    def entry(self, path: str, expand: bool) -> dict[str, Any]:
        last_commit = {"id": self.sha, "title": self.title, "date": self.date}
        if path in self.files:
            f = self.files[path]
            out: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.lfs:
                out["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            if expand:
                out["lastCommit"] = last_commit
                out["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
            return out
        out = {"type": "directory", "oid": self.dir_oid(path), "size": 0, "path": path}
        if expand:
            out["lastCommit"] = last_commit
        return out

    def children(self, path: str, recursive: bool) -> list[str] | None:
        """Paths under ``path`` ("" is the root), folders included; None when it does not exist."""
        if path in self.files:
            return [path]
        if path and path not in self.dirs:
            return None
        prefix = path + "/" if path else ""
        out = []
        for p in sorted(self.dirs | set(self.files)):
            if p.startswith(prefix) and p != path and (recursive or "/" not in p[len(prefix) :]):
                out.append(p)
        return out


class _HubData:
    def __init__(self, repos: Mapping[str, Mapping[str, str]]):
        self.repos: dict[str, dict[str, _HubRevision]] = {}
        self.by_sha256: dict[str, str] = {}
        for repo_id, revisions in repos.items():
            revs: dict[str, _HubRevision] = {}
            for i, (name, folder) in enumerate(revisions.items()):
                revs[name] = _HubRevision(repo_id, name, folder, i)
            if "main" not in revs:
                revs["main"] = revs[list(revs)[-1]]
            self.repos[repo_id] = revs
            for rev in revs.values():
                for f in rev.files.values():
                    self.by_sha256.setdefault(f.sha256, f.local)

    def revision(self, repo_id: str, rev: str) -> _HubRevision | None:
        revs = self.repos[repo_id]
        if rev in revs:
            return revs[rev]
        for r in revs.values():
            if r.sha == rev:
                return r
        return None


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        self.status, self.code, self.message = status, code, message


class _HubHandler(_Handler):
    server_name_in_log = "hub"
    data: _HubData
    data_lock: threading.Lock
    cdn_port: int
    lfs_redirect: bool
    page_size: int | None

    def do_GET(self):
        with self.state.request():
            self._dispatch()

    def do_HEAD(self):
        with self.state.request():
            self._dispatch()

    def do_POST(self):
        with self.state.request():
            self._dispatch()

    def admin_reload(self, payload: Mapping[str, Any]) -> None:
        cls = type(self)
        with cls.data_lock:
            repos = payload.get("repos") or cls.config_repos
            cls.data = _HubData(repos)
            cls.config_repos = repos

    # ---- routing
    def _dispatch(self) -> None:
        fault = self._begin()
        if fault is True:
            return
        raw, query = self._split()
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        body = self._read_body() if self.command == "POST" else b""
        segs = [unquote(s) for s in raw.strip("/").split("/")] if raw.strip("/") else []
        try:
            with type(self).data_lock:
                data = type(self).data
            if segs[:1] == ["api"]:
                self._api(fault, data, segs[1:], params, body)
            elif len(segs) >= 4 and segs[2] == "resolve" and self.command in ("GET", "HEAD"):
                self._resolve(fault, data, segs, params)
            else:
                raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")
        except _HubError as e:
            headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, headers, _Body(json.dumps({"error": e.message}).encode()), fault)

    def _repo(self, data: _HubData, repo_type: str, ns: str, name: str) -> str:
        repo_id = f"{ns}/{name}"
        if repo_type != "models" or repo_id not in data.repos:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        return repo_id

    def _rev_and_rest(self, data: _HubData, repo_id: str, segs: list[str]) -> tuple[_HubRevision, list[str]]:
        """The revision at the head of ``segs`` (a segment may hold '/' when it came %2F-encoded;
        plain '/' in a revision is matched against the known ones, longest first)."""
        if not segs or segs[0] == "":
            raise _HubError(404, "RevisionNotFound", "Invalid rev id: ")
        for k in range(len(segs), 0, -1):
            rev = data.revision(repo_id, "/".join(segs[:k]))
            if rev is not None:
                return rev, segs[k:]
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {segs[0]}")

    def _json(self, fault: str | None, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self._send(
            200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, _Body(data), fault
        )

    def _api(self, fault, data: _HubData, segs: list[str], params: dict[str, str], body: bytes) -> None:
        if len(segs) < 3:
            raise _HubError(404, None, "Not Found")
        repo_type, ns, name, rest = segs[0], segs[1], segs[2], segs[3:]
        repo_id = self._repo(data, repo_type, ns, name)
        action = rest[0] if rest else None
        get = self.command in ("GET", "HEAD")
        if action is None and get:
            self._json(fault, self._model_info(data, repo_id, data.revision(repo_id, "main"), params))
        elif action == "revision" and get:
            rev, _ = self._rev_and_rest(data, repo_id, rest[1:])
            self._json(fault, self._model_info(data, repo_id, rev, params))
        elif action == "tree" and get:
            self._tree(fault, data, repo_id, rest[1:], params)
        elif action == "paths-info" and self.command == "POST":
            rev, _ = self._rev_and_rest(data, repo_id, rest[1:])
            paths, expand = self._paths_info_args(body)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in rev.files or p in rev.dirs:
                    out.append(rev.entry(p, expand))
            self._json(fault, out)
        elif action == "refs" and get:
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": r.sha}
                for n, r in data.repos[repo_id].items()
            ]
            refs: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
            if params.get("include_prs"):
                refs["pullRequests"] = []
            self._json(fault, refs)
        elif action == "commits" and get:
            rev, _ = self._rev_and_rest(data, repo_id, rest[1:])
            commit = {
                "id": rev.sha,
                "title": rev.title,
                "message": "",
                "date": rev.date,
                "authors": [{"user": "wdiff-tests", "avatar": None}],
            }
            self._json(fault, [commit])
        else:
            raise _HubError(404, None, "Not Found")

    def _paths_info_args(self, body: bytes) -> tuple[list[str], bool]:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype == "application/json":
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths", []), payload.get("expand", False)
            return ([paths] if isinstance(paths, str) else list(paths)), _truthy(expand)
        form = parse_qs(body.decode(), keep_blank_values=True)
        return form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])

    def _model_info(self, data: _HubData, repo_id: str, rev: _HubRevision, params: dict[str, str]) -> dict:
        blobs = _truthy(params.get("blobs", "false"))
        siblings = []
        for path, f in rev.files.items():
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=f.size, blobId=f.oid)
                if f.lfs:
                    s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(s)
        first = next(iter(data.repos[repo_id].values()))
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": rev.sha,
            "lastModified": rev.date,
            "createdAt": first.date,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": None,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in rev.files.values()),
        }
        query = parse_qs(self._split()[1])
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return info

    def _tree(self, fault, data: _HubData, repo_id: str, segs: list[str], params: dict[str, str]) -> None:
        rev, rest = self._rev_and_rest(data, repo_id, segs)
        path = "/".join(rest).strip("/")
        recursive = _truthy(params.get("recursive", "false"))
        expand = _truthy(params.get("expand", "false"))
        paths = rev.children(path, recursive)
        if paths is None:
            raise _HubError(404, "EntryNotFound", f'{path} does not exist on "{rev.name}"')
        page = self.page_size or (50 if expand else 1000)
        start = _cursor_decode(params.get("cursor"))
        chunk = paths[start : start + page]
        headers = {}
        if start + page < len(paths):
            raw, query = self._split()
            q = {k: v for k, v in parse_qs(query).items() if k != "cursor"}
            q["cursor"] = [_cursor_encode(start + page)]
            next_query = "&".join(f"{k}={quote(v[-1], safe='')}" for k, v in q.items())
            host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
            headers["Link"] = f'<http://{host}{raw}?{next_query}>; rel="next"'
        self._json(fault, [rev.entry(p, expand) for p in chunk], headers)

    def _resolve(self, fault, data: _HubData, segs: list[str], params: dict[str, str]) -> None:
        repo_id = self._repo(data, "models", segs[0], segs[1])
        rev, rest = self._rev_and_rest(data, repo_id, segs[3:])
        path = "/".join(rest)
        f = rev.files.get(path)
        if f is None:
            raise _HubError(404, "EntryNotFound", "Entry not found")
        headers = {
            "X-Repo-Commit": rev.sha,
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if f.lfs:
            headers["X-Linked-Size"] = str(f.size)
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            if self.lfs_redirect:
                location = f"http://127.0.0.1:{self.cdn_port}/lfs/{f.sha256}?filename={quote(path, safe='')}"
                headers.update({"Location": location, "ETag": f'"{f.sha256}"', "Content-Type": "text/plain"})
                self._send(302, headers, _Body(), fault)
                return
            self._serve_file(fault, f.local, headers, f'"{f.sha256}"', f.mtime)
        else:
            self._serve_file(fault, f.local, headers, f'"{f.oid}"', f.mtime)


class _CdnHandler(_Handler):
    server_name_in_log = "cdn"
    hub: type[_HubHandler]

    def do_GET(self):
        with self.state.request():
            self._serve()

    def do_HEAD(self):
        with self.state.request():
            self._serve()

    def _serve(self) -> None:
        raw, _ = self._split()
        fault = self.state.fault_for(raw)  # no admin endpoints here
        if self.state.delay:
            time.sleep(self.state.delay)
        m = re.fullmatch(r"/lfs/([0-9a-f]{64})", raw)
        with self.hub.data_lock:
            local = self.hub.data.by_sha256.get(m.group(1)) if m else None
        if local is None:
            self._send(404, {"Content-Type": "text/plain"}, _Body(b"NoSuchKey\n"), fault)
            return
        headers = {"Content-Type": "application/octet-stream"}
        self._serve_file(fault, local, headers, f'"{m.group(1)}"', os.path.getmtime(local))


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _cursor_encode(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def _cursor_decode(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["offset"])
    except Exception as e:
        raise _HubError(400, None, f"invalid cursor: {cursor}") from e


def _run_hub(config: Mapping[str, Any]) -> None:
    state = _State(config)
    hub = type(
        "HubHandler",
        (_HubHandler,),
        {
            "state": state,
            "data": _HubData(config["repos"]),
            "config_repos": config["repos"],
            "data_lock": threading.Lock(),
            "lfs_redirect": bool(config.get("lfs_redirect", True)),
            "page_size": config.get("page_size"),
            "cdn_port": 0,
        },
    )
    cdn = type("CdnHandler", (_CdnHandler,), {"state": state, "hub": hub})
    cdn_server = _make_server(cdn)
    hub.cdn_port = cdn_server.server_address[1]
    hub_server = _make_server(hub)
    threading.Thread(target=cdn_server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True).start()
    _ready({"port": hub_server.server_address[1], "cdn_port": hub.cdn_port})
    hub_server.serve_forever(poll_interval=0.5)


# --------------------------------------------------------------------------------------------------
# Child side: moto S3


def _run_s3(config: Mapping[str, Any]) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    os.environ["MOTO_PORT"] = str(port)  # what `python -m moto.server -p PORT` sets
    _ready({"port": port})
    threading.Event().wait()  # the watchdog ends the process


# --------------------------------------------------------------------------------------------------
# Child side: entry point


def _ready(info: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


def _watchdog(max_lifetime: float, owned_dir: str | None) -> None:
    """Exit when stdin reaches EOF (the test process closed it or died) or after ``max_lifetime``."""

    def leave() -> None:
        if owned_dir:
            shutil.rmtree(owned_dir, ignore_errors=True)
        os._exit(0)

    def on_eof() -> None:
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(65536):
                pass
        leave()

    def on_timeout() -> None:
        time.sleep(max_lifetime)
        leave()

    threading.Thread(target=on_eof, daemon=True).start()
    threading.Thread(target=on_timeout, daemon=True).start()


def main(argv: list[str]) -> None:
    kind, config_path = argv[1], argv[2]
    config = json.loads(Path(config_path).read_text())
    _watchdog(float(config.get("max_lifetime", MAX_LIFETIME)), config.get("owned_dir"))
    runners = {"http": _run_http, "hub": _run_hub, "s3": _run_s3}
    runners[kind](config)


if __name__ == "__main__":
    main(sys.argv)
