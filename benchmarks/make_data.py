"""Synthetic checkpoint sequences for the benchmarks: N safetensors files of a transformer-like model.

Each checkpoint is the previous one plus small uniform noise (every weight moves a little, like a
training step). Tensors follow a Llama/Qwen-like layer (``hidden`` x ``hidden`` attention matrices,
``ffn`` x ``hidden`` MLP matrices, 1-D norms and q/k/v biases), repeated until the requested bytes per
checkpoint are reached; the last matrix is cut short (and a 1-D tail added) so the data buffer is
exactly the requested size.

The files are streamed: the headers are computed from the shapes and written first, then the model is
generated tensor by tensor, and each tensor is written into all N files (checkpoint t = checkpoint t-1
+ noise) before the next one is made. Only one tensor (float32 master copy) plus a few chunk buffers
are in memory at a time, whatever the checkpoint size. bf16 is rounded to nearest-even from the float32
master copy (the same bits ``ml_dtypes`` gives, done with integer ops because that is 2x faster).

A sequence already on disk is reused when every file has exactly the expected header and size
(generating 6 x 1 GB takes roughly 10-20 s on a 2-core machine, 6 x 10 GB a few minutes).
Files are written as ``*.partial`` and renamed at the end, so an interrupted run is never reused.

    .venv/bin/python benchmarks/make_data.py --size 1GB --count 6 --dtype bf16   # -> /tmp/wdiff-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/tmp/wdiff-bench")
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": ("F32", 4), "bf16": ("BF16", 2)}
CHUNK = 1 << 22  # elements per noise/convert/write step
GENERATOR_VERSION = "1"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9})


def parse_size(text: str) -> int:
    """'128MB' -> 128e6 bytes (decimal), '1GiB' -> 2**30; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 128MB, 1GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def size_label(nbytes: int) -> str:
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    for unit, mult in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return f"{nbytes}B"


@dataclass(frozen=True)
class TensorDef:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def layer_tensors(i: int, hidden: int, ffn: int) -> list[TensorDef]:
    p = f"model.layers.{i}."
    return [
        TensorDef(p + "input_layernorm.weight", (hidden,)),
        TensorDef(p + "self_attn.q_proj.weight", (hidden, hidden)),
        TensorDef(p + "self_attn.q_proj.bias", (hidden,)),
        TensorDef(p + "self_attn.k_proj.weight", (hidden, hidden)),
        TensorDef(p + "self_attn.k_proj.bias", (hidden,)),
        TensorDef(p + "self_attn.v_proj.weight", (hidden, hidden)),
        TensorDef(p + "self_attn.v_proj.bias", (hidden,)),
        TensorDef(p + "self_attn.o_proj.weight", (hidden, hidden)),
        TensorDef(p + "post_attention_layernorm.weight", (hidden,)),
        TensorDef(p + "mlp.gate_proj.weight", (ffn, hidden)),
        TensorDef(p + "mlp.up_proj.weight", (ffn, hidden)),
        TensorDef(p + "mlp.down_proj.weight", (hidden, ffn)),
    ]


def model_tensors(total_elements: int, hidden: int = 4096, ffn: int = 11008) -> list[TensorDef]:
    """Layers until ``total_elements`` is reached exactly: the last tensor is cut, a 1-D tail added."""
    out: list[TensorDef] = []
    left = total_elements
    i = 0
    while left > 0:
        for t in layer_tensors(i, hidden, ffn):
            if t.numel <= left:
                out.append(t)
                left -= t.numel
                continue
            cols = t.shape[-1]
            rows = left // cols
            if len(t.shape) == 2 and rows > 0:
                out.append(TensorDef(t.name, (rows, cols)))
                left -= rows * cols
            if left > 0:
                out.append(TensorDef("model.norm.weight", (left,)))
                left = 0
            break
        i += 1
    return out


def header_bytes(tensors: list[TensorDef], dtype: str, meta: dict[str, str]) -> bytes:
    code, itemsize = DTYPES[dtype]
    head: dict = {"__metadata__": meta}
    pos = 0
    for t in tensors:
        nb = t.numel * itemsize
        head[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned, like the reference writer
    return struct.pack("<Q", len(text)) + text


def _to_bf16_bits(src: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs), into preallocated buffers."""
    u = src.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    tmp += 0x7FFF
    tmp += u
    tmp >>= 16
    np.copyto(out, tmp, casting="unsafe")
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def sequence_dir(root: Path, count: int, nbytes: int, dtype: str) -> Path:
    return root / f"{dtype}-{count}x{size_label(nbytes)}"


def _check_outside_repo(folder: Path) -> None:
    f = folder.resolve()
    if f == REPO or REPO in f.parents:
        raise SystemExit(f"make_data: refusing to write {f} inside the repository {REPO}")


def make_sequence(
    root: Path = DEFAULT_DIR,
    count: int = 6,
    nbytes: int = 10**9,
    dtype: str = "fp32",
    *,
    seed: int = 0,
    hidden: int = 4096,
    ffn: int = 11008,
    noise: float = 1e-3,
    verbose: bool = True,
) -> list[Path]:
    """Write (or reuse) ``count`` checkpoints of ``nbytes`` data each; return their paths in order."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    code, itemsize = DTYPES[dtype]
    folder = sequence_dir(root, count, nbytes, dtype)
    _check_outside_repo(folder)
    tensors = model_tensors(nbytes // itemsize, hidden, ffn)
    data_bytes = sum(t.numel for t in tensors) * itemsize
    paths = [folder / f"ckpt-{t:02d}.safetensors" for t in range(count)]
    headers = []
    for t in range(count):
        meta = {
            "format": "pt",
            "generator": f"wdiff benchmarks/make_data.py v{GENERATOR_VERSION}",
            "params": f"seed={seed} hidden={hidden} ffn={ffn} noise={noise} count={count}",
            "checkpoint": str(t),
        }
        headers.append(header_bytes(tensors, dtype, meta))

    if all(_matches(p, h, len(h) + data_bytes) for p, h in zip(paths, headers)):
        if verbose:
            print(
                f"make_data: reusing {folder} ({count} x {data_bytes / 1e9:.3f} GB {dtype})", file=sys.stderr
            )
        return paths

    folder.mkdir(parents=True, exist_ok=True)
    partial = [p.with_suffix(".partial") for p in paths]
    for p in paths:
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in partial]
    try:
        for fd, h in zip(fds, headers):
            _pwrite_all(fd, memoryview(h), 0)
        rng = np.random.default_rng(seed)
        noise_buf = np.empty(CHUNK, np.float32)
        tmp32 = np.empty(CHUNK, np.uint32)
        out16 = np.empty(CHUNK, np.uint16)
        pos = 0  # data offset of the current tensor
        for k, td in enumerate(tensors):
            n = td.numel
            w = np.empty(n, np.float32)  # the one tensor in memory: float32 master weights
            for s in range(0, n, CHUNK):
                e = min(s + CHUNK, n)
                rng.random(out=w[s:e], dtype=np.float32)
                if len(td.shape) == 1:  # norms ~ 1, biases ~ 0: both fine for a benchmark
                    w[s:e] *= 0.2
                    w[s:e] += 0.9 if "norm" in td.name else -0.1
                else:  # uniform with std ~ 0.02
                    w[s:e] -= 0.5
                    w[s:e] *= 0.07
            for t, fd in enumerate(fds):
                base = len(headers[t]) + pos
                for s in range(0, n, CHUNK):
                    e = min(s + CHUNK, n)
                    chunk = w[s:e]
                    if t > 0:
                        nz = noise_buf[: e - s]
                        rng.random(out=nz, dtype=np.float32)
                        nz -= 0.5
                        nz *= 2 * noise
                        chunk += nz
                    if dtype == "bf16":
                        data = _to_bf16_bits(chunk, tmp32[: e - s], out16[: e - s])
                    else:
                        data = chunk
                    _pwrite_all(fd, memoryview(data).cast("B"), base + s * itemsize)
            pos += n * itemsize
            del w
            if verbose and (k % 8 == 7 or k == len(tensors) - 1):
                done = pos * count
                print(
                    f"\rmake_data: {folder.name}: {done / 1e9:6.2f} / {data_bytes * count / 1e9:.2f} GB",
                    end="",
                    file=sys.stderr,
                )
    finally:
        for fd in fds:
            os.close(fd)
    for src, dst in zip(partial, paths):
        os.replace(src, dst)
    if verbose:
        print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return paths


def _matches(path: Path, header: bytes, size: int) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help="root folder (default %(default)s)")
    ap.add_argument("--size", default="1GB", help="data bytes per checkpoint, e.g. 128MB, 1GB, 1GiB")
    ap.add_argument("--count", type=int, default=6, help="checkpoints (default %(default)s)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    args = ap.parse_args(argv)
    paths = make_sequence(
        args.out,
        args.count,
        parse_size(args.size),
        args.dtype,
        seed=args.seed,
        hidden=args.hidden,
        ffn=args.ffn,
    )
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
