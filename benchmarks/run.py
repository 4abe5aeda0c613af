"""wdiff benchmark harness: wdiff against `cat` (the I/O floor) and the naive numpy loop.

For every size it makes (or reuses) a synthetic checkpoint sequence (``make_data.py``), reads it once
to warm the page cache, then runs rounds of ``cat FILES > /dev/null``, the naive loop (``naive.py``)
and ``wdiff run FILES -o OUT --no-render --quiet``, rotating their order each round. Every run is a
child process: its wall time is measured here, its peak RSS is the ``ru_maxrss`` that ``os.wait4``
returns for it (what ``/usr/bin/time -v`` calls "Maximum resident set size"), and wdiff's own
``summary.json`` gives ``timing.read_bytes`` and ``timing.compute_seconds``. Medians are reported,
and ratios are taken per round (the runs of one round are seconds apart, so machine noise mostly
cancels) and then their median.

    .venv/bin/python benchmarks/run.py                         # 128MB..1GB, fp32 and bf16, 3 repeats
    .venv/bin/python benchmarks/run.py --sizes 64MB,128MB --repeats 1
    .venv/bin/python benchmarks/run.py --big --sizes ''        # only the 3 x 10 GB case (~41 GB disk)

Writes ``benchmarks/results.md`` (a markdown section), ``results.json`` (raw numbers) and
``scaling.png`` (time against total checkpoint bytes). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from make_data import DEFAULT_DIR, make_sequence, parse_size, sequence_dir, size_label  # noqa: E402

MIB = 2**20
GB = 1e9

# The targets of the issue, checked at --target-size (6 x 1 GB) and on --big (3 x 10 GB).
TARGET_SPEEDUP = 6.0
TARGET_COMPUTE_VS_CAT = {"fp32": 0.40, "bf16": 0.30}
TARGET_RSS_MIB = 400
TARGET_BIG_RSS_MIB = 1024


# ---------------------------------------------------------------------------------------------------
# running one child


def run_child(cmd: list[str], log: Path | None, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` under ``measure.py``; return its wall seconds and peak memory in MiB.

    ``rss_mib``: the largest ``ru_maxrss`` of one process of the command's tree (the command itself,
    unless a child peaked higher); ``tree_pss_mib`` and ``tree_rss_mib``: the peak of the sum over
    the tree's live processes of their PSS (shared pages split between the processes that map them:
    the tree's honest memory) and of their RSS, sampled (``measure.py``).
    ``log`` gets the command's stdout and stderr (None: both to /dev/null).
    """
    fd, result = tempfile.mkstemp(prefix="measure-", suffix=".json")
    os.close(fd)
    try:
        with open(log or os.devnull, "wb") as out:
            subprocess.run(
                [sys.executable, "-I", "-S", str(HERE / "measure.py"), result, "--", *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
            )
        with open(result) as f:
            r = json.load(f)
    finally:
        os.unlink(result)
    if r["returncode"] != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {r['returncode']}:\n{tail}")
    # ru_maxrss is KiB on Linux; the tree's value is >= the command's own unless it spawned nothing
    return {
        "wall": r["wall"],
        "rss_mib": max(r["maxrss_kib"], r["tree_maxrss_kib"]) / 1024,
        "tree_pss_mib": r["tree_peak_pss_kib"] / 1024,
        "tree_rss_mib": r["tree_peak_rss_kib"] / 1024,
    }


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work  # outputs of the runs (deleted before every run)
        self.work.mkdir(parents=True, exist_ok=True)
        self.numba_cache = args.data / "numba-cache"
        self.env = dict(os.environ, NUMBA_CACHE_DIR=str(self.numba_cache), **args.wdiff_env)

    def cat(self, files: list[Path]) -> dict:
        return run_child(["cat", *map(str, files)], None)  # exactly `cat FILES > /dev/null`

    def wdiff_module(self) -> str:
        """The wdiff package the wdiff runs import (working tree or --ref snapshot)."""
        python = self.args.wdiff_cmd[0] if len(self.args.wdiff_cmd) > 1 else None
        if python is None:  # a console script: its interpreter is on the #! line
            with open(shutil.which(self.args.wdiff_cmd[0]) or self.args.wdiff_cmd[0]) as f:
                first = f.readline()
            python = first[2:].strip() if first.startswith("#!") else sys.executable
        return subprocess.run(
            [python, "-c", "import wdiff; print(wdiff.__file__)"],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def naive(self, files: list[Path]) -> dict:
        out = self.work / "naive.safetensors"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "naive.py"), *map(str, files), "-o", str(out)]
        r = run_child(cmd, self.work / "naive.log")
        out.unlink(missing_ok=True)
        return r

    def wdiff(self, files: list[Path], env: dict | None = None) -> dict:
        out = self.work / "wdiff-out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*self.args.wdiff_cmd, "run", *map(str, files), "-o", str(out), "--no-render", "--quiet"]
        cmd += self.args.wdiff_args.split()
        # cwd outside the repository: `python -m wdiff` would import ./wdiff before PYTHONPATH
        r = run_child(cmd, self.work / "wdiff.log", env or self.env, cwd=self.work)
        timing = json.loads((out / "summary.json").read_text())["timing"]
        r.update(
            compute_seconds=timing["compute_seconds"],
            read_bytes=timing["read_bytes"],
            total_seconds=timing.get("total_seconds"),
            chunks=timing.get("chunks"),
        )
        shutil.rmtree(out, ignore_errors=True)
        return r


# ---------------------------------------------------------------------------------------------------
# statistics


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def linfit(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares t = a + b * x; R^2."""
    if len(xs) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": a, "slope_s_per_gb": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def summarize(entry: dict) -> None:
    """Medians and per-round ratios of one size's runs, into ``entry['median']``."""
    runs = entry["runs"]
    total = entry["total_bytes"]
    m: dict = {}
    m["cat_s"] = med([r["wall"] for r in runs["cat"]])
    m["cat_gbps"] = total / m["cat_s"] / GB
    w = runs["wdiff"]
    m["wdiff_wall_s"] = med([r["wall"] for r in w])
    m["wdiff_compute_s"] = med([r["compute_seconds"] for r in w])
    m["wdiff_read_bytes"] = w[0]["read_bytes"]
    m["compute_gbps"] = med([r["read_bytes"] / r["compute_seconds"] / GB for r in w])
    m["wdiff_rss_mib"] = max(r["rss_mib"] for r in w)
    m["wdiff_rss_mib_median"] = med([r["rss_mib"] for r in w])
    # per round: compute throughput over cat throughput of the same round
    m["compute_vs_cat"] = med(
        [(r["read_bytes"] / r["compute_seconds"]) / (total / c["wall"]) for r, c in zip(w, runs["cat"])]
    )
    m["compute_vs_cat_range"] = _range(
        [(r["read_bytes"] / r["compute_seconds"]) / (total / c["wall"]) for r, c in zip(w, runs["cat"])]
    )
    if runs.get("naive"):
        n = runs["naive"]
        m["naive_s"] = med([r["wall"] for r in n])
        m["naive_rss_mib"] = max(r["rss_mib"] for r in n)
        sp = [a["wall"] / b["wall"] for a, b in zip(n, w)]
        m["speedup"] = med(sp)
        m["speedup_range"] = _range(sp)
    entry["median"] = m


def _range(xs: list[float]) -> list[float]:
    return [min(xs), max(xs)] if xs else []


# ---------------------------------------------------------------------------------------------------
# the measurements


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """Empty the page cache (root only) so that earlier sequences do not crowd the one measured.

    With 20+ GB of earlier data cached, every page a run writes first makes the kernel reclaim
    another (seen: 3-5 s of system time charged to one 6 GB run, none in the next). Returns whether
    it could.
    """
    try:
        subprocess.run(["sync"], check=True)
        DROP_CACHES.write_text("1\n")
        return True
    except OSError:
        return False


def warm(files: list[Path]) -> float:
    drop_caches()
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], stdout=null, check=True)
    return time.perf_counter() - t0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_size(r: Runner, dtype: str, nbytes: int, count: int, repeats: int, naive: bool) -> dict:
    args = r.args
    files = make_sequence(args.data, count, nbytes, dtype)
    os.sync()  # a fresh sequence is GBs of dirty pages: their writeback must not overlap the timings
    total = sum(f.stat().st_size for f in files)
    itemsize = 4 if dtype == "fp32" else 2
    naive_need = 4 * (nbytes // itemsize) * 4  # prev, cur, acc and temporaries, all float32
    if naive and naive_need > 0.8 * mem_available():
        print(f"  naive skipped: needs ~{naive_need / 2**30:.1f} GiB, not available", file=sys.stderr)
        naive = False
    entry = {
        "dtype": dtype,
        "count": count,
        "bytes_per_checkpoint": nbytes,
        "label": f"{count} x {size_label(nbytes)}",
        "total_bytes": total,
        "folder": str(files[0].parent),
        "runs": {"cat": [], "wdiff": [], **({"naive": []} if naive else {})},
    }
    entry["warm_cat_s"] = warm(files) if not args.no_warm else None
    kinds = ["cat", "naive", "wdiff"] if naive else ["cat", "wdiff"]
    for i in range(repeats):
        order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
        for k in order:
            res = getattr(r, k)(files)
            entry["runs"][k].append(res)
            os.sync()  # untimed: the output just written is flushed before the next run starts
            extra = f" compute {res['compute_seconds']:.2f} s" if k == "wdiff" else ""
            print(
                f"  {dtype} {entry['label']} round {i + 1}/{repeats} {k:5s} {res['wall']:7.2f} s"
                f"{extra}  rss {res['rss_mib']:.0f} MiB",
                file=sys.stderr,
            )
    summarize(entry)
    if args.clean:
        shutil.rmtree(files[0].parent, ignore_errors=True)
    return entry


def _cache_snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()
    }


def compile_test(r: Runner, dtype: str) -> dict:
    """First run with an empty NUMBA_CACHE_DIR, then twice more with the same directory."""
    files = make_sequence(r.args.data, 6, r.args.compile_size, dtype)
    os.sync()
    warm(files)
    cache = Path(tempfile.mkdtemp(prefix="wdiff-bench-numba-"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), **r.args.wdiff_env)
    try:
        runs = []
        snaps = []
        for i in range(3):
            res = r.wdiff(files, env)
            os.sync()
            runs.append(res)
            snaps.append(_cache_snapshot(cache))
            print(
                f"  compile test {dtype} run {i + 1}: wall {res['wall']:.2f} s,"
                f" compute {res['compute_seconds']:.3f} s, cache files {len(snaps[-1])}",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    # Numba writes its cache only when it compiles: an unchanged cache after run 2 means no compilation.
    return {
        "dtype": dtype,
        "label": f"6 x {size_label(r.args.compile_size)}",
        "first": runs[0],
        "second": runs[1],
        "third": runs[2],
        "cache_files": len(snaps[0]),
        "cache_unchanged_by_second_run": bool(snaps[0]) and snaps[0] == snaps[1],
    }


# ---------------------------------------------------------------------------------------------------
# the machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*a: str) -> str:
    try:
        return subprocess.run(
            ["git", *a], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_hash(src: Path) -> str:
    """Hash of the wdiff sources that are benchmarked (to notice edits during a run)."""
    h = hashlib.sha256()
    for p in sorted((src / "wdiff").rglob("*.py")):
        h.update(str(p.relative_to(src)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def machine(ref: str | None) -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(ln.split()[1]) * 1024
            for ln in _read("/proc/meminfo").splitlines()
            if ln.startswith("MemTotal")
        ),
        0,
    )
    versions = {}
    for pkg in ("wdiff", "numpy", "numba", "llvmlite", "dask", "safetensors", "ml_dtypes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        cat_version = subprocess.run(
            ["cat", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        cat_version = ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "cat": cat_version,
        "git_commit": _git("rev-parse", "--short", f"{ref or 'HEAD'}^{{commit}}"),
        "git_ref": ref,
        "git_dirty_wdiff": None if ref else bool(_git("status", "--porcelain", "--", "wdiff")),
        "loadavg_start": _read("/proc/loadavg").split()[:3],
    }


# ---------------------------------------------------------------------------------------------------
# report


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ok(flag: bool | None) -> str:
    return "–" if flag is None else ("**pass**" if flag else "**FAIL**")


def evaluate(results: dict, target_bytes: int) -> list[dict]:
    """One row per target, checked where the data to check it was measured."""
    rows = []
    for e in results["sizes"]:
        if e["bytes_per_checkpoint"] != target_bytes or e["count"] != 6:
            continue
        m, d = e["median"], e["dtype"]
        where = f"{d} {e['label']}"
        if "speedup" in m:
            rows.append(
                {
                    "target": f"whole process >= {TARGET_SPEEDUP:g}x faster than the naive loop",
                    "where": where,
                    "measured": f"{m['speedup']:.2f}x (naive {m['naive_s']:.2f} s, "
                    f"wdiff {m['wdiff_wall_s']:.2f} s)",
                    "pass": m["speedup"] >= TARGET_SPEEDUP,
                }
            )
        lim = TARGET_COMPUTE_VS_CAT[d]
        rows.append(
            {
                "target": f"compute >= {lim:.0%} of cat throughput ({d})",
                "where": where,
                "measured": f"{m['compute_vs_cat']:.0%} "
                f"({m['compute_gbps']:.2f} vs {m['cat_gbps']:.2f} GB/s)",
                "pass": m["compute_vs_cat"] >= lim,
            }
        )
        rows.append(
            {
                "target": f"peak RSS <= {TARGET_RSS_MIB} MiB",
                "where": where,
                "measured": f"{m['wdiff_rss_mib']:.0f} MiB (max of runs)",
                "pass": m["wdiff_rss_mib"] <= TARGET_RSS_MIB,
            }
        )
    for e in results.get("big", []):
        m = e["median"]
        rows.append(
            {
                "target": f"peak RSS <= {TARGET_BIG_RSS_MIB} MiB on 3 x 10 GB",
                "where": f"{e['dtype']} {e['label']}",
                "measured": f"{m['wdiff_rss_mib']:.0f} MiB",
                "pass": m["wdiff_rss_mib"] <= TARGET_BIG_RSS_MIB,
            }
        )
    for c in results.get("compile", []):
        a, b = c["first"], c["second"]
        rows.append(
            {
                "target": "second run pays no Numba compilation",
                "where": f"{c['dtype']} {c['label']}, fresh NUMBA_CACHE_DIR",
                "measured": (
                    f"compute {a['compute_seconds']:.2f} s -> {b['compute_seconds']:.2f} s, wall "
                    f"{a['wall']:.2f} s -> {b['wall']:.2f} s; cache "
                    f"{'unchanged' if c['cache_unchanged_by_second_run'] else 'REWRITTEN'} by run 2"
                ),
                # wdiff compiles (or loads) its kernels before the first read, outside compute_seconds:
                # the evidence is the cache left untouched by run 2 and its wall time, not compute.
                "pass": c["cache_unchanged_by_second_run"] and b["wall"] < 0.5 * a["wall"],
            }
        )
    for d, fits in results.get("linearity", {}).items():
        f = fits.get("wdiff_compute")
        if not f:
            continue
        rows.append(
            {
                "target": "cost linear in bytes (wdiff compute)",
                "where": f"{d}, {f['points']} sizes",
                "measured": (
                    f"{f['slope_s_per_gb']:.3f} s/GB + {f['intercept_s']:.2f} s, R^2 {f['r2']:.3f}, worst "
                    f"point {f['max_rel_residual']:.0%} off the line; s/GB at largest / smallest size "
                    f"{f['per_gb_growth']:.2f}"
                ),
                "pass": f["points"] >= 3 and f["max_rel_residual"] <= 0.30 and f["per_gb_growth"] <= 1.25,
            }
        )
    return rows


def linearity(results: dict) -> dict:
    out: dict = {}
    for d in sorted({e["dtype"] for e in results["sizes"]}):
        es = sorted((e for e in results["sizes"] if e["dtype"] == d), key=lambda e: e["total_bytes"])
        fits = {}
        for key, col in (
            ("wdiff_compute", "wdiff_compute_s"),
            ("wdiff_wall", "wdiff_wall_s"),
            ("cat", "cat_s"),
            ("naive", "naive_s"),
        ):
            pts = [(e["total_bytes"] / GB, e["median"][col]) for e in es if e["median"].get(col) is not None]
            fit = linfit([p[0] for p in pts], [p[1] for p in pts])
            if fit:
                fit["points"] = len(pts)
                fit["per_gb_growth"] = (pts[-1][1] / pts[-1][0]) / (pts[0][1] / pts[0][0])
                fit["max_rel_residual"] = max(
                    abs(y - fit["intercept_s"] - fit["slope_s_per_gb"] * x)
                    / (fit["intercept_s"] + fit["slope_s_per_gb"] * x)
                    for x, y in pts
                )
                fits[key] = fit
        out[d] = fits
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    cfg = results["config"]
    lines = [
        f"## Benchmark results ({m['date'][:10]})",
        "",
        f"Made by `{cfg['command']}`; raw numbers in `{cfg['json_name']}`, plot `{cfg['plot_name']}`.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable) |",
        f"| RAM | {m['ram_gib']} GiB |",
        f"| kernel / OS | {m['kernel']} / {m['os']} |",
        f"| Python | {m['python']} |",
        "| packages | "
        + ", ".join(f"{k} {v[k]}" for k in ("numpy", "numba", "llvmlite", "dask", "safetensors", "ml_dtypes"))
        + " |",
        f"| wdiff | {v['wdiff']}, "
        + (
            f"`git archive {m['git_ref']}` = commit {m['git_commit']}"
            if m["git_ref"]
            else f"working tree at commit {m['git_commit']}"
            f"{' + uncommitted changes in wdiff/' if m['git_dirty_wdiff'] else ''}"
        )
        + f" (code hash {results['code_hash_start']}, imported from `{results.get('wdiff_module')}`) |",
        f"| load average | {' '.join(m['loadavg_start'])} at start, "
        f"{' '.join(results['loadavg_end'])} at end |",
        f"| date (UTC) | {m['date']} |",
        "",
    ]
    if results["code_hash_start"] != results["code_hash_end"]:
        lines += [
            "> **Warning:** `wdiff/` changed while the benchmark ran (code hash "
            f"{results['code_hash_start']} -> {results['code_hash_end']}); later runs measured other code.",
            "",
        ]
    lines += [
        f"Synthetic data (`benchmarks/make_data.py`): transformer-like layers (4096 x 4096 attention, "
        f"11008 x 4096 MLP matrices, 1-D norms and biases), each checkpoint = the previous + small noise. "
        f"Page cache warm (one `cat` first), {cfg['repeats']} round(s) of cat / naive / wdiff in rotating "
        "order; medians, ratios per round then median. wdiff: `wdiff run FILES -o OUT --no-render --quiet"
        f"{(' ' + cfg['wdiff_args']) if cfg['wdiff_args'] else ''}`, Numba cache already warm.",
        "",
    ]
    for d in ("fp32", "bf16"):
        es = [e for e in results["sizes"] if e["dtype"] == d]
        if not es:
            continue
        lines += [
            f"### {d}",
            "",
            "| checkpoints | total GB | cat s | cat GB/s | wdiff compute s | compute GB/s | compute / cat "
            "| wdiff whole s | naive s | naive / wdiff | wdiff peak RSS MiB | naive peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in sorted(es, key=lambda e: e["total_bytes"]):
            x = e["median"]
            lines.append(
                f"| {e['label']} | {e['total_bytes'] / GB:.2f} | {_f(x['cat_s'])} | {_f(x['cat_gbps'])} "
                f"| {_f(x['wdiff_compute_s'])} | {_f(x['compute_gbps'])} "
                f"| {_f(x['compute_vs_cat'], '{:.0%}')} "
                f"| {_f(x['wdiff_wall_s'])} | {_f(x.get('naive_s'))} | {_f(x.get('speedup'), '{:.2f}x')} "
                f"| {_f(x['wdiff_rss_mib'], '{:.0f}')} | {_f(x.get('naive_rss_mib'), '{:.0f}')} |"
            )
        lines.append("")
    if results.get("big"):
        lines += [
            "### big (page cache cannot hold it: read from disk)",
            "",
            "| checkpoints | total GB | cat s | cat GB/s | wdiff compute s | compute GB/s | compute / cat "
            "| wdiff whole s | wdiff peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in results["big"]:
            x = e["median"]
            lines.append(
                f"| {e['dtype']} {e['label']} | {e['total_bytes'] / GB:.1f} | {_f(x['cat_s'])} "
                f"| {_f(x['cat_gbps'])} "
                f"| {_f(x['wdiff_compute_s'])} | {_f(x['compute_gbps'])} "
                f"| {_f(x['compute_vs_cat'], '{:.0%}')} "
                f"| {_f(x['wdiff_wall_s'])} | {_f(x['wdiff_rss_mib'], '{:.0f}')} |"
            )
        lines.append("")
    if results.get("compile"):
        lines += [
            "### Numba compilation (fresh NUMBA_CACHE_DIR, then the same directory again)",
            "",
            "| data | run | wall s | compute s | peak RSS MiB |",
            "|---|---|---|---|---|",
        ]
        for c in results["compile"]:
            for k in ("first", "second", "third"):
                r = c[k]
                lines.append(
                    f"| {c['dtype']} {c['label']} | {k} | {r['wall']:.2f} | {r['compute_seconds']:.3f} "
                    f"| {r['rss_mib']:.0f} |"
                )
        lines.append("")
    if results.get("linearity"):
        lines += [
            "### Scaling (least squares t = a + b x GB over the sizes)",
            "",
            "| dtype | series | sizes | b, s/GB | a, s | R^2 | worst point off the line "
            "| s/GB largest / smallest |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d, fits in results["linearity"].items():
            for k, f in fits.items():
                lines.append(
                    f"| {d} | {k} | {f['points']} | {f['slope_s_per_gb']:.3f} | {f['intercept_s']:.3f} "
                    f"| {f['r2']:.4f} | {f['max_rel_residual']:.0%} | {f['per_gb_growth']:.2f} |"
                )
        lines += ["", "![time against bytes](scaling.png)", ""]
    if results.get("targets"):
        lines += ["### Targets", "", "| target | measured on | result | |", "|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['where']} | {t['measured']} | {_ok(t['pass'])} |")
        lines.append("")
        if not any(e["bytes_per_checkpoint"] == cfg["target_bytes"] for e in results["sizes"]):
            lines += [
                f"(The 6 x {size_label(cfg['target_bytes'])} target size was not measured in this run.)",
                "",
            ]
    lines += [
        "Columns:",
        "- *cat s*: wall time of `cat FILES > /dev/null` (all checkpoints, page cache warm); "
        "*cat GB/s*: file bytes / cat s.",
        "- *wdiff compute s*: `summary.json` `timing.compute_seconds` (first read to last result written); "
        "*compute GB/s*: `timing.read_bytes` / compute s; *compute / cat*: compute GB/s over the cat GB/s "
        "of the same round.",
        "- *wdiff whole s*: wall time of the whole `wdiff run` process (start-up and imports, scan, "
        "compute, summary, PLY).",
        "- *naive s*: wall time of `benchmarks/naive.py` (load each checkpoint whole, "
        "`acc += abs(cur - prev)`, save); *naive / wdiff*: whole-process speedup, per round.",
        "- *peak RSS*: maximum resident set size of the process (`ru_maxrss` from `wait4`, like "
        "`/usr/bin/time -v`), the max over the rounds; it includes the ~10 MiB of the launcher "
        "`benchmarks/measure.py` as a floor.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in ("fp32", "bf16") if any(e["dtype"] == d for e in results["sizes"])]
    if not dtypes:
        return
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    series = [
        ("naive loop (whole process)", "naive", lambda r: r["wall"], "tab:red", "s"),
        ("wdiff whole process", "wdiff", lambda r: r["wall"], "tab:blue", "o"),
        ("wdiff compute phase", "wdiff", lambda r: r["compute_seconds"], "tab:cyan", "^"),
        ("cat > /dev/null", "cat", lambda r: r["wall"], "tab:gray", "D"),
    ]
    for ax, d in zip(axes[0], dtypes):
        es = sorted((e for e in results["sizes"] if e["dtype"] == d), key=lambda e: e["total_bytes"])
        for name, kind, get, color, marker in series:
            pts = [
                (e["total_bytes"] / GB, [get(r) for r in e["runs"][kind]]) for e in es if e["runs"].get(kind)
            ]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [statistics.median(p[1]) for p in pts]
            lo = [y - min(p[1]) for y, p in zip(ys, pts)]
            hi = [max(p[1]) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3, label=name)
            fit = linfit(xs, ys)
            if fit and len(xs) >= 2:
                gx = [0, max(xs) * 1.05]
                ax.plot(
                    gx,
                    [fit["intercept_s"] + fit["slope_s_per_gb"] * x for x in gx],
                    color=color,
                    lw=0.7,
                    ls=":",
                )
        ax.set_title(
            f"{d}: 6 checkpoints, time vs total checkpoint bytes (medians, min-max bars)", fontsize=9
        )
        ax.set_xlabel("total checkpoint bytes (GB)")
        ax.set_ylabel("seconds")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"wdiff benchmark, {m['cpu']} x{m['cores']}, {m['ram_gib']} GiB, {m['date'][:10]}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="128MB,256MB,512MB,1GB", help="bytes per checkpoint, comma separated")
    ap.add_argument("--count", type=int, default=6, help="checkpoints per sequence (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per size (default %(default)s)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument(
        "--big", action="store_true", help="also 3 x 10 GB fp32 (needs ~41 GB free disk; no naive)"
    )
    ap.add_argument("--big-size", default="10GB")
    ap.add_argument("--big-count", type=int, default=3)
    ap.add_argument("--big-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--naive-max", default="1GB", help="run the naive loop only up to this size per checkpoint"
    )
    ap.add_argument("--target-size", default="1GB", help="size per checkpoint the targets are checked at")
    ap.add_argument("--compile-size", default="16MB", help="size per checkpoint of the compilation test")
    ap.add_argument("--no-compile-test", action="store_true")
    ap.add_argument("--no-warm", action="store_true", help="do not cat the files once before timing")
    ap.add_argument("--data", type=Path, default=DEFAULT_DIR, help="data folder (default %(default)s)")
    ap.add_argument("--clean", action="store_true", help="delete each generated sequence after measuring it")
    ap.add_argument("--wdiff", default=None, help="wdiff executable (default: .venv/bin/wdiff of this repo)")
    ap.add_argument(
        "--ref",
        default=None,
        help="benchmark wdiff/ as of this git commit (git archive into the data folder, run with "
        "PYTHONPATH) instead of the working tree, e.g. HEAD while others edit wdiff/",
    )
    ap.add_argument("--wdiff-args", default="", help="extra wdiff options, e.g. '--chunk-mb 8'")
    ap.add_argument(
        "--out", type=Path, default=HERE / "results.md", help="markdown output (default %(default)s)"
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="raw numbers (default: beside --out, results.json)"
    )
    ap.add_argument("--plot", type=Path, default=None, help="PNG (default: beside --out, scaling.png)")
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: re-render the markdown and plot of an earlier results.json",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["config"]["json_name"] = args.from_json.name
        results["config"]["plot_name"] = (args.plot or args.out.with_name("scaling.png")).name
        results["linearity"] = linearity(results)
        results["targets"] = evaluate(results, results["config"]["target_bytes"])
        report(results, args.out, None, args.plot or args.out.with_name("scaling.png"))
        return 0

    args.compile_size = parse_size(args.compile_size)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    naive_max = parse_size(args.naive_max)
    target = parse_size(args.target_size)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    json_path = args.json or args.out.with_name("results.json")
    png_path = args.plot or args.out.with_name("scaling.png")
    args.data.mkdir(parents=True, exist_ok=True)

    def out_bytes(nbytes: int, dtype: str) -> int:  # accumulated.safetensors is float32
        return nbytes // (4 if dtype == "fp32" else 2) * 4

    out_need = max((out_bytes(s, d) for d in dtypes for s in sizes), default=0)
    need = 0
    for d in dtypes:
        for s in sizes:
            if not sequence_dir(args.data, args.count, s, d).exists():
                need += args.count * s
    if args.big:
        s = parse_size(args.big_size)
        out_need = max(out_need, out_bytes(s, args.big_dtype))
        if not sequence_dir(args.data, args.big_count, s, args.big_dtype).exists():
            need += args.big_count * s
    need += out_need
    free = shutil.disk_usage(args.data).free
    if need > free * 0.95:
        print(
            f"run: needs ~{need / GB:.0f} GB of disk in {args.data}, {free / GB:.0f} GB free", file=sys.stderr
        )
        return 2

    args.wdiff_env = {}
    src = REPO
    snapshot = None
    if args.ref:  # a fixed commit of wdiff/, unaffected by edits to the working tree during the run
        snapshot = Path(tempfile.mkdtemp(prefix="wdiff-src-", dir=args.data))
        archive = subprocess.run(
            ["git", "archive", args.ref, "wdiff"], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive, check=True)
        python = REPO / ".venv" / "bin" / "python"
        args.wdiff_cmd = [str(python if python.exists() else sys.executable), "-m", "wdiff"]
        args.wdiff_env = {"PYTHONPATH": str(snapshot)}
        src = snapshot
    elif args.wdiff is not None:
        args.wdiff_cmd = [args.wdiff]
    else:
        venv = REPO / ".venv" / "bin" / "wdiff"
        args.wdiff_cmd = [str(venv) if venv.exists() else (shutil.which("wdiff") or "wdiff")]
    # Bytecode for wdiff's own modules, as a pip-installed wdiff has: with PYTHONDONTWRITEBYTECODE set
    # (as on the development machines) every run would otherwise compile them from source (~0.07 s).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "wdiff")], check=True)

    results: dict = {
        "config": {
            "command": "python benchmarks/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "sizes": sizes,
            "count": args.count,
            "repeats": args.repeats,
            "dtypes": dtypes,
            "target_bytes": target,
            "naive_max": naive_max,
            "wdiff": " ".join(args.wdiff_cmd),
            "ref": args.ref,
            "wdiff_args": args.wdiff_args,
            "data": str(args.data),
            "json_name": json_path.name,
            "plot_name": png_path.name,
        },
        "machine": machine(args.ref),
        "code_hash_start": code_hash(src),
        "sizes": [],
        "compile": [],
        "big": [],
    }
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=args.data))
    runner = Runner(args, work)
    results["wdiff_module"] = runner.wdiff_module()
    print(f"benchmarking {' '.join(args.wdiff_cmd)} -> {results['wdiff_module']}", file=sys.stderr)
    try:
        for d in dtypes:
            if not args.no_compile_test:
                print(f"compile test {d}", file=sys.stderr)
                results["compile"].append(compile_test(runner, d))
            # make sure the shared Numba cache of the timed runs holds this dtype's kernels
            runner.wdiff(make_sequence(args.data, 6, args.compile_size, d, verbose=False))
            for s in sizes:
                print(f"{d} {args.count} x {size_label(s)}", file=sys.stderr)
                results["sizes"].append(measure_size(runner, d, s, args.count, args.repeats, s <= naive_max))
        if args.big:
            s = parse_size(args.big_size)
            d = args.big_dtype
            print(f"big: {d} {args.big_count} x {size_label(s)}", file=sys.stderr)
            runner.wdiff(make_sequence(args.data, 6, args.compile_size, d, verbose=False))
            # 30 GB does not fit the page cache: no warming, the runs read from disk.
            saved = args.no_warm
            args.no_warm = True
            e = measure_size(runner, d, s, args.big_count, args.repeats, naive=False)
            args.no_warm = saved
            results["big"].append(e)
    finally:
        results["code_hash_end"] = code_hash(src)
        shutil.rmtree(work, ignore_errors=True)
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
    results["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    results["linearity"] = linearity(results)
    results["targets"] = evaluate(results, target)

    report(results, args.out, json_path, png_path)
    return 0


def report(results: dict, md_path: Path, json_path: Path | None, png_path: Path) -> None:
    md_text = markdown(results)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md_text)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path)
    print(md_text)
    print(f"wrote {', '.join(str(p) for p in (md_path, json_path, png_path) if p)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
