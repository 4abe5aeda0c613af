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
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from factories import DTYPES, random_sequence, reference, save, save_sharded
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


def trainer_state_target(folder: Path) -> Target:
    """``trainer_state.json`` with a training log (bare NaN included, as json.dumps writes it), read
    as the scan reads it and joined to intervals as the report does: wrong types never crash."""
    from wdiff import metrics
    from wdiff.checkpoints import load_trainer_state

    log = [
        {"loss": 2.5, "grad_norm": float("nan"), "learning_rate": 1e-4, "epoch": 0.1, "step": 10},
        {"eval_loss": 2.0, "step": 20},
        {"loss": 1.5, "step": 30, "note": "x"},
    ]
    seeds = [
        json.dumps({"global_step": 30, "epoch": 1.0, "log_history": log}).encode(),
        json.dumps({"global_step": 30, "log_history": [*log, "text", 7, None, [1]]}, indent=1).encode(),
    ]
    spans = [metrics.Interval(0, 0, 15), metrics.Interval(1, 15, 30), metrics.Interval(2, None, None)]

    def read(path: Path) -> None:
        state = load_trainer_state(path)
        metrics.log_join(state, spans)
        for key in metrics.LOG_KEYS:
            metrics.log_series(state, key)

    return Target(seeds, folder, "trainer_state.json", read)


def adapter_config_target(folder: Path) -> Target:
    """A PEFT checkpoint's ``adapter_config.json`` (rank/alpha patterns with literal and regex keys),
    read and assembled with a fixed earlier checkpoint: LoRA products or a one-line error."""
    from kinds import adapter_checkpoint

    from wdiff.assemble import assemble
    from wdiff.checkpoints import read_one

    rng = np.random.default_rng(0)
    tensors = {}
    for m, r in (("model.layers.0.q_proj", 2), ("model.layers.1.v_proj", 4)):
        tensors[f"base_model.model.{m}.lora_A.weight"] = rng.standard_normal((r, 3)).astype(np.float32)
        tensors[f"base_model.model.{m}.lora_B.weight"] = rng.standard_normal((5, r)).astype(np.float32)
    config = {"r": 2, "lora_alpha": 4, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {r"layers\.1\..*": 8}}
    first = adapter_checkpoint(folder / "first", tensors, config)
    adapter_checkpoint(folder, tensors, config)
    seeds = [
        json.dumps({"peft_type": "LORA", **config}).encode(),
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"v_proj": 4}}).encode(),
    ]
    earlier = read_one(1, first)

    def read(path: Path) -> None:
        assemble([earlier, read_one(2, path.parent)])

    return Target(seeds, folder, "adapter_config.json", read)


TARGETS: dict[str, Callable[[Path], Target]] = {
    "safetensors header": safetensors_target,
    "shard index": index_target,
    "onnx model": onnx_target,
    "trainer state": trainer_state_target,
    "adapter config": adapter_config_target,
}

# --- mutations ------------------------------------------------------------------------------------

_NUMBER = re.compile(rb"-?\d+")
_STRING = re.compile(rb'"[^"\\]*"')
_WORDS = [
    *(d.encode() for d in WDIFF_DTYPES), b"F33", b"", b"__metadata__", b"dtype", b"shape", b"data_offsets",
    b"../x.safetensors", b"/etc/passwd", b"outside/x.safetensors", b"model-00001-of-00002.safetensors",
    b"\\u0000", b"..", b".", b"\xff", b"weight_map",
    b"\\ud800", b"x\\udc00", b"\\ud83d\\ude00",  # lone surrogates (refused by the library), a pair
]  # fmt: skip
_NUMBERS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30]),
    st.just("-0"),  # JSON -0: an int for Python, the float -0.0 (no size) for the library
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


# --- the identity check under random damage -------------------------------------------------------

_DAMAGE = [
    "none", "copied over (same bytes, new file)", "other layout, same size", "other layout in place",
    "values flipped in place", "appended", "truncated", "touched", "deleted", "a pipe", "a symlink",
]  # fmt: skip


def _damage(path: Path, how: str, other: Path, i: int) -> bool:
    """Damage one input file; return whether it is still the file scanned (only for "none": a value
    flipped in place with its mtime put back still changes the file's ctime)."""
    st = path.stat()
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "copied over (same bytes, new file)":
        (path.parent / "tmp").write_bytes(data)
        os.replace(path.parent / "tmp", path)
    elif how.startswith("other layout"):
        header = json.loads(data[8 : 8 + n])
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        begin, moved = 0, {}
        for name in reversed(names):  # the same tensors, stored the other way round
            size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            moved[name] = {**header[name], "data_offsets": [begin, begin + size]}
            begin += size
        raw = json.dumps(moved, separators=(",", ":")).encode()
        new = data[:8] + raw + b" " * (n - len(raw)) + data[8 + n :]
        if how.endswith("in place"):
            path.write_bytes(new)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            (path.parent / "tmp").write_bytes(new)
            os.replace(path.parent / "tmp", path)
    elif how == "values flipped in place":
        at = 8 + n + i % (len(data) - 8 - n)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ 0x5A]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == "appended":
        with open(path, "ab") as f:
            f.write(b"\0" * (1 + i % 64))
    elif how == "truncated":
        os.truncate(path, i % len(data))
    elif how == "touched":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1 + i))
    elif how == "deleted":
        path.unlink()
    elif how == "a pipe":
        path.unlink()
        os.mkfifo(path)
    elif how == "a symlink":
        path.unlink()
        path.symlink_to(other)
    return how == "none"


def identity_fuzz(examples: int) -> None:
    """Scan a run, damage one of its files before the recheck or once compute has started, then
    compute: the result is right for the bytes read, or a one-line error names the damaged file."""
    from factories import trainer_run
    from safetensors.numpy import load_file

    from wdiff.checkpoints import recheck, scan
    from wdiff.compute import compute
    from wdiff.results import create_accumulated, layout_accumulated

    shapes = {"layers.0.w": (16, 9), "layers.0.b": (9,), "layers.1.w": (9, 5)}
    outcomes = {"accepted": 0, "refused": 0}
    with tempfile.TemporaryDirectory() as tmp:
        pristine = trainer_run(Path(tmp) / "pristine", random_sequence(shapes, 3, seed=1), [1, 2, 3])
        cases = iter(range(10**9))

        @settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= QUICK,
                  suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
        @given(
            how=st.sampled_from(_DAMAGE), which=st.integers(0, 2), after_recheck=st.booleans(),
            i=st.integers(0, 1 << 16), chunk=st.sampled_from([7, 64, 1 << 20]),
        )  # fmt: skip
        def one(how: str, which: int, after_recheck: bool, i: int, chunk: int) -> None:
            case = Path(tmp) / f"case{next(cases)}"
            shutil.copytree(pristine, case / "run")
            try:
                run = scan(case / "run")
                victim = case / "run" / f"checkpoint-{which + 1}" / "model.safetensors"
                other = case / "run" / f"checkpoint-{(which + 1) % 3 + 1}" / "model.safetensors"
                layout = layout_accumulated((t.name, t.shape) for t in run.tensors)
                create_accumulated(case / "acc", layout)
                same = True
                if not after_recheck:
                    same = _damage(victim, how, other, i)
                try:
                    recheck(run)
                    if after_recheck:
                        same = _damage(victim, how, other, i)
                    result = compute(run, str(case / "acc"), layout, chunk_elements=chunk, scheduler="sync")
                except WdiffError as e:
                    message = str(e)
                    assert not same, f"{how}: refused an unchanged file: {message}"
                    assert "\n" not in message and message.startswith(f"{victim}: "), message
                    outcomes["refused"] += 1
                    return
                assert same, f"{how} ({'after' if after_recheck else 'before'} the recheck) was not noticed"
                seq = [load_file(case / "run" / f"checkpoint-{t}" / "model.safetensors") for t in (1, 2, 3)]
                for name in shapes:
                    expected = reference(seq, name)["net_l2"]
                    np.testing.assert_allclose(result.tensors[name]["net_l2"], expected, rtol=1e-4)
                outcomes["accepted"] += 1
            finally:
                shutil.rmtree(case)

        one()
    print(f"identity: {sum(outcomes.values())} cases, {outcomes}")
    assert outcomes["refused"] > 0 and outcomes["accepted"] > 0


def test_identity_fuzz_quick():
    identity_fuzz(QUICK)


@pytest.mark.slow
def test_identity_fuzz_long():
    identity_fuzz(LONG)
