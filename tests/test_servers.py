"""The local S3 / HTTP / Hugging Face Hub servers of tests/servers.py, checked through the real clients
(s3fs, fsspec's HTTPFileSystem, huggingface_hub's HfFileSystem and HfApi).

Some tests also pin down what the clients themselves do (retries, servers that ignore Range), since
wdiff's remote reading relies on it; those assertions say "client behaviour" in their message.
"""

from __future__ import annotations

import hashlib
import http.client
import pickle
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from safetensors.numpy import save_file
from servers import hub_commit_sha, hub_reload, parse_range, upload_folder

BIG = 1_600_000  # bytes of tensor data in the big checkpoints: range reads matter above 1 MB


def _checkpoint(path: Path, seed: int, big: bool) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "layers.0.w": rng.standard_normal((16, 8)).astype(np.float32),
        "layers.0.b": rng.standard_normal(8).astype(np.float32),
    }
    if big:
        tensors["embed.w"] = rng.standard_normal(BIG // 4).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"step": str(seed)})
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder: three steps, a config, one nested folder."""
    root = tmp_path_factory.mktemp("run")
    _checkpoint(root / "step_0" / "model.safetensors", 0, big=False)
    _checkpoint(root / "step_1000" / "model.safetensors", 1000, big=True)
    _checkpoint(root / "step_2000" / "model.safetensors", 2000, big=True)
    (root / "config.json").write_text('{"hidden": 8}\n')
    (root / "step_2000" / "extra").mkdir()
    (root / "step_2000" / "extra" / "notes.txt").write_text("nested\n")
    return root


@pytest.fixture(scope="module")
def revisions(tmp_path_factory) -> dict[str, Path]:
    """One folder per Hub revision (branch), as a trainer pushing checkpoints would make."""
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for i, (rev, big) in enumerate([("step0", False), ("step1000", True), ("runs/step2000", True)]):
        d = root / rev.replace("/", "_")
        _checkpoint(d / "model.safetensors", i, big=big)
        (d / "config.json").write_text(f'{{"step": {i}}}\n')
        (d / "extra").mkdir()
        (d / "extra" / "notes.txt").write_text(f"revision {rev}\n")
        out[rev] = d
    return out


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _raw(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request with http.client (no client library in the way)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Range parsing (the rules every server here uses)


def test_parse_range():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-5", 10) == (2, 5)
    assert parse_range("bytes=2-", 10) == (2, 9)
    assert parse_range("bytes=8-100", 10) == (8, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=10-", 10) is False
    assert parse_range("bytes=-0", 10) is False
    assert parse_range("bytes=0-0", 0) is False
    assert parse_range("bytes=0-1,4-5", 10) is None  # multi-range: ignored, 200
    assert parse_range("bytes=5-2", 10) is None  # malformed: ignored
    assert parse_range("items=0-1", 10) is None


# --------------------------------------------------------------------------------------------------
# S3 (moto server process) through s3fs


def test_s3_through_plain_s3filesystem(s3_env, run_dir, monkeypatch):
    import s3fs

    keys = upload_folder(s3_env, run_dir, "s3://wdiff-run/runs/a")
    assert len(keys) == len(_files(run_dir))

    fs = s3fs.S3FileSystem()  # no arguments: the environment set by s3_env reaches the server
    assert fs.ls("wdiff-run/runs/a", detail=False) == [
        "wdiff-run/runs/a/config.json",
        "wdiff-run/runs/a/step_0",
        "wdiff-run/runs/a/step_1000",
        "wdiff-run/runs/a/step_2000",
    ]
    assert sorted(p.removeprefix("wdiff-run/runs/a/") for p in fs.find("wdiff-run/runs/a")) == _files(run_dir)

    path = "wdiff-run/runs/a/step_1000/model.safetensors"
    local = (run_dir / "step_1000" / "model.safetensors").read_bytes()
    info = fs.info(path)
    assert info["size"] == len(local) and info["type"] == "file"
    assert info["ETag"].strip('"') == hashlib.md5(local).hexdigest()  # single-part upload: the MD5
    # s3fs's cat_file is (path, version_id=None, start=None, end=None): start/end by keyword only
    assert fs.cat_file(path, start=8, end=1_200_000) == local[8:1_200_000]
    assert fs.cat_file(path, start=-100) == local[-100:]
    starts = list(range(0, len(local), 200_000))
    ends = [min(s + 1000, len(local)) for s in starts]
    assert fs.cat_ranges([path] * len(starts), starts, ends) == [local[s:e] for s, e in zip(starts, ends)]

    # AWS_ENDPOINT_URL alone (no _S3 variant) is honoured as well
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3fs.S3FileSystem().cat_file(path, start=0, end=8) == local[:8]


# --------------------------------------------------------------------------------------------------
# HTTP static server


def _http_fs():
    import fsspec

    return fsspec.filesystem("http", skip_instance_cache=True)


def test_http_listing_info_and_ranges(http_server, run_dir):
    base = http_server(run_dir)
    fs = _http_fs()

    assert sorted(fs.ls(base + "/", detail=False)) == [
        f"{base}/config.json",
        f"{base}/step_0/",
        f"{base}/step_1000/",
        f"{base}/step_2000/",
    ]
    assert sorted(u.removeprefix(base + "/") for u in fs.find(base + "/")) == _files(run_dir)

    url = f"{base}/step_1000/model.safetensors"
    local = (run_dir / "step_1000" / "model.safetensors").read_bytes()
    info = fs.info(url)
    assert info["size"] == len(local)
    assert info["ETag"].startswith('"') and not info["ETag"].startswith("W/")
    assert "Last-Modified" in info
    assert fs.cat_file(url, start=8, end=1_100_000) == local[8:1_100_000]
    with fs.open(url, block_size=64 * 1024) as f:
        f.seek(1_500_000)
        assert f.read(5000) == local[1_500_000:1_505_000]
    # many requests in flight (fsspec gathers them concurrently)
    starts = list(range(0, len(local) - 4096, 50_000))
    got = fs.cat_ranges([url] * len(starts), starts, [s + 4096 for s in starts])
    assert got == [local[s : s + 4096] for s in starts]

    log = base.log()
    ranged = [r for r in log if r["path"] == "/step_1000/model.safetensors" and r["range"]]
    assert {r["status"] for r in ranged} == {206}
    assert sum(r["range"] == f"bytes={s}-{s + 4095}" for r in ranged for s in starts) == len(starts)
    assert all(r["bytes"] == 4096 for r in ranged if r["range"].endswith(("-4095", "4095")) and r["n"] > 3)
    assert base.log_path.read_text().count("\n") == len(log)

    # the protocol itself
    status, headers, body = _raw(url, headers={"Range": "bytes=-10"})
    assert (status, body) == (206, local[-10:])
    assert headers["Content-Range"] == f"bytes {len(local) - 10}-{len(local) - 1}/{len(local)}"
    assert headers["Content-Length"] == "10" and headers["Accept-Ranges"] == "bytes"
    status, headers, body = _raw(url, headers={"Range": f"bytes={len(local) - 3}-"})
    assert (status, body) == (206, local[-3:])
    status, headers, _ = _raw(url, headers={"Range": f"bytes={len(local)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(local)}"
    status, _, body = _raw(url, headers={"Range": "bytes=0-1,5-6"})
    assert (status, body) == (200, local)
    status, headers, body = _raw(url, headers={"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert (status, body) == (200, local)
    etag = headers["ETag"]
    status, _, body = _raw(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert (status, body) == (206, local[:4])
    status, headers, body = _raw(url, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(local)))
    assert _raw(f"{base}/step_1000", method="GET")[:2][0] == 301
    assert _raw(f"{base}/step_1000", method="GET")[1]["Location"] == "/step_1000/"
    assert _raw(f"{base}/nope.safetensors")[0] == 404
    assert _raw(f"{base}/../../etc/passwd")[0] == 404
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{base}/nope.safetensors")

    base.reset()
    assert base.log() == []


def test_http_server_answers_requests_concurrently(http_server, run_dir):
    base = http_server(run_dir, delay=0.3)
    url = f"{base}/step_1000/model.safetensors"
    local = (run_dir / "step_1000" / "model.safetensors").read_bytes()
    starts = [i * 100_000 for i in range(8)]
    got = _http_fs().cat_ranges([url] * 8, starts, [s + 10 for s in starts])
    assert got == [local[s : s + 10] for s in starts]
    assert max(r["in_flight"] for r in base.log()) > 1  # answered side by side, not one after another

    # the URL travels to other processes (e.g. dask workers) as a plain string
    copy = pickle.loads(pickle.dumps(base))
    assert copy == base and type(copy) is str


def test_http_faults_and_a_retrying_client(http_server, run_dir):
    import aiohttp

    base = http_server(
        run_dir, fail_every=2, fail_kinds=("503", "drop", "close"), fail_match=r"\.safetensors$"
    )
    fs = _http_fs()
    url = f"{base}/step_2000/model.safetensors"
    local = (run_dir / "step_2000" / "model.safetensors").read_bytes()

    # client behaviour: fsspec's HTTPFileSystem does not retry a 503 nor a body cut short; aiohttp
    # itself re-sends an idempotent request once when a reused keep-alive connection is closed
    # before the response headers, so the "close" fault does not reach the caller
    errors = []
    for _ in range(6):
        try:
            assert fs.cat_file(url, start=0, end=100_000) == local[:100_000]
        except (aiohttp.ClientError, OSError) as e:
            errors.append(type(e).__name__)
    assert errors == ["ClientResponseError", "ClientPayloadError"]  # 503; connection dropped mid-body

    log = base.log()
    assert [r["fault"] for r in log] == [None, "503", None, "drop", None, "close", None]
    assert [r["status"] for r in log] == [206, 503, 206, 206, 206, 0, 206]
    assert log[3]["bytes"] == 50_000  # half of the range, then the connection closed

    # a bounded retry loop gets every range through; the listing is never failed (fail_match)
    def read(start: int, end: int) -> bytes:
        for _ in range(4):
            try:
                return fs.cat_file(url, start=start, end=end)
            except (aiohttp.ClientError, OSError):
                continue
        raise AssertionError("no answer in 4 tries")

    base.reset()
    blocks = [(s, min(s + 200_000, len(local))) for s in range(0, len(local), 200_000)]
    assert b"".join(read(s, e) for s, e in blocks) == local
    assert sorted(fs.ls(base + "/step_2000/", detail=False)) == [f"{base}/step_2000/extra/", url]
    log = base.log()
    failed = [r for r in log if r["fault"]]
    assert len(failed) == len([r for r in log if r["path"].endswith(".safetensors")]) // 2 >= 4
    assert all(r["path"].endswith(".safetensors") for r in failed)


def test_http_fault_cap_lets_a_client_through(http_server, run_dir):
    base = http_server(run_dir, fail_every=1, max_failures=2)
    fs = _http_fs()
    url = f"{base}/config.json"
    outcomes = []
    for _ in range(3):
        try:
            outcomes.append(fs.cat_file(url))
        except Exception as e:
            outcomes.append(type(e).__name__)
    assert outcomes == ["ClientResponseError", "ClientResponseError", (run_dir / "config.json").read_bytes()]


def test_http_server_that_ignores_range(http_server, run_dir):
    base = http_server(run_dir, ignore_range=True)
    fs = _http_fs()
    url = f"{base}/step_1000/model.safetensors"
    local = (run_dir / "step_1000" / "model.safetensors").read_bytes()

    status, headers, body = _raw(url, headers={"Range": "bytes=10-19"})
    assert (
        (status, body) == (200, local) and "Accept-Ranges" not in headers and "Content-Range" not in headers
    )

    # client behaviour: cat_file with start/end does not check the answer, it returns the whole body
    assert fs.cat_file(url, start=10, end=20) == local
    # client behaviour: a file object reads from 0 by truncating the whole body, refuses any other offset
    with fs.open(url, block_size=1024) as f:
        assert f.read(100) == local[:100]
        f.seek(500_000)
        with pytest.raises(ValueError, match="doesn't appear to support range requests"):
            f.read(100)
    assert fs.info(url)["size"] == len(local)  # HEAD still gives the size
    assert all(r["status"] == 200 and r["bytes"] in (0, len(local)) for r in base.log())


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub emulation through huggingface_hub


@pytest.fixture
def hub(hub_server, revisions):
    return hub_server({"org/model": revisions})


def test_hub_filesystem_listing_info_and_ranges(hub, revisions):
    from huggingface_hub import HfApi, HfFileSystem

    fs = HfFileSystem(endpoint=hub)
    api = HfApi(endpoint=hub)
    d1 = revisions["step1000"]

    assert fs.ls("hf://org/model@step1000", detail=False) == [
        "org/model@step1000/config.json",
        "org/model@step1000/extra",
        "org/model@step1000/model.safetensors",
    ]
    assert fs.find("hf://org/model@step1000") == [f"org/model@step1000/{p}" for p in _files(d1)]
    # a revision with '/' is written %2F-encoded in hf:// paths
    assert fs.find("hf://org/model@runs%2Fstep2000/extra") == ["org/model@runs%2Fstep2000/extra/notes.txt"]
    assert fs.cat_file("hf://org/model@runs%2Fstep2000/extra/notes.txt") == b"revision runs/step2000\n"

    sha = api.model_info("org/model", revision="step1000").sha
    local = (d1 / "model.safetensors").read_bytes()
    info = fs.info("hf://org/model@step1000/model.safetensors")
    assert info["size"] == len(local) and info["type"] == "file"
    assert info["lfs"]["sha256"] == hashlib.sha256(local).hexdigest() and info["lfs"]["size"] == len(local)
    config = (d1 / "config.json").read_bytes()
    cinfo = fs.info("hf://org/model@step1000/config.json")
    assert cinfo["lfs"] is None and cinfo["blob_id"] == _git_blob_sha1(config)  # git blob sha1, as the Hub
    assert cinfo["xet_hash"] is None
    expanded = fs.info("hf://org/model@step1000/model.safetensors", expand_info=True)
    assert expanded["last_commit"]["oid"] == sha and expanded["last_commit"]["title"]
    assert fs.modified("hf://org/model@step1000/config.json") == expanded["last_commit"]["date"]

    path = "hf://org/model@step1000/model.safetensors"
    hub.reset()
    assert fs.cat_file(path, start=1_000_000, end=1_000_100) == local[1_000_000:1_000_100]
    with fs.open(path, block_size=256 * 1024) as f:
        f.seek(100_000)
        assert f.read(1000) == local[100_000:101_000]
        f.seek(1_400_000)
        assert f.read(1000) == local[1_400_000:1_401_000]
    with fs.open(path) as f:
        assert f.read() == local
    with fs.open(path, cache_type="none") as f:
        f.seek(200_000)
        assert f.read(10) == local[200_000:200_010]
    log = hub.log()
    resolves = [r for r in log if "/resolve/" in r["path"]]
    assert all(r["path"] == "/org/model/resolve/step1000/model.safetensors" for r in resolves)
    assert all(r["status"] == 302 for r in resolves)  # an LFS file: the Hub redirects to its CDN
    cdn = [r for r in log if r["server"] == "cdn"]
    assert [r["range"] for r in cdn] == [r["range"] for r in resolves]  # the client re-sends Range there
    # client behaviour: cat_file and buffered files read ahead a whole block (5 MiB by default, here
    # clipped at the end of the file); read() of a whole file streams it; cache_type="none" is exact
    size = len(local)
    assert [r["range"] for r in cdn] == [
        f"bytes=1000000-{size - 1}",
        f"bytes=100000-{101_000 + 256 * 1024 - 1}",
        f"bytes=1400000-{size - 1}",
        None,
        "bytes=200000-200009",
    ]
    assert [r["status"] for r in cdn] == [206, 206, 206, 200, 206]
    assert cdn[3]["bytes"] == size and cdn[4]["bytes"] == 10

    # a git (non-LFS) file is served by resolve itself, with ranges
    hub.reset()
    assert fs.cat_file("hf://org/model@step1000/config.json", start=2, end=6) == config[2:6]
    assert [(r["server"], r["status"]) for r in hub.log()] == [("hub", 206)]


def test_hub_api_refs_info_and_errors(hub, revisions, tmp_path):
    from huggingface_hub import HfApi, HfFileSystem, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=hub)
    refs = api.list_repo_refs("org/model")
    branches = {b.name: b.target_commit for b in refs.branches}
    assert set(branches) == {"step0", "step1000", "runs/step2000", "main"}
    assert all(len(c) == 40 and int(c, 16) >= 0 for c in branches.values())
    assert len(set(branches.values())) == 3 and branches["main"] == branches["runs/step2000"]
    assert refs.tags == [] and refs.converts == []
    for name, commit in branches.items():
        assert (
            api.model_info("org/model", revision=name).sha == commit == hub_commit_sha(hub, "org/model", name)
        )
    assert api.model_info("org/model").sha == branches["main"]
    assert api.model_info("org/model", revision=branches["step0"]).sha == branches["step0"]  # by commit sha

    info = api.model_info("org/model", revision="step1000", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(_files(revisions["step1000"]))
    model = (revisions["step1000"] / "model.safetensors").read_bytes()
    assert siblings["model.safetensors"].size == len(model)
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(model).hexdigest()
    assert siblings["config.json"].lfs is None

    tree = {e.path: e for e in api.list_repo_tree("org/model", revision="step1000", recursive=True)}
    assert set(tree) == set(_files(revisions["step1000"])) | {"extra"}
    assert tree["model.safetensors"].lfs["sha256"] == hashlib.sha256(model).hexdigest()
    paths = api.get_paths_info("org/model", ["config.json", "extra", "missing"], revision="step1000")
    assert [type(p).__name__ for p in paths] == ["RepoFile", "RepoFolder"]
    commits = api.list_repo_commits("org/model", revision="step1000")
    assert [c.commit_id for c in commits] == [branches["step1000"]]

    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision="step999")
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree("org/model", revision="step999"))
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/model", "nope", revision="step1000"))
    fs = HfFileSystem(endpoint=hub)
    with pytest.raises(FileNotFoundError, match="revision not found"):
        fs.ls("hf://org/model@step999")
    with pytest.raises(FileNotFoundError):
        fs.info("hf://org/model@step1000/nope.safetensors")

    # hf_hub_download checks the resolve headers (X-Repo-Commit, ETag / X-Linked-Etag, sizes)
    for name in ("model.safetensors", "config.json"):
        got = hf_hub_download(
            "org/model", name, revision="step1000", endpoint=hub, cache_dir=tmp_path / "cache", token=False
        )
        assert Path(got).read_bytes() == (revisions["step1000"] / name).read_bytes()
        assert branches["step1000"] in got  # snapshots/<commit>/...
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "nope.bin", revision="step1000", endpoint=hub, cache_dir=tmp_path / "c")

    status, headers, _ = _raw(f"{hub}/org/model/resolve/step1000/model.safetensors", method="HEAD")
    assert status == 302 and headers["X-Linked-Size"] == str(len(model))
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(model).hexdigest()}"'
    assert headers["X-Repo-Commit"] == branches["step1000"]
    assert not any(k.lower().startswith("x-xet") for k in headers)


def test_hub_env_pagination_reload_and_direct_lfs(hub_server, hf_env, revisions):
    import fsspec
    from huggingface_hub import HfApi, HfFileSystem

    base = hub_server({"org/model": {"step0": revisions["step0"]}}, page_size=2, lfs_redirect=False)
    hf_env(base)
    fs = HfFileSystem()  # no endpoint: hf_env pointed the constants there
    assert fs.find("hf://org/model@step0") == [f"org/model@step0/{p}" for p in _files(revisions["step0"])]
    with fsspec.open("hf://org/model@step0/config.json") as f:
        assert f.read() == (revisions["step0"] / "config.json").read_bytes()
    trees = [r for r in base.log() if "/tree/" in r["path"]]
    assert any("cursor=" in r["query"] for r in trees)  # 4 entries, 2 a page: the client followed Link

    # a new branch appears (a trainer pushed a checkpoint): reload, and the clients see it
    hub_reload(base, {"org/model": {"step0": revisions["step0"], "step1000": revisions["step1000"]}})
    assert {b.name for b in HfApi().list_repo_refs("org/model").branches} == {"step0", "step1000", "main"}
    fs.invalidate_cache()
    local = (revisions["step1000"] / "model.safetensors").read_bytes()
    base.reset()
    assert fs.cat_file("hf://org/model@step1000/model.safetensors", start=5, end=50) == local[5:50]
    assert [(r["server"], r["status"]) for r in base.log() if "/resolve/" in r["path"]] == [("hub", 206)]


def test_hub_ranged_reads_are_retried_by_huggingface_hub(hub_server, revisions):
    from huggingface_hub import HfFileSystem

    base = hub_server(
        {"org/model": {"step1000": revisions["step1000"]}},
        fail_every=1,
        max_failures=2,
        fail_kinds=("503", "drop"),
        fail_match=r"^/lfs/",
    )
    fs = HfFileSystem(endpoint=base)
    local = (revisions["step1000"] / "model.safetensors").read_bytes()
    # client behaviour: HfFileSystemFile._fetch_range goes through http_backoff, which retries 5xx and
    # broken connections (sleeping 1 s, then 2 s)
    assert fs.cat_file("hf://org/model@step1000/model.safetensors", start=10, end=1_010) == local[10:1_010]
    cdn = [r for r in base.log() if r["server"] == "cdn"]
    assert [r["fault"] for r in cdn] == ["503", "drop", None]
    assert len({r["range"] for r in cdn}) == 1


def test_hub_server_that_ignores_range(hub_server, revisions):
    from huggingface_hub import HfFileSystem

    base = hub_server({"org/model": {"step1000": revisions["step1000"]}}, ignore_range=True)
    fs = HfFileSystem(endpoint=base)
    path = "hf://org/model@step1000/model.safetensors"
    local = (revisions["step1000"] / "model.safetensors").read_bytes()
    # client behaviour: huggingface_hub does not check that a ranged GET got a range (206 /
    # Content-Range): the buffered file takes the whole body as the block asked for, so a read at an
    # offset silently returns the bytes from the start of the file
    assert fs.cat_file(path, start=100, end=200) == local[:100] != local[100:200]
    with fs.open(path, cache_type="none") as f:
        f.seek(1000)
        assert f.read(10) == local  # no cache: the whole body comes back from a 10-byte read
    assert {r["status"] for r in base.log() if r["server"] == "cdn"} == {200}
