"""The baseline: the loop a user would write without wdiff.

Load every checkpoint whole, accumulate ``abs(cur - prev)`` per tensor into a dict, save the dict:

    .venv/bin/python benchmarks/naive.py ckpt-00.safetensors ckpt-01.safetensors ... -o acc.safetensors

fp32 (and every dtype numpy has) goes through ``safetensors.numpy.load_file``. ``safetensors.numpy``
cannot give bfloat16 (numpy has no such dtype), so for a file holding BF16 tensors the loop uses
``safe_open(path, framework="numpy")`` with ``ml_dtypes`` imported (which registers numpy's bfloat16)
and converts each tensor with ``.astype(np.float32)`` as it is loaded — what a user would do to get
float32 arithmetic. The accumulated result is float32 either way, like wdiff's.
"""

from __future__ import annotations

import argparse
import json
import struct

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safe_open)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def _has_bf16(path: str) -> bool:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    return any(v["dtype"] == "BF16" for k, v in head.items() if k != "__metadata__")


def load(path: str) -> dict[str, np.ndarray]:
    if not _has_bf16(path):
        return load_file(path)
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}


def accumulate(paths: list[str]) -> dict[str, np.ndarray]:
    acc: dict[str, np.ndarray] = {}
    prev = None
    for path in paths:
        cur = load(path)
        if prev is not None:
            for name, value in cur.items():
                d = np.abs(value - prev[name])
                if name in acc:
                    acc[name] += d
                else:
                    acc[name] = d
        prev = cur
    return acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sum_t |W(t+1) - W(t)|, the naive way")
    ap.add_argument("checkpoints", nargs="+", help="safetensors files in training order")
    ap.add_argument("-o", "--out", required=True, help="output .safetensors")
    args = ap.parse_args(argv)
    acc = accumulate(args.checkpoints)
    save_file({k: v.astype(np.float32, copy=False) for k, v in acc.items()}, args.out)


if __name__ == "__main__":
    main()
