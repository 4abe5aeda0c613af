"""Make real checkpoint files for tests with the official safetensors writer, and the numpy reference.

Every dtype, BF16 and FP8 included, is written by ``safetensors.serialize_file`` (the library's own
writer), so the files are exactly what users have on disk.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors

# safetensors dtype code -> (numpy/ml_dtypes type, the writer's dtype spelling)
DTYPES = {
    "F64": (np.float64, "float64"),
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (ml_dtypes.bfloat16, "bfloat16"),
    "F8_E4M3": (ml_dtypes.float8_e4m3fn, "float8_e4m3fn"),
    "F8_E5M2": (ml_dtypes.float8_e5m2, "float8_e5m2"),
    "I64": (np.int64, "int64"),
    "I32": (np.int32, "int32"),
    "U8": (np.uint8, "uint8"),
    "BOOL": (np.bool_, "bool"),
}
_SPELLING = {np.dtype(t): s for t, s in DTYPES.values()}


def save(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write ``tensors`` (any dtype in DTYPES) with the official safetensors writer."""
    arrays = {k: np.array(v, order="C") for k, v in tensors.items()}  # keeps 0-d as 0-d
    specs = {
        k: safetensors.TensorSpec(
            dtype=_SPELLING[a.dtype], shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
        )
        for k, a in arrays.items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.serialize_file(specs, str(path), metadata=metadata)
    return Path(path)


def save_sharded(folder: str | Path, tensors: Mapping[str, np.ndarray], shards: int) -> Path:
    """A sharded checkpoint: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    folder = Path(folder)
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save(folder / shard, {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def trainer_run(
    root: str | Path,
    checkpoints: Sequence[Mapping[str, np.ndarray]],
    steps: Sequence[int],
    shards: int = 1,
) -> Path:
    """An HF Trainer output dir: ``checkpoint-<step>/`` with weights and ``trainer_state.json``."""
    root = Path(root)
    history = []
    for step, tensors in zip(steps, checkpoints):
        folder = root / f"checkpoint-{step}"
        if shards > 1:
            save_sharded(folder, tensors, shards)
        else:
            save(folder / "model.safetensors", tensors)
        history.append(
            {
                "loss": 2.0 / (1 + step),
                "learning_rate": 1e-3,
                "grad_norm": float("nan"),
                "step": step,
            }
        )
        state = {"global_step": step, "max_steps": steps[-1], "log_history": list(history)}
        (folder / "trainer_state.json").write_text(json.dumps(state))  # bare NaN, like json.dumps
    return root


def random_sequence(
    shapes: Mapping[str, tuple[int, ...]], count: int, dtype: str = "F32", seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` checkpoints of a random walk over the given tensors, stored in ``dtype``."""
    rng = np.random.default_rng(seed)
    np_type = DTYPES[dtype][0]
    current = {k: np.asarray(rng.standard_normal(s)) for k, s in shapes.items()}
    out = []
    for t in range(count):
        if t:
            current = {
                k: v + rng.standard_normal(v.shape) * rng.uniform(0.01, 0.2) for k, v in current.items()
            }
        out.append({k: v.astype(np_type) for k, v in current.items()})
    return out


def reference(checkpoints: Sequence[Mapping[str, np.ndarray]], name: str) -> dict:
    """The float64 numpy reference of every metric wdiff reports for one tensor."""
    w = [np.asarray(c[name]).astype(np.float64) for c in checkpoints]
    diffs = [b - a for a, b in zip(w, w[1:])]
    net = float(np.linalg.norm((w[-1] - w[0]).ravel()))
    first = float(np.linalg.norm(w[0].ravel()))
    norms = [float(np.linalg.norm(x.ravel())) for x in w]
    return {
        "distance_l2": [float(np.linalg.norm((x - w[0]).ravel())) for x in w],
        "rotation": [
            1.0 - float(np.dot(x.ravel(), w[0].ravel())) / (n * first) if n and first else None
            for x, n in zip(w, norms)
        ],
        "accumulated": sum(np.abs(d) for d in diffs),
        "net_l2": net,
        "relative_change": net / first if first else None,
        "interval_l1": [float(np.abs(d).sum()) for d in diffs],
        "interval_l2": [float(np.linalg.norm(d.ravel())) for d in diffs],
        "l2": [float(np.linalg.norm(x.ravel())) for x in w],
    }


def sgd_run(
    *,
    blocks: int = 6,
    steps: Sequence[int] = tuple(range(10, 90, 10)),
    lr: float = 0.01,
    lr_scale: Mapping[str, float] | None = None,
    frozen: Sequence[str] = (),
    unused_rows: Mapping[str, Sequence[int]] | None = None,
    nan_at: tuple[str, int, tuple[int, ...]] | None = None,
    kick: tuple[str, int, float] | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Checkpoints of a small transformer-shaped model trained by a numerical SGD:
    ``W(s+1) = W(s) - lr(s) * g(s)``, with ``g = 0.1 (W - target) + noise`` (a noisy pull towards a
    fixed target) and a cosine learning rate from ``lr`` down to ``0.3 lr``. Checkpoints at ``steps``.

    Planted causes: ``lr_scale`` {tensor-name prefix: factor}; ``frozen`` tensors are never updated;
    ``unused_rows`` {tensor: rows whose gradient is always zero}; ``nan_at`` (tensor, step, index):
    that weight becomes NaN at that step and stays NaN (as a diverged weight does); ``kick`` (tensor
    name prefix, step, factor): one step whose gradient noise is ``factor`` times larger (a spike).
    """
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (50, 16)}
    for b in range(blocks):
        shapes[f"layers.{b}.attn.weight"] = (16, 16)
        shapes[f"layers.{b}.mlp.weight"] = (32, 16)
        shapes[f"layers.{b}.norm.weight"] = (16,)
    shapes["head.weight"] = (10, 16)
    w = {k: rng.standard_normal(s) + (1.0 if k.endswith("norm.weight") else 0.0) for k, s in shapes.items()}
    target = {k: rng.standard_normal(s) for k, s in shapes.items()}
    scale = {k: next((f for p, f in (lr_scale or {}).items() if k.startswith(p)), 1.0) for k in shapes}
    out = []
    total = steps[-1]
    for step in range(1, total + 1):
        rate = lr * (0.3 + 0.7 * 0.5 * (1 + np.cos(np.pi * step / total)))
        for k in shapes:
            if k in frozen:
                continue
            noise = rng.standard_normal(shapes[k])
            if kick is not None and k.startswith(kick[0]) and kick[1] == step:
                noise *= kick[2]
            g = 0.1 * (w[k] - target[k]) + noise
            for r in (unused_rows or {}).get(k, ()):
                g[r] = 0.0
            w[k] = w[k] - rate * scale[k] * g
        if nan_at is not None and nan_at[1] == step:
            w[nan_at[0]][nan_at[2]] = np.nan
        if step in steps:
            out.append({k: v.astype(np.float32) for k, v in w.items()})
    return out, list(steps)


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A hand-made safetensors file: header length (``length`` to lie about it), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


_GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def _one(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    shape = list(shape) if isinstance(shape, tuple) else shape
    offsets = list(offsets) if isinstance(offsets, tuple) else offsets
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


# Every way docs/formats.md says a safetensors file is broken, as the bytes of one file.
MALFORMED = {
    "empty file": b"",
    "too short": b"\x08\0\0",
    "header length over 100 MB": safetensors_bytes(b"{}", length=100_000_001),
    "header claims petabytes": safetensors_bytes(b"{}", length=1 << 53),
    "header past end of file": safetensors_bytes(json.dumps(_GOOD).encode(), b"\0" * 8, length=4000),
    "invalid utf-8": safetensors_bytes(b'{"w\xff": 1}'),
    "invalid json": safetensors_bytes(b'{"w": {"dtype": "F32",'),
    "deeply nested json": safetensors_bytes(b"[" * 100_000 + b"]" * 100_000),
    "NaN in header": safetensors_bytes(b'{"w": NaN}'),
    "duplicate tensor name": safetensors_bytes(
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        b"\0" * 8,
    ),
    "not an object": safetensors_bytes(b"[1, 2, 3]"),
    "entry not an object": safetensors_bytes({"w": [0, 8]}, b"\0" * 8),
    "unknown dtype": safetensors_bytes(_one("F33"), b"\0" * 8),
    "shape not a list": safetensors_bytes(_one(shape="2"), b"\0" * 8),
    "negative size": safetensors_bytes(_one(shape=(-2,)), b"\0" * 8),
    "float size": safetensors_bytes(_one(shape=(2.0,)), b"\0" * 8),
    "offsets not a pair": safetensors_bytes(_one(offsets=(0, 4, 8)), b"\0" * 8),
    "boolean offsets": safetensors_bytes(_one(shape=(0,), offsets=(False, False)), b""),
    "gap": safetensors_bytes(_one(offsets=(4, 12)), b"\0" * 12),
    "overlap": safetensors_bytes(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "backwards": safetensors_bytes(_one(shape=(0,), offsets=(8, 0)), b"\0" * 8),
    "size mismatch": safetensors_bytes(_one(shape=(3,)), b"\0" * 8),
    "huge shape": safetensors_bytes(_one(shape=(2**62, 2**62)), b"\0" * 8),
    "numbers of 4299 digits": safetensors_bytes(
        b'{"w": {"dtype": "F32", "shape": [%s, %s], "data_offsets": [0, 8]}}' % (b"9" * 4299, b"9" * 4299),
        b"\0" * 8,
    ),
    "dims overflow int64": safetensors_bytes(_one(shape=[2**40] * 4, offsets=(0, 2**162)), b"\0" * 8),
    "truncated": safetensors_bytes(_GOOD, b"\0" * 5),
    "trailing bytes": safetensors_bytes(_GOOD, b"\0" * 9),
    "metadata not strings": safetensors_bytes({**_GOOD, "__metadata__": {"epoch": 3}}, b"\0" * 8),
    "metadata not an object": safetensors_bytes({**_GOOD, "__metadata__": "pt"}, b"\0" * 8),
}


def assert_same_entries(got: Mapping[str, dict], want: Mapping[str, dict]) -> None:
    """Summary entries of a run extended from earlier results (``got``) against a full run's: equal,
    but for ``distance_last_l2``, which an extension knows only for the checkpoints it read (None for
    the others, see docs/metrics.md); where it is known it is the full run's value, bit for bit."""
    assert list(got) == list(want)
    for name, entry in want.items():
        g, w = dict(got[name]), dict(entry)
        g_last, w_last = g.pop("distance_last_l2", None), w.pop("distance_last_l2", None)
        assert g == w, name
        if w_last is not None:
            assert g_last is not None and len(g_last) == len(w_last), name
            assert g_last[0] == w_last[0] and g_last[-1] == w_last[-1], name
            assert all(a is None or a == b for a, b in zip(g_last, w_last)), name


def assert_same_results(watched, batch) -> None:
    """Bit for bit: two results folders' accumulated maps, rows and every metric; the same steps (a
    watch or a callback against a batch run over the same checkpoints)."""
    assert [c["step"] for c in watched.summary["checkpoints"]] == [
        c["step"] for c in batch.summary["checkpoints"]
    ]
    assert watched.names == batch.names
    for name in batch.names:
        np.testing.assert_array_equal(watched.accumulated(name), batch.accumulated(name), err_msg=name)
        np.testing.assert_array_equal(watched.neuron_change(name), batch.neuron_change(name), err_msg=name)
        w, b = watched.summary["tensors"][name], batch.summary["tensors"][name]
        for key in (
            "accumulated_l1",
            "accumulated_max",
            "net_l2",
            "interval_l1",
            "interval_l2",
            "l2",
            "rotation",
            "nonfinite",
        ):
            assert w[key] == b[key], (name, key)


def wdiff_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m wdiff ARGS`` of this checkout, its output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
