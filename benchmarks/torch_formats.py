"""wdiff on torch.save checkpoints (.pt) against the same checkpoints as safetensors.

The safetensors sequence is the one ``make_data.py`` makes (6 x 1 GB fp32 by default, transformer-like
tensors, each checkpoint = the previous + noise). Each file is then re-saved with ``torch.save`` as a
state dict of the same tensors, same names, same values: the tensors are zero-copy views of the
memory-mapped safetensors file (``torch.frombuffer`` over a private read-only mapping), so writing a
1 GB ``.pt`` holds no 1 GB copy in memory; only page cache is used. The biggest tensors are
11008 x 4096 fp32 (180 MB).

Then rounds of ``wdiff run FILES -o OUT --no-render --quiet`` on the ``.pt`` files and on the
``.safetensors`` files, alternating which goes first, each started by ``measure.py`` (peak RSS as
``/usr/bin/time -v`` reports it) with the page cache warm and the Numba cache warm. Reported: medians of
wall time, of ``timing.compute_seconds`` and of compute throughput (``timing.read_bytes`` /
``timing.compute_seconds`` from summary.json), the peak RSS, and per-round ratios .pt / safetensors
(then their median). Targets: peak RSS of the .pt run within 1.5x of the safetensors run, its compute
throughput at least 1/1.5 of the safetensors run. The accumulated maps of the two runs must be equal.

    .venv/bin/python benchmarks/torch_formats.py                          # 6 x 1 GB, 3 rounds (~12 GB disk)
    .venv/bin/python benchmarks/torch_formats.py --size 64MB --repeats 1  # a smoke test
    .venv/bin/python benchmarks/torch_formats.py --ref HEAD               # wdiff/ as committed

Needs torch (the dev extras) to write the ``.pt`` files; wdiff itself never imports torch.
Writes ``benchmarks/torch_formats.md`` and ``torch_formats.json`` (``--out``, ``--json``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from make_data import DEFAULT_DIR, make_sequence, parse_size, size_label  # noqa: E402
from run import GB, Runner, _read, code_hash, machine, med, warm  # noqa: E402

TARGET_RSS_RATIO = 1.5  # .pt peak RSS <= 1.5 x safetensors
TARGET_THROUGHPUT_RATIO = 1.5  # safetensors compute GB/s <= 1.5 x .pt
PT_VERSION = "1"  # bump when the .pt layout written here changes


def _safetensors_views(path: Path):
    """The tensors of a safetensors file as torch tensors over a private read-only mapping (no copy)."""
    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, never written
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = dtypes[info["dtype"]]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(mapping, dtype=dtype, count=count, offset=base + begin)
        tensors[name] = t.view(info["shape"])
    return tensors, mapping


def make_pt_sequence(st_files: list[Path]) -> list[Path]:
    """``torch.save(state_dict)`` of every safetensors file, beside it as ``.pt`` (reused when done)."""
    import torch

    out = []
    for st in st_files:
        pt = st.with_suffix(".pt")
        stamp = pt.with_suffix(".pt.done")
        want = f"{PT_VERSION} {st.stat().st_size} {st.stat().st_mtime_ns}"
        if not (pt.exists() and stamp.exists() and stamp.read_text() == want):
            t0 = time.perf_counter()
            tensors, mapping = _safetensors_views(st)
            partial = pt.with_suffix(".pt.partial")
            torch.save(tensors, partial)
            del tensors, mapping  # the mapping closes once no tensor views it
            os.replace(partial, pt)
            stamp.write_text(want)
            print(f"torch_formats: wrote {pt} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        out.append(pt)
    return out


def summarize(runs: list[dict]) -> dict:
    return {
        "wall_s": med([r["wall"] for r in runs]),
        "compute_s": med([r["compute_seconds"] for r in runs]),
        "compute_gbps": med([r["read_bytes"] / r["compute_seconds"] / GB for r in runs]),
        "read_bytes": runs[0]["read_bytes"],
        "rss_mib": max(r["rss_mib"] for r in runs),
        "rss_mib_median": med([r["rss_mib"] for r in runs]),
    }


def markdown(results: dict) -> str:
    m, cfg, pt, st, ratio = (results[k] for k in ("machine", "config", "pt", "safetensors", "ratios"))
    lines = [
        f"## wdiff on torch.save (.pt) vs safetensors ({m['date'][:10]})",
        "",
        f"Made by `{cfg['command']}` on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB), wdiff "
        f"{m['versions']['wdiff']} at {cfg['code']}; load average {' '.join(m['loadavg_start'])} at start, "
        f"{' '.join(results['loadavg_end'])} at end.",
        "",
        f"{cfg['count']} checkpoints x {size_label(cfg['size'])} fp32 (`benchmarks/make_data.py`), the same "
        "tensors saved twice: `.safetensors` and `torch.save(state_dict)` `.pt`. Page cache and Numba cache "
        f"warm, {cfg['repeats']} round(s) alternating which format runs first; "
        "`wdiff run FILES -o OUT --no-render --quiet`. Medians; ratios per round, then their median.",
        "",
        "| format | total GB on disk | read GB | wall s | compute s | compute GB/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, e, size in (("safetensors", st, cfg["st_bytes"]), ("torch.save .pt", pt, cfg["pt_bytes"])):
        lines.append(
            f"| {label} | {size / GB:.2f} | {e['read_bytes'] / GB:.2f} | {e['wall_s']:.2f} "
            f"| {e['compute_s']:.2f} | {e['compute_gbps']:.2f} | {e['rss_mib']:.0f} |"
        )
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'**pass**' if t['pass'] else '**FAIL**'} |")
    lines += [
        "",
        f"Accumulated maps of the two runs: {'equal' if results['same_result'] else '**DIFFERENT**'} "
        f"(ratios per round: RSS {', '.join(f'{x:.2f}' for x in ratio['rss_all'])}; "
        f"throughput {', '.join(f'{x:.2f}' for x in ratio['throughput_all'])}).",
        "",
    ]
    return "\n".join(lines)


def _same_accumulated(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(a, "numpy") as fa, safe_open(b, "numpy") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        import numpy as np

        return all(np.array_equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GB", help="data bytes per checkpoint (default %(default)s)")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DEFAULT_DIR, help="where sequences are made and reused")
    ap.add_argument("--ref", help="benchmark wdiff/ as of this git commit (git archive into --data)")
    ap.add_argument("--src", type=Path, help="a folder holding a wdiff/ package to benchmark (PYTHONPATH)")
    ap.add_argument("--wdiff", help="a wdiff executable (default .venv/bin/wdiff)")
    ap.add_argument("--wdiff-args", default="", help="extra options for every wdiff run")
    ap.add_argument("--out", type=Path, default=HERE / "torch_formats.md")
    ap.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    ap.add_argument("--clean", action="store_true", help="delete the .pt files afterwards")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    args.data.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.data).free < 2.2 * args.count * size:
        print(
            f"torch_formats: needs ~{2.2 * args.count * size / GB:.0f} GB free in {args.data}",
            file=sys.stderr,
        )
        return 2

    args.wdiff_env = {}
    src, snapshot = REPO, None
    python = REPO / ".venv" / "bin" / "python"
    python = str(python if python.exists() else sys.executable)
    if args.ref:
        snapshot = Path(tempfile.mkdtemp(prefix="wdiff-src-", dir=args.data))
        archive = subprocess.run(
            ["git", "archive", args.ref, "wdiff"], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True)
        src = snapshot
    elif args.src:
        src = args.src.resolve()
    if args.ref or args.src:
        args.wdiff_cmd = [python, "-m", "wdiff"]
        args.wdiff_env = {"PYTHONPATH": str(src)}
        code = f"`{args.ref}`" if args.ref else f"`{src}`"
    else:
        venv = REPO / ".venv" / "bin" / "wdiff"
        args.wdiff_cmd = [args.wdiff or (str(venv) if venv.exists() else shutil.which("wdiff") or "wdiff")]
        code = "the working tree"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "wdiff")], check=True)

    st_files = make_sequence(args.data, args.count, size, "fp32")
    pt_files = make_pt_sequence(st_files)
    os.sync()
    results: dict = {
        "config": {
            "command": "python benchmarks/torch_formats.py "
            + shlex.join(sys.argv[1:] if argv is None else argv),
            "size": size,
            "count": args.count,
            "repeats": args.repeats,
            "code": code,
            "st_bytes": sum(f.stat().st_size for f in st_files),
            "pt_bytes": sum(f.stat().st_size for f in pt_files),
            "wdiff": " ".join(args.wdiff_cmd),
        },
        "machine": machine(args.ref),
        "code_hash_start": code_hash(src),
    }
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=args.data))
    runner = Runner(args, work)
    try:
        # Numba compiles (or loads) per kernel: one untimed run of each format on small files first.
        small = make_sequence(args.data, 2, parse_size("16MB"), "fp32", verbose=False)
        for files in (small, make_pt_sequence(small)):
            runner.wdiff(files)
        warm(st_files + pt_files)
        runs: dict[str, list[dict]] = {"pt": [], "safetensors": []}
        files = {"pt": pt_files, "safetensors": st_files}
        for i in range(args.repeats):
            for kind in ("pt", "safetensors") if i % 2 == 0 else ("safetensors", "pt"):
                r = runner.wdiff(files[kind])
                runs[kind].append(r)
                os.sync()
                print(
                    f"  round {i + 1}/{args.repeats} {kind:11s} wall {r['wall']:6.2f} s compute "
                    f"{r['compute_seconds']:6.2f} s rss {r['rss_mib']:.0f} MiB",
                    file=sys.stderr,
                )
        # Both formats give the same accumulated map (one more run each, kept for the comparison).
        outs = {}
        for kind in ("pt", "safetensors"):
            outs[kind] = work / f"same-{kind}"
            cmd = [*args.wdiff_cmd, "run", *map(str, files[kind]), "-o", str(outs[kind]), "--no-render"]
            env = dict(os.environ, **args.wdiff_env)
            subprocess.run([*cmd, "--quiet"], env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
        results["same_result"] = _same_accumulated(
            outs["pt"] / "accumulated.safetensors", outs["safetensors"] / "accumulated.safetensors"
        )
    finally:
        results["code_hash_end"] = code_hash(src)
        shutil.rmtree(work, ignore_errors=True)
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
        if args.clean:
            for f in pt_files:
                f.unlink(missing_ok=True)
    results["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    results["runs"] = runs
    results["pt"] = summarize(runs["pt"])
    results["safetensors"] = summarize(runs["safetensors"])
    rss = [p["rss_mib"] / s["rss_mib"] for p, s in zip(runs["pt"], runs["safetensors"])]
    thr = [
        (s["read_bytes"] / s["compute_seconds"]) / (p["read_bytes"] / p["compute_seconds"])
        for p, s in zip(runs["pt"], runs["safetensors"])
    ]
    results["ratios"] = {"rss": med(rss), "rss_all": rss, "throughput": med(thr), "throughput_all": thr}
    pt, st = results["pt"], results["safetensors"]
    results["targets"] = [
        {
            "target": f"peak RSS of .pt within {TARGET_RSS_RATIO}x of safetensors",
            "measured": f"{pt['rss_mib']:.0f} vs {st['rss_mib']:.0f} MiB (max); median ratio {med(rss):.2f}",
            "pass": pt["rss_mib"] <= TARGET_RSS_RATIO * st["rss_mib"],
        },
        {
            "target": f"compute throughput of .pt within {TARGET_THROUGHPUT_RATIO}x of safetensors",
            "measured": f"{pt['compute_gbps']:.2f} vs {st['compute_gbps']:.2f} GB/s; "
            f"median ratio {med(thr):.2f}",
            "pass": med(thr) <= TARGET_THROUGHPUT_RATIO,
        },
        {"target": "same accumulated map from both formats", "measured": "", "pass": results["same_result"]},
    ]
    text = markdown(results)
    args.out.write_text(text)
    (args.json or args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(text)
    return 0 if all(t["pass"] for t in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
