"""Why a BF16 accumulated map is never extended: the drift of re-rounding a running sum.

    python benchmarks/bf16_map_drift.py [--values 200000]

Each value is a sum of K positive changes (|N(0, 1)| times a per-value log-normal scale, float32).
"Exact" sums all K in float32 and rounds once to BF16 (what ``--map-dtype bfloat16`` stores);
"extended" rounds the running sum to BF16 after every ``every`` changes, as extending a stored BF16 map
would (one extension per checkpoint for ``wdiff watch``, one per part of a run committed in parts).
Prints the relative error of "extended" against the float32 sum: median, 99th percentile, max, mean.
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def drift(k: int, every: int, values: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal(values)).astype(np.float32)
    exact = np.zeros(values, np.float32)
    extended = np.zeros(values, np.float32)
    for step in range(k):
        change = np.abs(rng.standard_normal(values)).astype(np.float32) * scale
        exact += change
        extended += change
        if (step + 1) % every == 0:
            extended = extended.astype(BF16).astype(np.float32)
    extended = extended.astype(BF16).astype(np.float32)
    return (extended - exact) / exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=int, default=200_000)
    args = ap.parse_args()
    print("| changes | rounded every | median | p99 | max | mean |")
    print("|---|---|---|---|---|---|")
    for k, every in [(20, 20), (20, 1), (143, 16), (143, 1), (1000, 1)]:
        rel = drift(k, every, args.values)
        a = np.abs(rel)
        print(
            f"| {k} | {every} | {np.median(a):.2%} | {np.quantile(a, 0.99):.2%} | {a.max():.2%} | "
            f"{rel.mean():+.2%} |"
        )


if __name__ == "__main__":
    main()
