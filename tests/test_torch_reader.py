"""PyTorch files read without running pickle code: the restricted unpickler and the torch.save reader.

torch (a test-only dependency) makes real files in tmp_path; every tensor wdiff locates is decoded
from its byte range and compared bit for bit with ``torch.load(weights_only=True)``. The safety tests
plant a canary command in pickles; the fuzz tests mutate real files and random opcode streams and allow
only a result or a one-line WdiffError, under a per-case time and memory bound.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import io
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wdiff.errors import WdiffError
from wdiff.readers.base import DTYPES, PiecesRef, TensorRef
from wdiff.readers.pickle import (
    RUNS_CODE,
    Placeholder,
    plain_containers,
    restricted_load,
    with_placeholders,
)
from wdiff.readers.torch import (
    TORCH_DTYPES,
    TorchContents,
    _load,
    _open,
    looks_like_legacy_torch,
    looks_like_torch_zip,
    read_torch,
)

torch = pytest.importorskip("torch")
nn = torch.nn

CODES = {getattr(torch, name): code for name, (code, _) in TORCH_DTYPES.items() if code is not None}
FLOATS = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
]  # fmt: skip


# ---- helpers ----------------------------------------------------------------------------------------------


def _ref_bytes(ref: TensorRef, raw: bytes) -> bytes:
    if isinstance(ref, PiecesRef):
        size = ref.kind.bits // 8
        assert [p.start for p in ref.pieces] == list(np.cumsum([0] + [p.count for p in ref.pieces[:-1]]))
        assert sum(p.count for p in ref.pieces) == ref.numel
        return b"".join(raw[p.offset : p.offset + p.count * size] for p in ref.pieces)
    return raw[ref.offset : ref.offset + ref.nbytes]


def _torch_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _flatten(obj: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def _check(path: Path, got: TorchContents, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor wdiff read has torch's shape, dtype and bytes, and decodes to torch's values."""
    raw = path.read_bytes()
    skipped = {s.name for s in got.skipped}
    assert set(got.tensors) | skipped == set(expected)
    assert not set(got.tensors) & skipped
    for name, ref in got.tensors.items():
        t = expected[name]
        assert ref.path == str(path)
        assert ref.shape == tuple(t.shape), name
        assert ref.dtype == CODES[t.dtype], name
        data = _ref_bytes(ref, raw)
        assert len(data) == ref.nbytes == t.numel() * t.element_size()
        assert data == _torch_bytes(t), name
        t = t.detach()
        if ref.kind.is_float:
            decoded = np.frombuffer(data, ref.kind.storage).view(ref.kind.decoded).reshape(ref.shape)
            np.testing.assert_array_equal(decoded.astype(np.float64), t.double().numpy())


def _save(obj: object, path: Path, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _read_and_check(path: Path, state_key: str | None = None, weights_only: bool = True) -> TorchContents:
    got = read_torch(path)
    loaded = torch.load(path, weights_only=weights_only)
    state = loaded
    for key in (state_key or "").split(".") if state_key else []:
        state = state[key]
    assert got.state_key == state_key
    _check(path, got, _flatten(state))
    return got


def _rezip(
    src: Path, dst: Path, replace: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()
) -> Path:
    """The same records in a zip written by Python's zipfile (no 64-byte alignment), some replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            record = info.filename.partition("/")[2]
            data = (replace or {}).get(record, zin.read(info))
            kind = zipfile.ZIP_DEFLATED if record in deflate or "*" in deflate else zipfile.ZIP_STORED
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=kind)
    return dst


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.bn = nn.BatchNorm1d(dim)  # buffers: running stats and an int64 counter
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight


class RunConfig:
    """A user's own class in Lightning hyper-parameters: becomes a placeholder, never an error."""

    def __init__(self) -> None:
        self.lr = 3e-4
        self.layers = [2, 2]
        self.path = pathlib.PurePosixPath("/data/run")


@dataclass(frozen=True)
class FrozenConfig:
    width: int = 16
    name: str = "tiny"


def touch_canary(name: str) -> None:
    Path(name).touch()


class _Evil:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


# ---- the restricted unpickler -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(6))
def test_plain_values_round_trip(protocol: int) -> None:
    obj = {
        "a": [1, 2.5, "x", b"by", None, True, (1, 2), -(2**40)],
        "s": {1, 2},
        "f": frozenset({"q"}),
        "od": collections.OrderedDict(x=1),
        "big": 2**100,
        "ba": bytearray(b"zz"),
        "c": 1 + 2j,
        "dd": collections.defaultdict(list, {"k": [1]}),
        "u": "\u00e9\U0001f600",
        "nested": {"t": ((1,), ("a", 2.0))},
    }
    obj["a"].append(obj["a"])  # a cycle, through the memo
    got = restricted_load(pickle.dumps(obj, protocol=protocol), "f.pkl", plain_containers("f.pkl"))
    assert isinstance(got, dict) and got["a"][-1] is got["a"]
    got["a"].pop()
    obj["a"].pop()
    assert got == {**obj, "od": {"x": 1}, "dd": {"k": [1]}}


@pytest.mark.parametrize("protocol", range(6))
def test_placeholders_record_without_calling(protocol: int) -> None:
    hparams = argparse.Namespace(lr=0.1, out=pathlib.PurePosixPath("/x"), cfg=FrozenConfig())
    allowed = with_placeholders(plain_containers("f.pkl"), ["argparse.Namespace", "pathlib", __name__])
    got = restricted_load(pickle.dumps({"h": hparams}, protocol=protocol), "f.pkl", allowed)
    assert isinstance(got, dict) and isinstance(got["h"], Placeholder)
    assert (got["h"].module, got["h"].name) == ("argparse", "Namespace")
    attrs = got["h"].attributes()
    assert attrs["lr"] == 0.1 and isinstance(attrs["out"], Placeholder)
    assert attrs["out"].args == ("/", "x")
    assert attrs["cfg"].attributes() == {"width": 16, "name": "tiny"}


def test_unknown_names_are_refused_without_a_placeholder_prefix() -> None:
    data = pickle.dumps(argparse.Namespace(a=1), protocol=2)
    with pytest.raises(WdiffError, match=r"^f\.pkl: refuses to unpickle argparse\.Namespace: not a tensor"):
        restricted_load(data, "f.pkl", plain_containers("f.pkl"))


EVIL = [
    (os.system, ("touch CANARY",), "posix.system"),
    (exec, ("open('CANARY', 'w')",), "builtins.exec"),
    (eval, ("open('CANARY', 'w')",), "builtins.eval"),
    (getattr, ("abc", "upper"), "builtins.getattr"),
    (__import__, ("os",), "builtins.__import__"),
    (subprocess.call, (["touch", "CANARY"],), "subprocess.call"),
    (copyreg._reconstructor, (object, object, None), None),  # allowed name, refused argument
]


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("func, args, shown", EVIL[:-1])
def test_code_is_refused(tmp_path, monkeypatch, protocol, func, args, shown) -> None:
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps(_Evil(func, *args), protocol=protocol)
    allowed = with_placeholders(plain_containers("f.pkl"), [""], refused=RUNS_CODE)
    with pytest.raises(WdiffError, match=rf"^f\.pkl: refuses to unpickle {shown}: ") as e:
        restricted_load(data, "f.pkl", allowed)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "CANARY").exists()


def test_placeholders_are_inert_whatever_their_name(tmp_path, monkeypatch) -> None:
    # A name under no refused prefix becomes a placeholder: the call is recorded, never made.
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps({"x": _Evil(touch_canary, "CANARY")}, protocol=2)
    got = restricted_load(data, "f.pkl", with_placeholders(plain_containers("f.pkl"), [""], RUNS_CODE))
    assert isinstance(got, dict) and isinstance(got["x"], Placeholder)
    assert (got["x"].module, got["x"].name, got["x"].args) == (__name__, "touch_canary", ("CANARY",))
    assert not (tmp_path / "CANARY").exists()


def test_copyreg_extensions_are_never_consulted(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = os.system.__module__  # posix
    copyreg.add_extension(module, "system", 0xF0)
    try:
        data = pickle.dumps(_Evil(os.system, "touch CANARY"), protocol=2)
        assert b"\x82\xf0" in data  # EXT1 240
        pickle.loads(pickle.dumps(0))  # the registry and its cache are live in this process
        for opcode in (b"\x82\xf0", b"\x83\xf0\x00", b"\x84\xf0\x00\x00\x00"):
            with pytest.raises(WdiffError, match=r"^f\.pkl: refuses to unpickle a copyreg extension code"):
                restricted_load(b"\x80\x02" + opcode + b"U\x0ctouch CANARY\x85R.", "f.pkl", {})
    finally:
        copyreg.remove_extension(module, "system", 0xF0)
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "pickle is truncated"),
        (b"\x80\x02", "pickle is truncated"),
        (b"\x80\x02X\xff\xff\xff\xff", "pickle is truncated"),  # BINUNICODE past the end: nothing allocated
        (b"\x80\x04\x8e" + b"\xff" * 8, "pickle is truncated"),  # BINBYTES8
        (b"\x80\x04\x8d" + (1 << 62).to_bytes(8, "little"), "pickle is truncated"),  # BINUNICODE8
        (b"\x80\x02\x8b\xff\xff\xff\x7f", "pickle is truncated"),  # LONG4 of 2 GiB
        (b"\x80\x02\x8b\xff\xff\xff\xff.", "negative length"),
        (b"\x80\x04\x95" + b"\xff" * 8 + b"N.", "pickle is truncated"),  # FRAME past the end
        (b"\x80\x06N.", "unsupported pickle protocol 6"),
        (b"\x80\x02.", "STOP with an empty stack"),
        (b"\x80\x02h\x05.", "memo entry 5 was never stored"),
        (b"\x80\x02e.", "no MARK"),
        (b"\x80\x02\xff.", "unknown opcode 0xff"),
        (b"\x80\x02(\x85.", "stack underflow"),
        (b"\x80\x02N)R.", "calls None"),
        (b"\x80\x02K\x01K\x02b.", "BUILD (setting state) on 1"),
        (b"\x80\x02}]K\x01s.", "as a dict key"),
        (b"\x80\x02}\x8a\x09" + b"\xff" * 8 + b"\x7fNs.", "int of over 61 bits"),
        (b"\x80\x02Q.", "stack underflow"),
        (b"\x80\x02NQ.", "persistent id"),
        (b"\x80\x05\x97.", "out-of-band buffer"),
        (b"I99999" + b"9" * 5000 + b"\n.", "ValueError"),  # past Python's int digit limit
        (b"\x80\x02cos\nsystem\n.", "refuses to unpickle os.system"),
        (b"\x80\x02c__builtin__\neval\n.", "refuses to unpickle builtins.eval"),  # protocol 2 names mapped
    ],
)
def test_bad_pickles_are_one_line_errors(data: bytes, problem: str) -> None:
    allowed = with_placeholders(plain_containers("f.pkl"), [""], RUNS_CODE)
    with pytest.raises(WdiffError, match=r"^f\.pkl: ") as e:
        restricted_load(data, "f.pkl", allowed)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_deeply_nested_tuple_keys_are_refused_not_hashed() -> None:
    # CPython's tuple hash recurses without a depth check: hashing this key would crash the process.
    data = b"\x80\x02}" + b"N" + b"\x85" * 200_000 + b"Ns."
    with pytest.raises(WdiffError, match="nested over 8 deep"):
        restricted_load(data, "f.pkl", {})
    wide = b"\x80\x02}(" + b"K\x01" * 100 + b"tNs."
    with pytest.raises(WdiffError, match="tuple key of over 64 values"):
        restricted_load(wide, "f.pkl", {})


def test_object_count_is_bounded() -> None:
    with pytest.raises(WdiffError, match="builds over 1000 objects"):
        restricted_load(b"\x80\x02(" + b"]" * 2000 + b"l.", "f.pkl", {}, max_objects=1000)


def test_oversized_pickles_are_refused_unread(monkeypatch) -> None:
    import wdiff.readers.pickle as wp

    monkeypatch.setattr(wp, "MAX_PICKLE_BYTES", 10)
    with pytest.raises(WdiffError, match="pickle of 11 bytes is over the"):
        restricted_load(b"\x80\x02" + b"N" * 8 + b".", "f.pkl", {})


# ---- torch.save files: every tensor against torch.load -----------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_module_state_dict(tmp_path, protocol) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    path = _save(model.state_dict(), tmp_path / "pytorch_model.bin", pickle_protocol=protocol)
    # torch 2.13's weights_only unpickler has no FRAME opcode: protocol >= 4 files need the full
    # unpickler (safe here: the file was just written by this test)
    got = _read_and_check(path, weights_only=protocol < 4)
    assert got.step is None and not got.skipped
    assert "bn.num_batches_tracked" in got.tensors and got.tensors["bn.num_batches_tracked"].dtype == "I64"
    assert looks_like_torch_zip(path) and not looks_like_legacy_torch(path)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_float_dtype(tmp_path, dtype) -> None:
    torch.manual_seed(1)
    values = torch.randn(7, 5) * 4
    if dtype == torch.float8_e8m0fnu:
        values = values.abs() + 2.0**-20
    sd = {"w": values.to(dtype), "scalar": torch.tensor(1.5).to(dtype), "view": values.to(dtype)[2:5]}
    got = _read_and_check(_save(sd, tmp_path / "m.pt"))
    assert got.tensors["w"].dtype == CODES[dtype] and DTYPES[got.tensors["w"].dtype].is_float
    assert got.tensors["scalar"].shape == ()


def test_integer_bool_and_complex_dtypes(tmp_path) -> None:
    sd = {
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([0, 1, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([0, 1, 2**63], dtype=torch.uint64),
        "mask": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "c128": torch.randn(3, dtype=torch.complex128),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
    }
    path = _save(sd, tmp_path / "m.pt")
    got = read_torch(path)
    skipped = {s.name: s.reason for s in got.skipped}
    assert skipped.keys() == {"c128", "conj"}
    assert "complex128 is not read" in skipped["c128"] and "conjugated view" in skipped["conj"]
    _check(path, got, {k: v for k, v in torch.load(path, weights_only=True).items()})


def test_views_with_storage_offsets_and_shared_storage(tmp_path) -> None:
    torch.manual_seed(2)
    big = torch.randn(100)
    sd = {"a": big[:30], "b": big[30:70].view(4, 10), "c": big[70:], "whole": big}
    path = _save(sd, tmp_path / "m.pt")
    got = _read_and_check(path)
    refs = got.tensors
    assert refs["b"].offset == refs["whole"].offset + 30 * 4  # one storage, offsets into it
    assert refs["c"].offset == refs["whole"].offset + 70 * 4


def test_tied_weights_are_two_refs_to_the_same_bytes(tmp_path) -> None:
    model = TinyLM(tied=True)
    got = _read_and_check(_save(model.state_dict(), tmp_path / "m.pt"))
    a, b = got.tensors["embed.weight"], got.tensors["head.weight"]
    assert (a.path, a.offset, a.nbytes, a.dtype, a.shape) == (b.path, b.offset, b.nbytes, b.dtype, b.shape)


def test_strided_views_become_pieces_or_are_skipped(tmp_path) -> None:
    torch.manual_seed(3)
    big = torch.randn(100, 256)
    sd = {
        "columns": big[:, :128],  # 100 runs of 128: pieces
        "middle": big[5:9, 64:192],  # 4 runs of 128 from an offset
        "expanded": torch.randn(128).expand(4, 128),  # stride 0: the same run 4 times
        "batched": torch.randn(3, 4, 80).transpose(0, 1),  # runs of 80
        "transposed": torch.randn(64, 96).t(),  # runs of 1 element: skipped
        "tiny_runs": torch.randn(200, 8)[:, :4],  # runs of 4: skipped
        "rows": big[10:20],  # contiguous with an offset: one range
        "unit_dims": torch.randn(1, 30, 1).transpose(0, 2),  # size-1 strides never matter
    }
    path = _save(sd, tmp_path / "m.pt")
    got = _read_and_check(path)
    assert isinstance(got.tensors["columns"], PiecesRef) and len(got.tensors["columns"].pieces) == 100
    assert isinstance(got.tensors["middle"], PiecesRef) and len(got.tensors["middle"].pieces) == 4
    assert len({p.offset for p in got.tensors["expanded"].pieces}) == 1
    assert type(got.tensors["rows"]) is TensorRef and type(got.tensors["unit_dims"]) is TensorRef
    reasons = {s.name: s.reason for s in got.skipped}
    assert reasons.keys() == {"transposed", "tiny_runs"}
    assert "96 runs of 1 elements" not in reasons["transposed"]  # 6144 runs of 1
    assert "too fragmented" in reasons["transposed"] and "runs of 4 elements" in reasons["tiny_runs"]


def test_scalars_and_zero_size_tensors(tmp_path) -> None:
    sd = {"s": torch.tensor(3.25), "e": torch.zeros(0, 4), "e2": torch.zeros(5, 0), "one": torch.ones(1)}
    got = _read_and_check(_save(sd, tmp_path / "m.pt"))
    assert got.tensors["s"].shape == () and got.tensors["s"].nbytes == 4
    assert got.tensors["e"].nbytes == 0 and got.tensors["e"].shape == (0, 4)


def test_parameters_in_a_plain_dict(tmp_path) -> None:
    sd = {"w": nn.Parameter(torch.randn(3, 4)), "frozen": nn.Parameter(torch.randn(2), requires_grad=False)}
    p = nn.Parameter(torch.randn(5))
    p.note = "attr"  # a Python attribute: saved through _rebuild_parameter_with_state
    sd["with_state"] = p
    _read_and_check(_save(sd, tmp_path / "m.pt"))


def test_wrapped_training_checkpoint(tmp_path) -> None:
    torch.manual_seed(4)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    loss = model.head(model.embed(torch.randint(0, 50, (2, 5)))).sum()
    loss.backward()
    opt.step()
    obj = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 50,
        "config": {"lr": 1e-3, "betas": (0.9, 0.99), "name": "tiny", "sizes": {16, 32}},
    }
    got = _read_and_check(_save(obj, tmp_path / "ckpt.pt"), state_key="model")
    assert got.step == 50
    assert not any("exp_avg" in name for name in got.tensors)


def test_nested_wrappers_and_nested_state(tmp_path) -> None:
    sd = TinyLM().state_dict()
    got = _read_and_check(_save({"model": {"module": sd}, "iteration": 9}, tmp_path / "a.pt"), "model.module")
    assert got.step == 9
    # nested dicts of tensors inside the state dict flatten with dots
    nested = {"encoder": {"w": torch.randn(2, 2), "deep": {"b": torch.randn(2)}}, "head": torch.randn(3)}
    got = _read_and_check(_save(nested, tmp_path / "b.pt"))
    assert set(got.tensors) == {"encoder.w", "encoder.deep.b", "head"}
    # no direct tensors, no wrapper key: the dict itself, training state beside it left out
    opt = torch.optim.SGD([nn.Parameter(torch.randn(2))], momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    got = read_torch(
        _save({"encoder": {"w": torch.ones(2)}, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    )
    assert set(got.tensors) == {"encoder.w"} and got.state_key is None


def test_lightning_checkpoint_with_hyper_parameters(tmp_path) -> None:
    torch.manual_seed(5)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters())
    obj = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"last_epoch": 3, "_step_count": 4}],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "args": argparse.Namespace(lr=1e-3, out=pathlib.PurePosixPath("/runs/x")),
            "config": RunConfig(),
            "frozen": FrozenConfig(),
            "array": np.arange(3.0),
            "scalar": np.float32(0.5),
        },
    }
    path = _save(obj, tmp_path / "epoch=3-step=1200.ckpt")
    got = read_torch(path)
    assert got.state_key == "state_dict" and got.step == 1200
    with torch.serialization.safe_globals(
        [argparse.Namespace, RunConfig, FrozenConfig, pathlib.PurePosixPath]
    ):
        loaded = torch.load(path, weights_only=False)
    _check(path, got, loaded["state_dict"])


def test_deepspeed_model_states(tmp_path) -> None:
    sd = TinyLM().state_dict()
    shapes = [collections.OrderedDict((k, v.shape) for k, v in sd.items())]
    ds = {
        "module": sd,
        "buffer_names": ["bn.running_mean"],
        "optimizer": None,
        "param_shapes": shapes,
        "lr_scheduler": None,
        "global_steps": 12,
        "global_samples": 96,
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 2}},
        "ds_version": "0.14.4",
    }
    got = _read_and_check(_save(ds, tmp_path / "mp_rank_00_model_states.pt"), state_key="module")
    assert got.step == 12
    # ZeRO-3: parameters are empty stand-ins, buffers (not partitioned) keep their values
    params = dict(TinyLM().named_parameters())
    zero3 = {**ds, "module": {k: torch.empty(0, dtype=v.dtype) if k in params else v for k, v in sd.items()}}
    zero3["param_shapes"] = [collections.OrderedDict((k, v.shape) for k, v in params.items())]
    zero3["ds_config"] = {"zero_optimization": {"stage": 3}}
    with pytest.raises(WdiffError, match="DeepSpeed ZeRO-3 partitions.*zero_to_fp32.py") as e:
        read_torch(_save(zero3, tmp_path / "z3.pt"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "make, problem",
    [
        (
            lambda p: torch.save({"a": torch.ones(2)}, p, _use_new_zipfile_serialization=False),
            "legacy (pre-1.6",
        ),
        (
            lambda p: torch.save(torch.optim.SGD([nn.Parameter(torch.ones(1))]).state_dict(), p),
            "optimizer state",
        ),
        (
            lambda p: torch.save({"lr": 0.1, "epoch": 2}, p),
            "holds no model weights; top-level keys: lr, epoch",
        ),
        (lambda p: torch.save([torch.ones(2)], p), "holds a list, not a state dict"),
        (lambda p: torch.save(nn.Linear(2, 2), p), "a whole pickled model"),
        (lambda p: torch.jit.save(torch.jit.script(nn.Linear(2, 2)), p), "TorchScript archive"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), "not a valid torch.save zip archive"),
        (lambda p: p.write_bytes(b"hello"), "not a torch.save file"),
    ],
)
def test_refusals_are_one_line(tmp_path, make, problem) -> None:
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(WdiffError) as e:
        read_torch(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    assert problem in str(e.value), str(e.value)


def test_legacy_sniffer_and_hint(tmp_path) -> None:
    for protocol in (2, 4):
        path = tmp_path / f"legacy{protocol}.pt"
        torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        assert looks_like_legacy_torch(path) and not looks_like_torch_zip(path)
        with pytest.raises(WdiffError, match=r"torch\.save\(torch\.load\('IN', weights_only=True\), 'OUT'\)"):
            read_torch(path)


def test_rezipped_archives(tmp_path) -> None:
    sd = {"w": torch.randn(4, 4), "b": torch.randn(4).bfloat16()}
    src = _save(sd, tmp_path / "src.pt")
    # Python's zipfile: no 64-byte alignment, data descriptors absent: still byte ranges
    _check(tmp_path / "plain.pt", read_torch(_rezip(src, tmp_path / "plain.pt")), sd)
    # a deflated data.pkl is inflated (bounded); deflated storages are not byte ranges: refused
    _check(tmp_path / "pkl.pt", read_torch(_rezip(src, tmp_path / "pkl.pt", deflate=("data.pkl",))), sd)
    with pytest.raises(WdiffError, match=r"storage src/data/0 is compressed or encrypted"):
        read_torch(_rezip(src, tmp_path / "all.pt", deflate=("*",)))
    with pytest.raises(WdiffError, match=r"saved on a big-endian machine .*\(torch\.load swaps the bytes\)"):
        read_torch(_rezip(src, tmp_path / "big.pt", replace={"byteorder": b"big"}))


def test_zip64_entries(tmp_path) -> None:
    sd = {"w": torch.randn(8, 8)}
    src = _save(sd, tmp_path / "src.pt")
    dst = tmp_path / "z64.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            with zout.open(zipfile.ZipInfo(info.filename), "w", force_zip64=True) as out:
                out.write(zin.read(info))
    assert b"\x01\x00\x10\x00" in dst.read_bytes()  # ZIP64 extra fields in the local headers
    _check(dst, read_torch(dst), sd)


def test_storage_checks(tmp_path) -> None:
    src = _save({"w": torch.randn(16)}, tmp_path / "src.pt")
    with zipfile.ZipFile(src) as z:
        data = z.read("src/data.pkl")
    # the storage claims more elements than its record holds
    bigger = data.replace(b"K\x10t", b"K\x20t", 1)
    with pytest.raises(
        WdiffError, match=r"storage src/data/0 holds 64 bytes, but data\.pkl gives it 32 float32"
    ):
        read_torch(_rezip(src, tmp_path / "a.pt", replace={"data.pkl": bigger}))
    # the tensor reaches past its storage
    longer = data.replace(b"K\x10\x85", b"K\x11\x85", 1)
    with pytest.raises(WdiffError, match=r"tensor 'w' .* reaches past the 64 bytes of its storage data/0"):
        read_torch(_rezip(src, tmp_path / "b.pt", replace={"data.pkl": longer}))
    # a storage named in data.pkl that is not in the archive
    with pytest.raises(WdiffError, match=r"storage src/data/7 named in data\.pkl is missing"):
        read_torch(
            _rezip(
                src,
                tmp_path / "c.pt",
                replace={"data.pkl": data.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x007")},
            )
        )


def test_sizes_past_int64_are_errors(tmp_path) -> None:
    src = _save({"w": torch.randn(16)}, tmp_path / "src.pt")
    with zipfile.ZipFile(src) as z:
        data = z.read("src/data.pkl")
    huge = data.replace(b"K\x10\x85", b"\x8a\x09" + (1 << 64).to_bytes(9, "little") + b"\x85", 1)
    with pytest.raises(
        WdiffError, match=r"tensor 'w': shape \[18446744073709551616\] is not a list of sizes"
    ):
        read_torch(_rezip(src, tmp_path / "a.pt", replace={"data.pkl": huge}))
    digits = b"\x8b" + (3000).to_bytes(4, "little") + b"\x01" * 3000  # an int of ~7000 digits
    with pytest.raises(WdiffError, match=r"tensor 'w': shape \[a int\] is not a list of sizes"):
        read_torch(
            _rezip(
                src, tmp_path / "b.pt", replace={"data.pkl": data.replace(b"K\x10\x85", digits + b"\x85", 1)}
            )
        )


def test_safety_inside_a_torch_zip(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = _save({"w": torch.ones(2)}, tmp_path / "src.pt")
    for i, (func, args, shown) in enumerate(EVIL[:-1]):
        for protocol in (2, 4):
            evil = pickle.dumps({"w": _Evil(func, *args)}, protocol=protocol)
            path = _rezip(src, tmp_path / f"evil{i}_{protocol}.pt", replace={"data.pkl": evil})
            with pytest.raises(WdiffError, match=rf"^{path}: refuses to unpickle {shown}: not a tensor") as e:
                read_torch(path)
            assert "\n" not in str(e.value)
    ext = b"\x80\x02\x82\xf0U\x0ctouch CANARY\x85R."
    with pytest.raises(WdiffError, match="copyreg extension code"):
        read_torch(_rezip(src, tmp_path / "ext.pt", replace={"data.pkl": ext}))
    assert not (tmp_path / "CANARY").exists()


def test_wdiff_never_imports_torch() -> None:
    code = (
        "import sys, wdiff.readers.torch, wdiff.readers.pickle; "
        "assert 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_dtype_tables_match_torch_and_wdiff() -> None:
    for name, (code, itemsize) in TORCH_DTYPES.items():
        dtype = getattr(torch, name)
        assert dtype.itemsize == itemsize, name
        if code is not None:
            assert DTYPES[code].bits == 8 * itemsize
            assert np.dtype(DTYPES[code].storage).itemsize == itemsize


# ---- fuzzing ----------------------------------------------------------------------------------------------

QUICK = 200
LONG = 10_000
CASE_SECONDS = 5.0  # a case takes milliseconds; a hang trips this
MEMORY_FACTOR = 512  # bytes of Python objects a pickle byte can make, at most (an empty set is 216)
MEMORY_SLACK = 16 << 20


class _Hang(Exception):
    pass


def _bounded(run: Callable[[], object], size: int) -> None:
    """Run one case: a result or a one-line WdiffError, within CASE_SECONDS and the memory bound."""

    def alarm(signum: int, frame: object) -> None:
        raise _Hang(f"case took over {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        run()
        TALLY["accepted"] += 1
    except WdiffError as e:
        assert "\n" not in str(e)
        TALLY["refused"] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    peak = tracemalloc.get_traced_memory()[1] - before
    TALLY["peak"] = max(TALLY["peak"], peak)
    assert peak <= MEMORY_FACTOR * size + MEMORY_SLACK, f"{peak} bytes for {size} input bytes"


TALLY: collections.Counter[str] = collections.Counter()  # outcomes of the current fuzz run, printed


@pytest.fixture(scope="module")
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _seed_files() -> list[bytes]:
    torch.manual_seed(6)
    with tempfile.TemporaryDirectory() as tmp:
        big = torch.randn(4, 80)
        fp8 = torch.ones(3).to(torch.float8_e4m3fn)
        files = [
            ({"w": torch.randn(3, 4), "b": torch.randn(4).bfloat16(), "f8": fp8}, 2),
            (
                {
                    "cols": big[:, :64],
                    "t": big.t(),
                    "v": big[1:3],
                    "i": torch.arange(3),
                    "s": torch.tensor(2.0),
                },
                2,
            ),
            ({"model": {"w": nn.Parameter(torch.randn(2, 2))}, "step": 5, "hp": argparse.Namespace(a=1)}, 2),
            (
                {
                    "state_dict": {"x": torch.randn(5).half()},
                    "global_step": 3,
                    "optimizer_states": [{"m": fp8}],
                },
                4,
            ),
        ]
        out = []
        for i, (obj, protocol) in enumerate(files):
            path = Path(tmp) / f"s{i}.pt"
            torch.save(obj, path, pickle_protocol=protocol)
            out.append(path.read_bytes())
        return out


SEEDS = _seed_files()
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, 1 << 31, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 7))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == 0 and data:  # flip a bit
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1:  # overwrite with random bytes
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        elif kind == 2:  # insert
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == 3:  # delete a range
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == 4:  # truncate
            del data[at:]
        elif kind == 5:  # an extreme integer of 1, 2, 4 or 8 bytes
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
            data[at : at + width] = value.to_bytes(width, "little")
        elif kind == 6:  # splice a piece of another seed
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other) - 1))
            data[at:] = other[start : start + draw(st.integers(1, 512))] + data[at:]
        else:  # duplicate a chunk in place
            data[at:at] = data[at : at + draw(st.integers(1, 128))]
    return bytes(data)


def _zip_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every size/offset/count field in a zip's local headers, central directory
    and end records: where structural mutations go."""
    fields: list[tuple[int, int]] = []
    i = data.find(b"PK")
    while i >= 0:
        sig = data[i : i + 4]
        if sig == b"PK\x03\x04":  # local: method, sizes, name/extra lengths
            fields += [(i + 8, 2), (i + 6, 2), (i + 18, 4), (i + 22, 4), (i + 26, 2), (i + 28, 2)]
        elif sig == b"PK\x01\x02":  # central: method, sizes, lengths, local header offset
            fields += [
                (i + 10, 2),
                (i + 8, 2),
                (i + 20, 4),
                (i + 24, 4),
                (i + 28, 2),
                (i + 30, 2),
                (i + 42, 4),
            ]
        elif sig == b"PK\x05\x06":  # end of central directory: counts, size, offset
            fields += [(i + 8, 2), (i + 10, 2), (i + 12, 4), (i + 16, 4), (i + 20, 2)]
        elif sig == b"PK\x06\x06":  # ZIP64 end record
            fields += [(i + 24, 8), (i + 32, 8), (i + 40, 8), (i + 48, 8)]
        elif sig == b"PK\x06\x07":  # ZIP64 locator
            fields += [(i + 8, 8), (i + 16, 4)]
        i = data.find(b"PK", i + 2)
    return [(o, w) for o, w in fields if o + w <= len(data)]


def _zip64_seed(seed: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            with zout.open(zipfile.ZipInfo(info.filename), "w", force_zip64=True) as f:
                f.write(zin.read(info))
    return out.getvalue()


ZIP_SEEDS = SEEDS + [_zip64_seed(SEEDS[0])]


@st.composite
def _zip_mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(ZIP_SEEDS)))
    fields = _zip_fields(bytes(data))
    for _ in range(draw(st.integers(1, 3))):
        offset, width = draw(st.sampled_from(fields))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            value = draw(st.sampled_from(INTERESTING + [8, 12, 14, 99]))  # 8: deflate, 12: bzip2, 14: lzma
        elif choice == 1:
            value = len(data) + draw(st.integers(-64, 64))  # around EOF
        elif choice == 2:
            value = int.from_bytes(data[offset : offset + width], "little") + draw(st.integers(-70, 70))
        else:
            value = draw(st.integers(0, (1 << (8 * width)) - 1))
        data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(data)


_OPCODES = [bytes([b]) for b in b"(.012FILNPRSVabcd}eghil]opst)uGJKMQTUXhjqr"] + [
    bytes([b]) for b in range(0x80, 0x99)
]
_GLOBALS = [
    b"collections\nOrderedDict\n", b"os\nsystem\n", b"builtins\nset\n", b"argparse\nNamespace\n",
    b"torch._utils\n_rebuild_tensor_v2\n", b"torch\nFloatStorage\n", b"__builtin__\nset\n",
]  # fmt: skip


@st.composite
def _opcode_stream(draw: st.DrawFn) -> bytes:
    parts = [b"\x80" + bytes([draw(st.integers(0, 6))])]
    for _ in range(draw(st.integers(0, 60))):
        op = draw(st.sampled_from(_OPCODES))
        parts.append(op)
        if op in (b"c", b"i"):
            parts.append(draw(st.sampled_from(_GLOBALS)))
        elif op in b"FILSVgpP":
            parts.append(
                draw(st.sampled_from([b"0", b"1", b"-3", b"'x'", b"2.5", b"99999999999999999999"])) + b"\n"
            )
        else:
            parts.append(draw(st.binary(max_size=9)))
    parts.append(b".")
    return b"".join(parts)


_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20) | st.complex_numbers(allow_nan=False)
)  # fmt: skip
_SMALL_INTS = st.integers(-(2**60), 2**60)  # dict keys: ints past 61 bits are refused (hash flooding)
_KEYS = st.text(max_size=10) | _SMALL_INTS | st.binary(max_size=5)
_VALUES = st.recursive(
    _SCALARS | st.frozensets(_KEYS, max_size=4) | st.sets(_KEYS, max_size=4),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(_KEYS, inner, max_size=5)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3).map(collections.OrderedDict)
        | st.tuples(st.lists(_SMALL_INTS, max_size=3).map(tuple), inner).map(lambda kv: {kv[0]: kv[1]})
    ),
    max_leaves=25,
)


def _fuzz_plain_objects(n: int) -> None:
    """Plain values round-trip exactly through every protocol; a few byte edits only ever give a value
    or a one-line WdiffError."""
    allowed = _opcode_allowed()

    @_fuzz_settings(n)
    @given(_VALUES, st.integers(0, 5), st.data())
    def case(value: object, protocol: int, drawn: st.DataObject) -> None:
        data = pickle.dumps(value, protocol=protocol)
        if drawn.draw(st.booleans()):
            assert restricted_load(data, "f.pkl", allowed) == value
            TALLY["round trips"] += 1
            return
        data = drawn.draw(_mutated([data]))
        _bounded(lambda: restricted_load(data, "f.pkl", allowed), len(data))

    case()


def _opcode_allowed() -> object:
    return with_placeholders(plain_containers("f.pkl"), ["argparse", "torch"], RUNS_CODE)


def _write_and_read(folder: Path, data: bytes) -> None:
    path = folder / "case.pt"
    path.write_bytes(data)
    result = read_torch(path)
    assert isinstance(result, TorchContents)
    for ref in result.tensors.values():  # whatever it accepts lies inside the file
        assert 0 <= ref.offset and ref.offset + ref.nbytes <= len(data) or isinstance(ref, PiecesRef)
        for piece in getattr(ref, "pieces", ()):
            assert piece.offset + piece.count * ref.kind.bits // 8 <= len(data)


def _pickle_case(seed_index: int, data: bytes) -> None:
    folder, entries, _ = _PARSED[seed_index]
    _load(data, "case.pt", folder, entries)


_PARSED: list[tuple[str, dict, bytes]] = []


def _parsed_seeds(tmp: Path) -> list[tuple[str, dict, bytes]]:
    if not _PARSED:
        for i, seed in enumerate(SEEDS):
            path = tmp / f"seed{i}.pt"
            path.write_bytes(seed)
            _PARSED.append(_open(str(path)))
    return _PARSED


def _fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


def _fuzz_zip_bytes(n: int, folder: Path) -> None:
    @_fuzz_settings(n)
    @given(_mutated(SEEDS))
    def case(data: bytes) -> None:
        _bounded(lambda: _write_and_read(folder, data), len(data))

    case()


def _fuzz_zip_structure(n: int, folder: Path) -> None:
    @_fuzz_settings(n)
    @given(_zip_mutated())
    def case(data: bytes) -> None:
        _bounded(lambda: _write_and_read(folder, data), len(data))

    case()


def _fuzz_data_pkl(n: int, folder: Path) -> None:
    parsed = _parsed_seeds(folder)
    pickles = [p[2] for p in parsed]

    @_fuzz_settings(n)
    @given(st.integers(0, len(parsed) - 1), st.data())
    def case(index: int, drawn: st.DataObject) -> None:
        data = drawn.draw(_mutated(pickles))
        _bounded(lambda: _pickle_case(index, data), len(data))

    case()


def _fuzz_opcodes(n: int) -> None:
    allowed = _opcode_allowed()

    @_fuzz_settings(n)
    @given(_opcode_stream())
    def case(data: bytes) -> None:
        _bounded(
            lambda: restricted_load(data, "f.pkl", allowed, persistent_load=lambda pid: ("stored", pid)),
            len(data),
        )

    case()


FUZZ = {
    "zip_bytes": lambda n, tmp: _fuzz_zip_bytes(n, tmp),
    "zip_structure": lambda n, tmp: _fuzz_zip_structure(n, tmp),
    "data_pkl": lambda n, tmp: _fuzz_data_pkl(n, tmp),
    "opcodes": lambda n, tmp: _fuzz_opcodes(n),
    "plain_objects": lambda n, tmp: _fuzz_plain_objects(n),
}


def test_seeds_are_valid(tmp_path) -> None:
    for i, seed in enumerate(ZIP_SEEDS):
        path = tmp_path / f"s{i}.pt"
        path.write_bytes(seed)
        assert read_torch(path).tensors


@pytest.mark.parametrize("target", FUZZ)
def test_fuzz_quick(target, tmp_path, traced) -> None:
    TALLY.clear()
    FUZZ[target](QUICK, tmp_path)
    print(f"{target}: {dict(TALLY)}")


@pytest.mark.slow
@pytest.mark.parametrize("target", FUZZ)
def test_fuzz_long(target, tmp_path, traced) -> None:
    TALLY.clear()
    FUZZ[target](LONG, tmp_path)
    print(f"{target}: {dict(TALLY)}")


def test_bounded_catches_a_hang_and_a_blowup() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(AssertionError, match="input bytes"):
            _bounded(lambda: bytearray(MEMORY_SLACK * 2), 10)
    finally:
        tracemalloc.stop()
    with pytest.raises(_Hang):
        original = globals()["CASE_SECONDS"]
        globals()["CASE_SECONDS"] = 0.05
        try:
            _bounded(lambda: [None for _ in iter(int, 1)], 10)
        finally:
            globals()["CASE_SECONDS"] = original
