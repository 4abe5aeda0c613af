"""Incremental update: a run that grows by one checkpoint costs about one interval, not the history.

    .venv/bin/python benchmarks/incremental.py [--data /tmp/wdiff-bench] [--size 1GB] [--repeats 3]

Uses the sequence ``benchmarks/make_data.py`` makes (6 checkpoints; made if missing). Per round, in
rotating order, on a warm page cache and a quiet disk (``sync`` between runs, untimed):
- **full**: ``wdiff run`` of all 6 checkpoints into an empty folder (5 intervals);
- **grow**: ``wdiff run`` of all 6 into a folder holding the results of the first 5 (made untimed):
  only the new interval is computed, from W(0), W(4), W(5) and the earlier accumulated map;
- **one interval**: ``wdiff run`` of 2 checkpoints into an empty folder, the cost of one interval.
Prints medians and the ratios grow/full and grow/one-interval, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_data import make_sequence, parse_size  # noqa: E402
from run import run_child, warm  # noqa: E402  (the harness's RSS launcher and cache warming)

WDIFF = HERE.parent / ".venv" / "bin" / "wdiff"


def wdiff(files: list[Path], out: Path, log: Path) -> dict:
    cmd = [str(WDIFF), "run", *map(str, files), "-o", str(out), "--no-render", "--quiet"]
    r = run_child(cmd, log)
    timing = json.loads((out / "summary.json").read_text())
    r.update(update=timing["update"], **{k: timing["timing"][k] for k in ("read_bytes", "compute_seconds")})
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/wdiff-bench")
    ap.add_argument("--size", default="1GB")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(HERE / "incremental.json"))
    args = ap.parse_args(argv)

    nbytes = parse_size(args.size)
    files = make_sequence(Path(args.data), 6, nbytes, args.dtype)
    assert len(files) == 6, files
    warm(files)  # drop other data from the page cache, then read these files once
    work = Path(tempfile.mkdtemp(prefix="wdiff-incremental-", dir=args.data))
    log = work / "log.txt"
    rows: dict[str, list[dict]] = {"full": [], "grow": [], "one interval": []}
    try:
        for round_ in range(args.repeats):
            order = ["full", "grow", "one interval"]
            order = order[round_ % 3 :] + order[: round_ % 3]
            for kind in order:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                if kind == "grow":
                    wdiff(files[:5], out, log)  # the earlier results, untimed
                subprocess.run(["sync"], check=True)
                chosen = files[:2] if kind == "one interval" else files
                r = wdiff(chosen, out, log)
                expected = "incremental from 5" if kind == "grow" else "full"
                assert r["update"] == expected, (kind, r["update"])
                rows[kind].append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = ("wall", "compute_seconds", "read_bytes", "rss_mib")
    med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in rows.items()}
    result = {
        "data": f"{args.dtype} 6 x {args.size} ({nbytes} bytes each)",
        "medians": med,
        "grow / full (wall)": med["grow"]["wall"] / med["full"]["wall"],
        "grow / one interval (wall)": med["grow"]["wall"] / med["one interval"]["wall"],
        "grow / one interval (bytes read)": med["grow"]["read_bytes"] / med["one interval"]["read_bytes"],
        "rounds": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{result['data']}, {args.repeats} rounds, medians:")
    print("| run | wall s | compute s | GB read | peak RSS MiB |\n|---|---|---|---|---|")
    for k, m in med.items():
        cells = [f"{m['wall']:.2f}", f"{m['compute_seconds']:.2f}", f"{m['read_bytes'] / 1e9:.2f}"]
        print(f"| {k} | {' | '.join(cells)} | {m['rss_mib']:.0f} |")
    for k in ("grow / full (wall)", "grow / one interval (wall)", "grow / one interval (bytes read)"):
        print(f"{k}: {result[k]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
