"""Fuzzing the parsers with mutated valid files: the only outcomes are a result or a clean WdiffError.

Each target is a ``Target``: valid seed files, where the mutated bytes go, and the reader to call.
Mutations are byte-level (flip, overwrite, insert, delete, truncate, append) and structural (the
header length, numbers and dtype names inside the JSON), so both the framing and the validation
after a successful JSON parse are reached. The safetensors target is also differential: wdiff
accepts a mutated file exactly when the safetensors library does.

A quick run is part of ``make test``; ``-m slow`` runs 10,000 cases per target. Adding a target is
one function returning a ``Target``, listed in ``TARGETS``.
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from factories import DTYPES, random_sequence, save, save_sharded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wdiff.errors import WdiffError
from wdiff.readers import read_checkpoint
from wdiff.readers.base import DTYPES as WDIFF_DTYPES
from wdiff.readers.safetensors import read_header

QUICK = 150
LONG = 10_000


@dataclass(frozen=True)
class Target:
    """A parser to fuzz: valid ``seeds`` (file bytes), the ``folder`` they are written into as
    ``name`` (with whatever else the reader needs), and ``read(path)`` (the file, or the folder)."""

    seeds: list[bytes]
    folder: Path
    name: str
    read: Callable[[Path], object]
    agrees: Callable[[Path, bool], None] | None = None  # a second opinion on the same bytes

    @property
    def path(self) -> Path:
        return self.folder / self.name


def _safetensors_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            save(Path(tmp) / "a", {"w": rng.standard_normal((3, 4)).astype(np.float32)}),
            save(
                Path(tmp) / "b",
                {
                    "layers.0.w": rng.standard_normal((2, 3)).astype(DTYPES["BF16"][0]),
                    "layers.0.b": rng.standard_normal(3).astype(np.float16),
                    "step": np.array(7, np.int64),
                    "empty": np.zeros((0, 2), np.float32),
                    "mask": np.array([True, False, True]),
                },
                metadata={"format": "pt", "note": "seed"},
            ),
            save(Path(tmp) / "c", {"e4m3": np.ones(5, DTYPES["F8_E4M3"][0]), "x": np.arange(3.0)}),
        ]
        return [f.read_bytes() for f in files]


def _library_agrees(path: Path, accepted: bool) -> None:
    """The safetensors library opens (and validates the header of) exactly the files wdiff accepts."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
        library = True
    except Exception:  # noqa: BLE001 - the library's error types vary
        library = False
    assert library == accepted, f"wdiff {'accepts' if accepted else 'refuses'}, the library does not"


def safetensors_target(folder: Path) -> Target:
    return Target(_safetensors_seeds(), folder, "fuzz.safetensors", read_header, _library_agrees)


def index_target(folder: Path) -> Target:
    """A sharded checkpoint whose ``model.safetensors.index.json`` is mutated."""
    tensors = random_sequence({f"layers.{i}.w": (2, 2) for i in range(4)}, 1)[0]
    save_sharded(folder, tensors, shards=2)
    index = (folder / "model.safetensors.index.json").read_bytes()
    save(folder / "outside" / "x.safetensors", {"w": np.zeros(2, np.float32)})
    pretty = json.dumps(json.loads(index), indent=2).encode()
    return Target([index, pretty], folder, "model.safetensors.index.json", lambda _: read_checkpoint(folder))


def onnx_target(folder: Path) -> Target:
    """ONNX models with inline (raw_data) and typed initializers, and one with external data in
    ``w.bin`` beside it (mutations then hit locations, offsets and lengths)."""
    import ml_dtypes
    from kinds import onnx_model

    from wdiff.readers.onnx import read_onnx

    rng = np.random.default_rng(0)
    weights = {
        "a.weight": (rng.standard_normal((3, 4)).astype(np.float32), "F32"),
        "b.bias": (rng.standard_normal(5).astype(ml_dtypes.bfloat16), "BF16"),
    }
    seeds = []
    for i, kw in enumerate([{}, {"typed": True}, {"external": "w.bin"}]):
        path = onnx_model(folder / f"seed{i}.onnx", weights, {"a.weight": ("MatMul", 1)}, **kw)
        seeds.append(path.read_bytes())
    return Target(seeds, folder, "fuzz.onnx", read_onnx)


TARGETS: dict[str, Callable[[Path], Target]] = {
    "safetensors header": safetensors_target,
    "shard index": index_target,
    "onnx model": onnx_target,
}

# --- mutations ------------------------------------------------------------------------------------

_NUMBER = re.compile(rb"-?\d+")
_STRING = re.compile(rb'"[^"\\]*"')
_WORDS = [
    *(d.encode() for d in WDIFF_DTYPES), b"F33", b"", b"__metadata__", b"dtype", b"shape", b"data_offsets",
    b"../x.safetensors", b"/etc/passwd", b"outside/x.safetensors", b"model-00001-of-00002.safetensors",
    b"\\u0000", b"..", b".", b"\xff", b"weight_map",
]  # fmt: skip
_NUMBERS = st.one_of(
    st.integers(-3, 40), st.sampled_from([2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30])
)


def _at(data: bytes, i: int) -> int:
    return i % (len(data) + 1)


def _flip(data: bytes, i: int, mask: int) -> bytes:
    if not data:
        return data
    i %= len(data)
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


def _replace_match(pattern: re.Pattern, data: bytes, k: int, new: bytes) -> bytes:
    found = list(pattern.finditer(data))
    if not found:
        return data
    m = found[k % len(found)]
    return data[: m.start()] + new + data[m.end() :]


MUTATIONS = {
    "flip": st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)).map(lambda a: lambda d: _flip(d, *a)),
    "overwrite": st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16)).map(
        lambda a: lambda d: d[: _at(d, a[0])] + a[1] + d[_at(d, a[0]) + len(a[1]) :]
    ),
    "insert": st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16)).map(
        lambda a: lambda d: d[: _at(d, a[0])] + a[1] + d[_at(d, a[0]) :]
    ),
    "delete": st.tuples(st.integers(0, 1 << 16), st.integers(1, 64)).map(
        lambda a: lambda d: d[: _at(d, a[0])] + d[_at(d, a[0]) + a[1] :]
    ),
    "truncate": st.integers(0, 1 << 16).map(lambda i: lambda d: d[: _at(d, i)]),
    "append": st.binary(min_size=1, max_size=64).map(lambda b: lambda d: d + b),
    "header length": st.integers(0, 2**64 - 1).map(lambda n: lambda d: struct.pack("<Q", n) + d[8:]),
    "number": st.tuples(st.integers(0, 1000), _NUMBERS).map(
        lambda a: lambda d: _replace_match(_NUMBER, d, a[0], str(a[1]).encode())
    ),
    "string": st.tuples(st.integers(0, 1000), st.sampled_from(_WORDS)).map(
        lambda a: lambda d: _replace_match(_STRING, d, a[0], b'"' + a[1] + b'"')
    ),
}


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with one to four mutations applied in turn."""
    mutation = st.one_of(*MUTATIONS.values())

    def apply(args: tuple[bytes, list[Callable[[bytes], bytes]]]) -> bytes:
        data, steps = args
        for step in steps:
            data = step(data)
        return data

    return st.tuples(st.sampled_from(seeds), st.lists(mutation, min_size=1, max_size=4)).map(apply)


def fuzz(target_name: str, examples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = TARGETS[target_name](Path(tmp))
        outcomes = {"accepted": 0, "refused": 0}

        @settings(
            max_examples=examples, deadline=None, database=None, derandomize=examples <= QUICK,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(data=mutated(target.seeds))
        def one(data: bytes) -> None:
            target.path.write_bytes(data)
            try:
                target.read(target.path)
                accepted = True
            except WdiffError as e:
                message = str(e)
                assert "\n" not in message and message.startswith(tmp), message
                accepted = False
            outcomes["accepted" if accepted else "refused"] += 1
            if target.agrees is not None:
                target.agrees(target.path, accepted)

        one()
        print(f"{target_name}: {sum(outcomes.values())} cases, {outcomes}")
        assert outcomes["refused"] > 0


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_quick(target):
    fuzz(target, QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_long(target):
    fuzz(target, LONG)
