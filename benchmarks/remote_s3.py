"""wdiff reading a run folder on S3 (``wdiff run s3://bucket/run``) against ``s3fs`` copying it to disk.

Everything is local: a moto S3 server (``python -m moto.server -H 127.0.0.1 -p PORT``, a separate
process, stopped at the end, also on error or Ctrl-C) and clients pointed at it through
``AWS_ENDPOINT_URL`` with dummy credentials. A run of N checkpoints x SIZE (default 6 x 1 GB bf16,
``make_data.py``'s Llama-like tensors, each checkpoint = the previous + small noise) is made in a temp
folder, uploaded as ``s3://wdiff-bench/run/checkpoint-<step>/model.safetensors`` and the local copy
deleted (``--data DIR`` keeps and reuses it). moto spills every object above 16 MiB to a temporary
file: its ``TMPDIR`` is a folder of its own, and the upload is over before any disk baseline is taken.

Measured in rounds (the order of the cases rotates each round; the machine is shared, so every speed
is also given as a ratio to the baseline of the same round, then the median of those ratios):

- ``get``: the baseline, ``s3fs.S3FileSystem().get("wdiff-bench/run", LOCALDIR, recursive=True)`` with
  default settings (every file at once, each in 50 MiB ranged GETs, 10 in flight per file); bytes of
  the objects / seconds.
- ``wdiff cN``: ``python -m wdiff run s3://wdiff-bench/run -o OUT --no-render --quiet --chunk-mb N``
  (N = 16, the default, 64, 256), a child process: throughput as ``timing.read_bytes /
  timing.compute_seconds`` from OUT/summary.json and as object bytes / wall time of the whole command.
  While it runs, a sampler (every 50 ms) takes: the used bytes of the filesystems of OUT and of wdiff's
  own TMPDIR (``shutil.disk_usage``, minus the value before the run: the whole machine's writes, noisy);
  the same attributed to wdiff (blocks of the files in OUT, in its TMPDIR and working folder, and of the
  deleted files it holds open); the bytes held in its in-memory files (``memfd``: what ``fetch`` puts
  the ranges in; not part of RSS); and moto's RSS. Peak RSS of wdiff is exact (``ru_maxrss`` through
  ``measure.py``). "Disk besides results" is the peak minus the final size of OUT.
- ``wdiff cN pP``: tuning, not wdiff as shipped: the same with ``readers.remote.PART_BYTES`` set to P
  MiB (and optionally ``IN_FLIGHT``) before the CLI starts (``--tune 64:32,256:64[:16]``).
- ``ranges R MiB``: the ceiling of the server for wdiff's way of reading: ``fs.cat_file(path, start,
  end)`` over every object in R MiB ranges (range k of every object, then range k + 1, ...), from
  ``--concurrency`` threads (16 = wdiff's ``IN_FLIGHT``), results dropped.
- GET requests of each case, counted in moto's request log, per GB of checkpoint data.

moto answers a ranged GET by reading the whole object into memory and slicing it
(``moto/s3/models.py`` ``FakeKey.value``, ``responses.py`` ``_handle_range_header``), under one lock per
object: every request costs O(object size). ``--server ranged`` (or ``both``) runs moto with a patch
in its process that reads only the requested range (like a real store) to tell the server's cost from
wdiff's.

Targets (the issue): wdiff's throughput >= 80% of ``s3fs get`` on the same objects; wdiff's local disk
use below 256 MiB on 6 x 1 GB, besides its results in OUT.

    python benchmarks/remote_s3.py                          # 6 x 1 GB bf16, stock moto, 3 rounds (~1 h)
    python benchmarks/remote_s3.py --quick                  # 6 x 64 MB, about a minute
    python benchmarks/remote_s3.py --server both --tune 64:32,256:64
    python benchmarks/remote_s3.py --size-mb 256 --rounds 1 --chunk-mb 16

Run it with the project's interpreter (``.venv/bin/python``: s3fs, moto[server], psutil). wdiff is
run as ``python -m wdiff`` with the ``wdiff/`` of this checkout (``--src``, ``--ref`` for another).
Writes ``benchmarks/remote_s3.md`` and ``remote_s3.json`` (``--quick``: ``remote_s3-quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from make_data import DEFAULT_DIR, make_sequence, parse_size, size_label  # noqa: E402
from run import _read, code_hash, machine, med  # noqa: E402

MIB = 2**20
MB = 1e6
TARGET_RATIO = 0.80  # wdiff throughput >= 80% of s3fs get
TARGET_DISK_MIB = 256  # local disk besides OUT, 6 x 1 GB
BUCKET = "wdiff-bench"
PREFIX = "run"
STEP = 500  # checkpoint-500, checkpoint-1000, ...
SAMPLE_S = 0.05

# moto with ranged GETs that read only their range (run as `python -c RANGED_MOTO -H ... -p ...`).
RANGED_MOTO = r"""
import sys, threading
from moto.s3 import models as M, responses as R

_tl = threading.local()
_value = M.FakeKey.value


class _Window:
    # what get_object returns for a ranged GET: _handle_range_header takes len() and one slice
    def __init__(self, key):
        self.key = key

    def __len__(self):
        return self.key.size

    def __bool__(self):
        return True

    def __getitem__(self, s):
        start, stop, _ = s.indices(self.key.size)
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return self.key._value_buffer.read(max(0, stop - start))


def _get(key):
    return _Window(key) if getattr(_tl, "ranged", False) else _value.fget(key)


M.FakeKey.value = property(_get, _value.fset)
_get_object = R.S3Response.get_object


def get_object(self):
    spec = self.headers.get("Range") or ""
    _tl.ranged = spec.startswith("bytes=") and "," not in spec and not self.querystring.get("partNumber")
    try:
        return _get_object(self)
    finally:
        _tl.ranged = False


R.S3Response.get_object = get_object
_handle = R.S3Response._handle_range_header


def _handle_range_header(self, request, headers, content):
    status, headers, content = _handle(self, request, headers, content)
    if isinstance(content, _Window):  # a range moto does not slice: the whole object, as moto would
        content = content[0 : len(content)]
    return status, headers, content


R.S3Response._handle_range_header = _handle_range_header

from moto.server import main

main(sys.argv[1:])
"""

# wdiff's CLI with readers.remote's PART_BYTES / IN_FLIGHT set first ("-": unchanged).
TUNED_WDIFF = r"""
import sys
import wdiff.readers.remote as r
part, flight = sys.argv[1:3]
del sys.argv[1:3]
if part != "-":
    r.PART_BYTES = int(part)
if flight != "-":
    r.IN_FLIGHT = int(flight)
from wdiff.cli import main
sys.argv[0] = "wdiff"
sys.exit(main())
"""


# ---------------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto server process on 127.0.0.1 with its own TMPDIR and request log; ``stop`` ends it."""

    def __init__(self, kind: str, work: Path, python: str):
        self.kind = kind
        self.port = free_port()
        self.tmp = work / f"moto-{kind}-tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = work / f"moto-{kind}.log"
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1")
        args = ["-H", "127.0.0.1", "-p", str(self.port)]
        cmd = [python, "-m", "moto.server", *args] if kind == "stock" else [python, "-c", RANGED_MOTO, *args]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=work,
            start_new_session=True,
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not listen on {self.port} within 60 s") from None
                time.sleep(0.1)

    def log_tail(self) -> str:
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")

    def log_offset(self) -> int:
        self.log.flush()
        return self.log_path.stat().st_size

    def gets_since(self, offset: int) -> dict:
        """GETs of the run's objects logged after ``offset``: count, and by status."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        pat = re.compile(
            rf'"(?:\x1b\[[0-9;]*m)*GET /{BUCKET}/{PREFIX}/[^ ?"]+ HTTP/[0-9.]+(?:\x1b\[0m)?" (\d+)'
        )
        by: dict[str, int] = {}
        for m in pat.finditer(text):
            by[m.group(1)] = by.get(m.group(1), 0) + 1
        return {"gets": sum(by.values()), "by_status": by}

    def rss(self) -> int:
        try:
            return _status_kib(self.proc.pid, "VmRSS") * 1024
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def s3() -> object:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)  # default settings, a fresh client


def warm_client(fs: object, objects: list[dict], threads: int) -> None:
    """One HEAD per object from ``threads`` threads, untimed: the client's session and service model
    (~0.5 s on this machine) and its connections are made before the clock starts, as wdiff's are
    before its compute phase (its scan lists and reads the headers first)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda o: fs.info(o["key"]), objects * max(1, threads // max(1, len(objects)))))


def upload(files: list[Path]) -> list[dict]:
    fs = s3()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    objects = []
    for t, f in enumerate(files):
        key = f"{BUCKET}/{PREFIX}/checkpoint-{STEP * (t + 1)}/model.safetensors"
        fs.put_file(str(f), key)
        objects.append({"key": key, "size": f.stat().st_size})
    fs.invalidate_cache()
    listed = {o["name"]: o["size"] for o in fs.find(f"{BUCKET}/{PREFIX}", detail=True).values()}
    for o in objects:
        if listed.get(o["key"]) != o["size"]:
            raise RuntimeError(f"upload: {o['key']} is {listed.get(o['key'])} bytes, not {o['size']}")
    return objects


# ---------------------------------------------------------------------------------------------------
# what a process uses, sampled


def du(path: Path) -> int:
    """Allocated bytes of the files under ``path`` (st_blocks; sparse holes not counted)."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


def fd_bytes(pid: int) -> tuple[int, int]:
    """(allocated bytes of deleted regular files ``pid`` holds open, bytes held in its memfds)."""
    deleted = memfd = 0
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0, 0
    seen: set[tuple[int, int]] = set()
    for fd in fds:
        p = f"{fd_dir}/{fd}"
        try:
            target = os.readlink(p)
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        if target.startswith("/memfd:"):
            memfd += st.st_blocks * 512
        elif target.endswith(" (deleted)") and os.path.isabs(target):
            deleted += st.st_blocks * 512
    return deleted, memfd


class Sampler(threading.Thread):
    """Every ``SAMPLE_S``: disk use (whole filesystems, and attributed to wdiff), wdiff's memfds and
    RSS, moto's RSS. ``launcher``: the measure.py process; wdiff is its child."""

    def __init__(self, launcher: int, dirs: list[Path], out: Path, moto: Moto):
        super().__init__(daemon=True)
        self.launcher, self.dirs, self.out, self.moto = launcher, dirs, out, moto
        devs: dict[int, Path] = {}
        for d in [out.parent, *dirs]:
            devs.setdefault(os.stat(d).st_dev, d)
        self.fs_paths = list(devs.values())
        self.fs_base = self._fs_used()
        self.pid: int | None = None
        self.peak = {"fs_delta": 0, "attributed": 0, "memfd": 0, "deleted": 0, "rss": 0, "moto_rss": 0}
        self.samples = 0
        self.done = threading.Event()

    def _fs_used(self) -> int:
        return sum(shutil.disk_usage(p).used for p in self.fs_paths)

    def _child(self) -> int | None:
        try:
            import psutil

            kids = psutil.Process(self.launcher).children()
            return kids[0].pid if kids else None
        except Exception:
            return None

    def sample(self) -> None:
        if self.pid is None:
            self.pid = self._child()
        p = self.peak
        p["fs_delta"] = max(p["fs_delta"], self._fs_used() - self.fs_base)
        deleted, memfd = fd_bytes(self.pid) if self.pid else (0, 0)
        attributed = du(self.out) + sum(du(d) for d in self.dirs) + deleted
        p["attributed"] = max(p["attributed"], attributed)
        p["deleted"] = max(p["deleted"], deleted)
        p["memfd"] = max(p["memfd"], memfd)
        if self.pid:
            try:
                p["rss"] = max(p["rss"], _status_kib(self.pid, "VmRSS") * 1024)
            except OSError:
                pass
        p["moto_rss"] = max(p["moto_rss"], self.moto.rss())
        self.samples += 1

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(SAMPLE_S)


# ---------------------------------------------------------------------------------------------------
# the cases


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, python: str):
        self.args, self.work, self.python = args, work, python
        self.objects: list[dict] = []
        self.moto: Moto | None = None
        self.wenv = dict(os.environ, NUMBA_CACHE_DIR=str(DEFAULT_DIR / "numba-cache"), **args.wdiff_env)

    @property
    def object_bytes(self) -> int:
        return sum(o["size"] for o in self.objects)

    def _gets(self, offset: int) -> dict:
        assert self.moto is not None
        g = self.moto.gets_since(offset)
        g["gets_per_gb"] = g["gets"] / (self.object_bytes / 1e9)
        g["mb_per_get"] = self.object_bytes / max(g["gets"], 1) / MB
        return g

    def get(self) -> dict:
        """The baseline: s3fs get of the whole run to local disk (deleted after)."""
        assert self.moto is not None
        dest = self.work / "get"
        shutil.rmtree(dest, ignore_errors=True)
        fs = s3()
        warm_client(fs, self.objects, 10)
        offset = self.moto.log_offset()
        peak_moto = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak_moto[0] = max(peak_moto[0], self.moto.rss())  # type: ignore[union-attr]
                stop.wait(SAMPLE_S)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        t0 = time.perf_counter()
        fs.get(f"{BUCKET}/{PREFIX}", str(dest), recursive=True)
        seconds = time.perf_counter() - t0
        stop.set()
        w.join()
        got = sum(f.stat().st_size for f in dest.rglob("*.safetensors"))
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["sync"], check=False)
        if got != self.object_bytes:
            raise RuntimeError(f"s3fs get brought {got} bytes, not {self.object_bytes}")
        r = {"seconds": seconds, "bytes": got, "mbps": got / seconds / MB, "moto_rss_mib": peak_moto[0] / MIB}
        r.update(self._gets(offset))
        return r

    def ranges(self, range_mib: int) -> dict:
        """The server's ceiling for reads of ``range_mib`` MiB from ``--concurrency`` threads."""
        assert self.moto is not None
        fs = s3()
        step = range_mib * MIB
        most = max(o["size"] for o in self.objects)
        jobs = [
            (o["key"], a, min(a + step, o["size"]))
            for a in range(0, most, step)
            for o in self.objects
            if a < o["size"]
        ]
        warm_client(fs, self.objects, self.args.concurrency)
        offset = self.moto.log_offset()
        peak_moto = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak_moto[0] = max(peak_moto[0], self.moto.rss())  # type: ignore[union-attr]
                stop.wait(SAMPLE_S)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            got = sum(pool.map(lambda j: len(fs.cat_file(j[0], start=j[1], end=j[2])), jobs))
        seconds = time.perf_counter() - t0
        stop.set()
        w.join()
        if got != self.object_bytes:
            raise RuntimeError(f"ranges: {got} bytes, not {self.object_bytes}")
        r = {
            "seconds": seconds,
            "bytes": got,
            "mbps": got / seconds / MB,
            "requests": len(jobs),
            "moto_rss_mib": peak_moto[0] / MIB,
        }
        r.update(self._gets(offset))
        return r

    def wdiff(self, chunk_mb: float, part_mib: float | None = None, in_flight: int | None = None) -> dict:
        assert self.moto is not None
        out = self.work / "wdiff-out"
        tmp = self.work / "wdiff-tmp"
        cwd = self.work / "wdiff-cwd"
        for d in (out, tmp, cwd):
            shutil.rmtree(d, ignore_errors=True)
        tmp.mkdir()
        cwd.mkdir()
        url = f"s3://{BUCKET}/{PREFIX}"
        wargs = ["run", url, "-o", str(out), "--no-render", "--quiet", "--chunk-mb", f"{chunk_mb:g}"]
        wargs += self.args.wdiff_args.split()
        if part_mib is None and in_flight is None:
            cmd = [self.python, "-m", "wdiff", *wargs]
        else:
            part = str(int(part_mib * MIB)) if part_mib else "-"
            cmd = [self.python, "-c", TUNED_WDIFF, part, str(in_flight) if in_flight else "-", *wargs]
        env = dict(self.wenv, TMPDIR=str(tmp))
        subprocess.run(["sync"], check=False)
        offset = self.moto.log_offset()
        fd, result = tempfile.mkstemp(prefix="measure-", suffix=".json", dir=self.work)
        os.close(fd)
        log = self.work / "wdiff.log"
        with open(log, "wb") as lf:
            launcher = subprocess.Popen(
                [sys.executable, "-I", "-S", str(HERE / "measure.py"), result, "--", *cmd],
                stdout=lf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
            )
            sampler = Sampler(launcher.pid, [tmp, cwd], out, self.moto)
            sampler.start()
            launcher.wait()
            sampler.done.set()
            sampler.join()
            sampler.sample()  # OUT as left: the peak is never below the final size
        with open(result) as f:
            m = json.load(f)
        os.unlink(result)
        if m["returncode"] != 0:
            raise RuntimeError(
                f"wdiff exited with {m['returncode']}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        timing = json.loads((out / "summary.json").read_text())["timing"]
        out_bytes = du(out)
        out_apparent = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        left = du(tmp) + du(cwd)
        pk = sampler.peak
        r = {
            "wall": m["wall"],
            "read_bytes": timing["read_bytes"],
            "compute_seconds": timing["compute_seconds"],
            "total_seconds": timing.get("total_seconds"),
            "compute_mbps": timing["read_bytes"] / timing["compute_seconds"] / MB,
            "wall_mbps": self.object_bytes / m["wall"] / MB,
            "rss_mib": max(m["maxrss_kib"], m["tree_maxrss_kib"]) / 1024,
            "rss_sampled_mib": pk["rss"] / MIB,
            "memfd_peak_mib": pk["memfd"] / MIB,
            "out_mib": out_bytes / MIB,
            "out_apparent_mib": out_apparent / MIB,
            "disk_peak_attributed_mib": pk["attributed"] / MIB,
            "disk_besides_out_mib": (pk["attributed"] - out_bytes) / MIB,
            "deleted_open_peak_mib": pk["deleted"] / MIB,
            "left_in_tmp_mib": left / MIB,
            "fs_peak_delta_mib": pk["fs_delta"] / MIB,
            "fs_besides_out_mib": (pk["fs_delta"] - out_bytes) / MIB,
            "moto_rss_mib": pk["moto_rss"] / MIB,
            "samples": sampler.samples,
        }
        r.update(self._gets(offset))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cwd, ignore_errors=True)
        return r


def case_list(args: argparse.Namespace) -> list[dict]:
    cases = [{"name": "get", "kind": "get"}]
    for c in args.chunk_mb:
        cases.append({"name": f"wdiff c{c:g}", "kind": "wdiff", "chunk_mb": c})
    for chunk, part, flight in args.tune:
        name = f"wdiff c{chunk:g} p{part:g}" + (f" f{flight}" if flight else "")
        cases.append(
            {"name": name, "kind": "wdiff", "chunk_mb": chunk, "part_mib": part, "in_flight": flight}
        )
    for r in args.ranges_mib:
        cases.append({"name": f"ranges {r} MiB", "kind": "ranges", "range_mib": r})
    return cases


def run_case(b: Bench, case: dict) -> dict:
    if case["kind"] == "get":
        return b.get()
    if case["kind"] == "ranges":
        return b.ranges(case["range_mib"])
    return b.wdiff(case["chunk_mb"], case.get("part_mib"), case.get("in_flight"))


def speed(kind: str, r: dict, basis: str = "compute") -> float:
    if kind == "wdiff":
        return r["compute_mbps"] if basis == "compute" else r["wall_mbps"]
    return r["mbps"]


def summarize(cases: list[dict], runs: dict[str, list[dict]]) -> dict:
    base = runs["get"]
    out: dict = {}
    for c in cases:
        rs = runs[c["name"]]
        e: dict = {"kind": c["kind"], "rounds": len(rs)}
        for basis in ("compute", "wall") if c["kind"] == "wdiff" else ("compute",):
            sp = [speed(c["kind"], r, basis) for r in rs]
            ratio = [speed(c["kind"], r, basis) / g["mbps"] for r, g in zip(rs, base)]
            key = "mbps" if basis == "compute" else "wall_mbps"
            e[key] = med(sp)
            e[key + "_range"] = [min(sp), max(sp)]
            e[key.replace("mbps", "ratio")] = med(ratio)
            e[key.replace("mbps", "ratio") + "_range"] = [min(ratio), max(ratio)]
        e["gets"] = med([r["gets"] for r in rs])
        e["gets_per_gb"] = med([r["gets_per_gb"] for r in rs])
        e["mb_per_get"] = med([r["mb_per_get"] for r in rs])
        e["moto_rss_mib"] = max(r["moto_rss_mib"] for r in rs)
        e["seconds"] = med([r["wall"] if c["kind"] == "wdiff" else r["seconds"] for r in rs])
        if c["kind"] == "wdiff":
            for k in (
                "rss_mib",
                "memfd_peak_mib",
                "disk_besides_out_mib",
                "fs_besides_out_mib",
                "out_mib",
                "deleted_open_peak_mib",
                "left_in_tmp_mib",
            ):
                e[k] = max(r[k] for r in rs)
            e["compute_seconds"] = med([r["compute_seconds"] for r in rs])
            e["read_bytes"] = rs[0]["read_bytes"]
        out[c["name"]] = e
    return out


def verdict(s: dict, default: str, small: str | None, big: str | None, concurrency: int) -> str:
    """Which of the server and wdiff limits wdiff, from the medians: the server's cost of wdiff's GETs
    and bytes, from the ceiling cases (per GET and per byte), against wdiff's compute seconds."""
    e, g = s[default], s["get"]["mbps"]
    w = e["mbps"]
    parts = [
        f"wdiff ({default}) reads at {w:.0f} MB/s against {g:.0f} MB/s for s3fs get ({e['ratio']:.2f} x get, "
        f"median of the rounds' ratios), in {e['gets']:.0f} GETs of {e['mb_per_get']:.1f} MB on average "
        f"(s3fs get: {s['get']['gets']:.0f} of {s['get']['mb_per_get']:.1f} MB)"
    ]
    if not small:
        return "; ".join(parts) + "."
    c = s[small]
    nbytes = e["read_bytes"]
    if big and big != small:
        # the server's time t = a x GETs + b x bytes, through the two ceilings (a, b >= 0)
        d = s[big]
        a = (
            max(0.0, (c["seconds"] - d["seconds"]) / (c["gets"] - d["gets"]))
            if c["gets"] != d["gets"]
            else 0.0
        )
        b = max(0.0, min(c["seconds"] - a * c["gets"], d["seconds"] - a * d["gets"]) / nbytes)
        model = f"t = {a * 1000:.0f} ms x GETs + {b * 1e9:.2f} s x GB, through the two ceilings"
    else:
        a, b = c["seconds"] / c["gets"], 0.0
        model = f"{a * 1000:.0f} ms per GET"
    server_s = a * e["gets"] + b * nbytes
    share = server_s / e["compute_seconds"]
    parts.append(
        f"the server answers {small} requests at {c['mbps']:.0f} MB/s ({concurrency} in flight); its cost "
        f"({model}) for wdiff's {e['gets']:.0f} GETs and {nbytes / 1e9:.2f} GB is {server_s:.1f} s, "
        f"{share:.0%} of wdiff's {e['compute_seconds']:.1f} s of compute"
    )
    if big:
        parts.append(f"with {big} requests the server gives {s[big]['mbps']:.0f} MB/s")
    if share >= 0.8:
        parts.append(
            "bottleneck: the SERVER's cost per request (wdiff gets what the server gives to that many "
            "requests"
            + ("; s3fs get makes fewer, bigger ones)" if s["get"]["gets"] < 0.8 * e["gets"] else ")")
        )
    else:
        parts.append(
            "bottleneck: wdiff's side (its requests, the copies into in-memory files, the compute and the "
            "results write; here on the same 2 cores as the server), not the server"
        )
    return "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------------
# report


def _r(x: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(x[0])}-{fmt.format(x[1])}" if x else ""


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [
        f"## wdiff on S3 (moto) against s3fs get ({m['date'][:10]})",
        "",
        f"Made by `{cfg['command']}` on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB; `free -h`: "
        f"{results['free']}), wdiff at {cfg['code']}; load average {' '.join(m['loadavg_start'])} at start, "
        f"{' '.join(results.get('loadavg_end', []))} at end.",
        "",
        f"{cfg['count']} checkpoints x {size_label(cfg['size'])} {cfg['dtype']} "
        f"({cfg['object_bytes'] / 1e9:.3f} GB of objects, {cfg['tensors']} tensors each) as "
        f"`s3://{BUCKET}/{PREFIX}/checkpoint-N/model.safetensors` on a local moto "
        f"{results['versions']['moto']} "
        f"server (s3fs {results['versions']['s3fs']}); {cfg['rounds']} round(s), case order rotating; "
        'MB = 10^6 bytes. Speeds are medians (range over rounds); "x get" is the median of the per-round '
        'ratios to the s3fs get of the same round. wdiff: `read_bytes / compute_seconds` ("compute") and '
        'object bytes / wall time of the whole command ("wall").',
        "",
    ]
    for server, sres in results["servers"].items():
        s = sres["summary"]
        lines += [
            f"### Server: {server}"
            + (
                " (moto as installed: a ranged GET reads the whole object)"
                if server == "stock"
                else " (moto patched in its process: a ranged GET reads only its range)"
            ),
            "",
            f"Upload {sres['upload_seconds']:.0f} s.",
            "",
            "| case | MB/s | x get | wall MB/s | wall x get | GETs | GETs/GB | MB/GET "
            "| peak disk besides OUT MiB (attributed / whole fs) | OUT MiB | peak RSS MiB | peak memfd MiB "
            "| moto peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in s.items():
            cells = [
                name,
                f"{e['mbps']:.0f} ({_r(e['mbps_range'])})",
                f"{e['ratio']:.2f} ({_r(e['ratio_range'], '{:.2f}')})",
            ]
            if e["kind"] == "wdiff":
                cells += [
                    f"{e['wall_mbps']:.0f} ({_r(e['wall_mbps_range'])})",
                    f"{e['wall_ratio']:.2f} ({_r(e['wall_ratio_range'], '{:.2f}')})",
                ]
            else:
                cells += ["", ""]
            cells += [f"{e['gets']:.0f}", f"{e['gets_per_gb']:.0f}", f"{e['mb_per_get']:.1f}"]
            if e["kind"] == "wdiff":
                cells += [
                    f"{e['disk_besides_out_mib']:.0f} / {e['fs_besides_out_mib']:.0f}",
                    f"{e['out_mib']:.0f}",
                    f"{e['rss_mib']:.0f}",
                    f"{e['memfd_peak_mib']:.0f}",
                ]
            else:
                cells += ["", "", "", ""]
            cells.append(f"{e['moto_rss_mib']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", sres["verdict"], ""]
        lines += ["| target | measured | result |", "|---|---|---|"]
        for t in sres["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'**pass**' if t['pass'] else '**FAIL**'} |")
        lines.append("")
    return "\n".join(lines)


def targets(s: dict, default: str, cfg: dict) -> list[dict]:
    e = s[default]
    full = cfg["count"] >= 6 and cfg["size"] >= 10**9
    wd = [x for x in s.values() if x["kind"] == "wdiff"]
    disk = max(x["disk_besides_out_mib"] for x in wd)
    fs_disk = max(x["fs_besides_out_mib"] for x in wd)
    return [
        {
            "target": f"wdiff ({default}) throughput >= {TARGET_RATIO:.0%} of s3fs get (compute)",
            "measured": f"{e['ratio']:.2f} x get (rounds {_r(e['ratio_range'], '{:.2f}')})",
            "pass": e["ratio"] >= TARGET_RATIO,
        },
        {
            "target": "the same, whole command wall time",
            "measured": f"{e['wall_ratio']:.2f} x get (rounds {_r(e['wall_ratio_range'], '{:.2f}')})",
            "pass": e["wall_ratio"] >= TARGET_RATIO,
        },
        {
            "target": f"local disk besides OUT < {TARGET_DISK_MIB} MiB"
            + ("" if full else f" (checked at 6 x 1 GB; this is {cfg['count']} x {size_label(cfg['size'])})"),
            "measured": f"{disk:.0f} MiB attributed, {fs_disk:.0f} MiB whole filesystem (worst case over all "
            "wdiff runs)",
            "pass": disk < TARGET_DISK_MIB,
        },
    ]


def render(results: dict) -> str:
    """The verdict and targets of every server (from the medians), then the markdown."""
    cfg = results["config"]
    default = f"wdiff c{cfg['chunk_mb'][0]:g}"
    rs = cfg["ranges_mib"]
    small_r = f"ranges {min(rs)} MiB" if rs else None
    big_r = f"ranges {max(rs)} MiB" if len(rs) > 1 else None
    for sres in results["servers"].values():
        s = sres["summary"]
        sres["verdict"] = verdict(s, default, small_r, big_r, cfg["concurrency"])
        sres["targets"] = targets(s, default, cfg)
    return markdown(results)


# ---------------------------------------------------------------------------------------------------


def _tune(text: str) -> list[tuple[float, float, int | None]]:
    out = []
    for item in filter(None, text.split(",")):
        f = item.split(":")
        if len(f) not in (2, 3):
            raise argparse.ArgumentTypeError(f"--tune: {item!r} is not CHUNK_MB:PART_MIB[:IN_FLIGHT]")
        out.append((float(f[0]), float(f[1]), int(f[2]) if len(f) == 3 else None))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GB", help="data bytes per checkpoint (default %(default)s)")
    ap.add_argument("--size-mb", type=float, help="the same in MB (overrides --size)")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--quick", action="store_true", help="6 x 64 MB, stock server (about a minute)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server", choices=("stock", "ranged", "both"), default="stock")
    ap.add_argument("--chunk-mb", default="16,64,256", help="wdiff --chunk-mb values (default %(default)s)")
    ap.add_argument(
        "--tune",
        type=_tune,
        default=[],
        help="CHUNK_MB:PART_MIB[:IN_FLIGHT],...: wdiff with "
        "readers.remote.PART_BYTES (and IN_FLIGHT) overridden",
    )
    ap.add_argument("--ranges-mib", default="8,64", help="range sizes of the ceiling (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=16, help="threads of the ceiling (wdiff's IN_FLIGHT)")
    ap.add_argument(
        "--data",
        type=Path,
        help="make (or reuse) the local copy here and keep it (default: a "
        "temp folder, deleted after the upload)",
    )
    ap.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()), help="parent of the work folder"
    )
    ap.add_argument("--ref", help="benchmark wdiff/ as of this git commit")
    ap.add_argument("--src", type=Path, help="a folder holding the wdiff/ package to benchmark")
    ap.add_argument("--wdiff-args", default="", help="extra options for every wdiff run")
    ap.add_argument("--out", type=Path, help="markdown (default benchmarks/remote_s3[-quick].md)")
    ap.add_argument("--json", type=Path, help="default: --out with .json")
    ap.add_argument(
        "--from-json", type=Path, help="measure nothing: re-render the markdown from a results JSON"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        text = render(results)
        (args.out or args.from_json.with_suffix(".md")).write_text(text)
        print(text)
        return 0
    if args.quick:
        args.size = "64MB"
    size = int(args.size_mb * MB) if args.size_mb else parse_size(args.size)
    args.chunk_mb = [float(x) for x in args.chunk_mb.split(",") if x]
    args.ranges_mib = [int(x) for x in args.ranges_mib.split(",") if x]
    out_md = args.out or HERE / ("remote_s3-quick.md" if args.quick else "remote_s3.md")
    out_json = args.json or out_md.with_suffix(".json")
    servers = ["stock", "ranged"] if args.server == "both" else [args.server]
    try:
        import psutil  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        print(f"remote_s3: needs {e.name} (run with the project's .venv/bin/python)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="wdiff-remote-s3-", dir=args.work))
    need = 1.1 * args.count * size * (2 if args.data is None else 1) + args.count * size * 2 + 2**30
    if shutil.disk_usage(work).free < need:
        print(f"remote_s3: needs ~{need / 1e9:.0f} GB free in {work}", file=sys.stderr)
        return 2

    src, snapshot = REPO, None
    python = (
        str(REPO / ".venv" / "bin" / "python")
        if (REPO / ".venv" / "bin" / "python").exists()
        else sys.executable
    )
    if args.ref:
        snapshot = work / "src"
        snapshot.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.ref, "wdiff"], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True)
        src = snapshot
    elif args.src:
        src = args.src.resolve()
    args.wdiff_env = {"PYTHONPATH": str(src)}
    code = f"`{args.ref}`" if args.ref else f"`{src}` (`{code_hash(src)}`)"
    subprocess.run([python, "-m", "compileall", "-q", str(src / "wdiff")], check=True)

    from importlib.metadata import version

    results: dict = {
        "config": {
            "command": "python benchmarks/remote_s3.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "size": size,
            "count": args.count,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "code": code,
            "chunk_mb": args.chunk_mb,
            "tune": args.tune,
            "ranges_mib": args.ranges_mib,
            "concurrency": args.concurrency,
            "python": python,
            "wdiff_args": args.wdiff_args,
        },
        "machine": machine(args.ref),
        "free": " ".join(
            subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.split("\n")[1].split()
        ),
        "versions": {
            p: version(p) for p in ("moto", "s3fs", "fsspec", "aiobotocore", "botocore", "werkzeug")
        },
        "code_hash_start": code_hash(src),
        "servers": {},
    }
    saved_env = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    moto: Moto | None = None

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        # the local copy, and Numba's cache (one untimed local run of 2 small checkpoints)
        hidden, ffn = (4096, 11008) if size >= 512 * 10**6 else (1024, 2816)
        data_root = args.data or (work / "data")
        files = make_sequence(data_root, args.count, size, args.dtype, hidden=hidden, ffn=ffn)
        with open(files[0], "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            results["config"]["tensors"] = len([k for k in json.loads(f.read(n)) if k != "__metadata__"])
        small = make_sequence(work / "warm", 2, parse_size("16MB"), args.dtype, verbose=False)
        env = dict(os.environ, NUMBA_CACHE_DIR=str(DEFAULT_DIR / "numba-cache"), **args.wdiff_env)
        subprocess.run(
            [
                python,
                "-m",
                "wdiff",
                "run",
                *map(str, small),
                "-o",
                str(work / "warm-out"),
                "--no-render",
                "--quiet",
            ],
            env=env,
            cwd=work,
            check=True,
        )
        shutil.rmtree(work / "warm", ignore_errors=True)
        shutil.rmtree(work / "warm-out", ignore_errors=True)

        cases = case_list(args)
        for si, server in enumerate(servers):
            moto = Moto(server, work, python)
            os.environ.update(
                AWS_ENDPOINT_URL=moto.endpoint,
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="us-east-1",
            )
            t0 = time.perf_counter()
            objects = upload(files)
            upload_s = time.perf_counter() - t0
            print(
                f"remote_s3: {server} moto on :{moto.port}, uploaded {len(objects)} objects "
                f"({sum(o['size'] for o in objects) / 1e9:.2f} GB) in {upload_s:.0f} s",
                file=sys.stderr,
            )
            if si == len(servers) - 1 and args.data is None:
                shutil.rmtree(data_root, ignore_errors=True)  # the local copy: gone before any disk baseline
            subprocess.run(["sync"], check=False)
            b = Bench(args, work, python)
            b.objects, b.moto = objects, moto
            results["config"]["object_bytes"] = b.object_bytes
            runs: dict[str, list[dict]] = {c["name"]: [] for c in cases}
            for i in range(args.rounds):
                k = i % len(cases)
                for c in cases[k:] + cases[:k]:
                    r = run_case(b, c)
                    runs[c["name"]].append(r)
                    sp = speed(c["kind"], r)
                    extra = (
                        f" wall {r['wall']:6.1f} s ({r['wall_mbps']:5.0f} MB/s) rss {r['rss_mib']:.0f} MiB "
                        f"memfd {r['memfd_peak_mib']:.0f} MiB disk+ {r['disk_besides_out_mib']:.0f} MiB "
                        f"(fs {r['fs_besides_out_mib']:.0f}) out {r['out_mib']:.0f} MiB"
                        if c["kind"] == "wdiff"
                        else f" {r['seconds']:6.1f} s"
                    )
                    print(
                        f"  {server} round {i + 1}/{args.rounds} {c['name']:16s} {sp:6.0f} MB/s "
                        f"GETs {r['gets']:5d} moto {r['moto_rss_mib']:5.0f} MiB{extra}",
                        file=sys.stderr,
                    )
            moto.stop()
            moto = None
            results["servers"][server] = {
                "upload_seconds": upload_s,
                "runs": runs,
                "summary": summarize(cases, runs),
            }
    finally:
        if moto is not None:
            moto.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results["code_hash_end"] = code_hash(src)
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    text = render(results)
    out_md.write_text(text)
    out_json.write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
