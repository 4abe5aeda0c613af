"""An experiment for ``wdiff/readers/remote.py``: ``fetch`` as shipped against a ``fetch`` that writes
each part into its in-memory file as soon as it arrives and drops it.

As shipped, ``fetch`` keeps every part's ``Future`` in a list until it returns, so every part's
``bytes`` stays alive until the whole fetch is done: the ranges of a chunk task are in memory twice (in
the memfds and as Python bytes), and RSS grows with ``--chunk-mb``. The variant (``FIXED`` below: the
same code with ``concurrent.futures.as_completed`` and the future popped before the next one) holds
only the parts that arrived and were not yet written. Both run through the same launcher
(``remote_s3.py``'s ``TUNED_WDIFF`` with ``fetch`` replaced or not), on the same moto server, rounds
alternating; reported: compute MB/s, peak RSS and peak memfd bytes, medians.

    python benchmarks/remote_s3_fetch.py                       # 6 x 1 GB bf16, ranged moto, 3 rounds
    python benchmarks/remote_s3_fetch.py --size-mb 64 --rounds 1 --cases 256:8

Not wdiff as shipped: a tuning experiment, measured to be applied to ``wdiff/`` by its owner.
Writes ``benchmarks/remote_s3_fetch.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import remote_s3 as R  # noqa: E402
from make_data import make_sequence  # noqa: E402
from run import machine  # noqa: E402

FIXED = r"""
import os, sys
from concurrent.futures import as_completed
import wdiff.readers.remote as r
from wdiff.errors import WdiffError
part, flight = sys.argv[1:3]
del sys.argv[1:3]
if part != "-":
    r.PART_BYTES = int(part)
if flight != "-":
    r.IN_FLIGHT = int(flight)


def fetch(wants):
    parts = [
        (w, at, min(at + r.PART_BYTES, w.offset + w.nbytes))
        for w in r._coalesced(wants)
        for at in range(w.offset, w.offset + w.nbytes, r.PART_BYTES)
    ]
    fds = {}
    try:
        for w in wants:
            if w.url not in fds:
                fds[w.url] = r._memory_file(w.url)
        pool = r._fetch_pool()
        futures = {pool.submit(r._read_range, w.url, a, b, w.tag, w.size): (w, a) for w, a, b in parts}
        try:
            for future in as_completed(list(futures)):
                w, a = futures.pop(future)
                data = future.result()
                if os.pwrite(fds[w.url], data, a) != len(data):
                    raise WdiffError(w.url, "could not hold the bytes read in memory")
                del data, future
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


r.fetch = fetch
from wdiff.cli import main
sys.argv[0] = "wdiff"
sys.exit(main())
"""
SHIPPED = R.TUNED_WDIFF


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1000)
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--server", choices=("stock", "ranged"), default="ranged")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--cases", default="16:8,256:8,256:64", help="CHUNK_MB:PART_MIB,... (default %(default)s)"
    )
    ap.add_argument("--src", type=Path, default=HERE.parent, help="folder holding the wdiff/ package")
    ap.add_argument("--out", type=Path, default=HERE / "remote_s3_fetch.md")
    args = ap.parse_args(argv)
    cases = [(float(c.split(":")[0]), float(c.split(":")[1])) for c in args.cases.split(",") if c]
    work = Path(tempfile.mkdtemp(prefix="wdiff-remote-fetch-"))
    python = sys.executable
    bargs = argparse.Namespace(
        wdiff_env={"PYTHONPATH": str(args.src.resolve())}, wdiff_args="", concurrency=16
    )
    size = int(args.size_mb * R.MB)
    hidden, ffn = (4096, 11008) if size >= 512 * 10**6 else (1024, 2816)
    moto = None
    runs: dict[str, list[dict]] = {}
    results: dict = {
        "config": vars(args) | {"src": str(args.src), "out": str(args.out)},
        "machine": machine(None),
    }
    try:
        files = make_sequence(work / "data", args.count, size, args.dtype, hidden=hidden, ffn=ffn)
        moto = R.Moto(args.server, work, python)
        os.environ.update(
            AWS_ENDPOINT_URL=moto.endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        objects = R.upload(files)
        shutil.rmtree(work / "data")
        b = R.Bench(bargs, work, python)
        b.objects, b.moto = objects, moto
        order = [(c, v) for c in cases for v in ("shipped", "fixed")]
        for i in range(args.rounds):
            for (chunk, part), variant in order if i % 2 == 0 else order[::-1]:
                R.TUNED_WDIFF = SHIPPED if variant == "shipped" else FIXED
                r = b.wdiff(chunk, part, None)
                name = f"c{chunk:g} p{part:g} {variant}"
                runs.setdefault(name, []).append(r)
                print(
                    f"  round {i + 1}/{args.rounds} {name:20s} {r['compute_mbps']:6.0f} MB/s wall "
                    f"{r['wall']:6.1f} s rss {r['rss_mib']:6.0f} MiB memfd {r['memfd_peak_mib']:5.0f} MiB "
                    f"GETs {r['gets']}",
                    file=sys.stderr,
                )
    finally:
        R.TUNED_WDIFF = SHIPPED
        if moto is not None:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"## wdiff's remote fetch: as shipped vs written as parts arrive ({results['machine']['date'][:10]})",
        "",
        f"`python benchmarks/remote_s3_fetch.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
        f"{args.count} x {args.size_mb:g} MB {args.dtype} on a {args.server} moto server, "
        f"{args.rounds} round(s) "
        "alternating; medians (range). `cN pP`: `--chunk-mb N`, `PART_BYTES` P MiB.",
        "",
        "| case | compute MB/s | peak RSS MiB | peak memfd MiB | GETs |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for name, rs in runs.items():
        mb = [r["compute_mbps"] for r in rs]
        rss = [r["rss_mib"] for r in rs]
        summary[name] = {
            "compute_mbps": statistics.median(mb),
            "rss_mib": statistics.median(rss),
            "rss_mib_max": max(rss),
            "memfd_mib_max": max(r["memfd_peak_mib"] for r in rs),
            "gets": statistics.median(r["gets"] for r in rs),
        }
        s = summary[name]
        lines.append(
            f"| {name} | {s['compute_mbps']:.0f} ({min(mb):.0f}-{max(mb):.0f}) | {s['rss_mib']:.0f} "
            f"({min(rss):.0f}-{max(rss):.0f}) | {s['memfd_mib_max']:.0f} | {s['gets']:.0f} |"
        )
    results["runs"], results["summary"] = runs, summary
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
