"""Peak memory and time of the update spectrum (``wdiff.spectrum``) of one 4096 x 11008 BF16 matrix.

    .venv/bin/python benchmarks/spectrum_memory.py            # data in /tmp/wdiff-spectrum-bench
    .venv/bin/python benchmarks/spectrum_memory.py --workers 8 --limit-mib 300

Writes two checkpoints (W(0): 0.02 x Gaussian; W(T): W(0) + a rank-64 update with decaying singular
values + 1e-4 x Gaussian noise, both BF16, 90 MB each), then in a fresh process scans them and runs
``update_spectra`` on the randomized path (``min(m, n) = 4096 > EXACT_SIDE``), sampling the process's
resident memory every 2 ms. Reported: RSS growth over the spectrum pass (peak RSS during it minus RSS
before it, wdiff, numpy and dask already imported), its wall time, and the largest relative error of
the top 16, 32 and 64 singular values against numpy's SVD of the same D. Exits 1 when the growth is
over ``--limit-mib``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

M, N = 4096, 11008
PLANTED = 64

CHILD = r"""
import json, os, sys, threading, time
import numpy as np
import dask.threaded  # imported before the baseline: what compute has loaded already
import wdiff
from wdiff.spectrum import update_spectra

page = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


run = wdiff.scan(sys.argv[1])
workers = int(sys.argv[2]) or None
base = rss()
peak = [base]
done = threading.Event()


def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)


watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
t0 = time.perf_counter()
found = update_spectra(run.tensors, "threads", workers)
seconds = time.perf_counter() - t0
done.set()
watcher.join()
peak[0] = max(peak[0], rss())
print(json.dumps({"growth": peak[0] - base, "base": base, "seconds": seconds, "entry": found["w"]}))
"""


def make_data(folder: Path) -> list[float]:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    planted = np.logspace(0, -2, PLANTED)
    w0 = (0.02 * rng.standard_normal((M, N), dtype=np.float32)).astype(ml_dtypes.bfloat16)
    u = np.linalg.qr(rng.standard_normal((M, PLANTED)))[0]
    v = np.linalg.qr(rng.standard_normal((N, PLANTED)))[0]
    update = ((u * planted) @ v.T).astype(np.float32) + 1e-4 * rng.standard_normal((M, N), dtype=np.float32)
    w1 = (w0.astype(np.float32) + update).astype(ml_dtypes.bfloat16)
    # the exact update D is the float32 difference of the stored BF16 values (their rounding included)
    d = w1.astype(np.float32) - w0.astype(np.float32)
    exact = np.linalg.svd(d.astype(np.float64), compute_uv=False)[:PLANTED]
    save_file({"w": w0}, str(folder / "step_0.safetensors"))
    save_file({"w": w1}, str(folder / "step_1.safetensors"))
    return exact.tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "wdiff-spectrum-bench")
    parser.add_argument("--workers", type=int, default=0, help="threads (0: one per core)")
    parser.add_argument("--limit-mib", type=float, default=300.0)
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    reference = args.data / "reference.json"
    if not reference.exists():
        reference.write_text(json.dumps(make_data(args.data)))
    exact = json.loads(reference.read_text())
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.data), str(args.workers)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    got = json.loads(out.stdout.splitlines()[-1])
    values = got["entry"]["singular_values"][:PLANTED]
    # the planted values run from 1 down to 0.01; BF16 rounding and the noise make a floor of singular
    # values near 0.01 (docs/metrics.md), so the last planted ones are not resolved by any range finder
    errors = {
        top: max(abs(a - b) / b for a, b in zip(values[:top], exact[:top])) for top in (16, 32, PLANTED)
    }
    growth = got["growth"] / (1 << 20)
    print(
        f"{M} x {N} BF16, 2 checkpoints: spectrum pass {got['seconds']:.2f} s, RSS growth {growth:.0f} MiB "
        f"(limit {args.limit_mib:.0f}), method {got['entry']['method']}, largest relative error of the top "
        + ", ".join(f"{top}: {e:.1e}" for top, e in errors.items())
        + f"; rank for 90% energy {got['entry']['rank_for_energy']['0.9']}"
    )
    return 0 if growth <= args.limit_mib else 1


if __name__ == "__main__":
    sys.exit(main())
