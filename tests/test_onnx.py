"""ONNX checkpoints: initializers located by offset (raw_data, typed fields, external data), the
external-data checks against crafted attacks, name matching across exports, and real exports."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from kinds import check_against_reference, onnx_model

import wdiff
from wdiff.checkpoints import scan
from wdiff.errors import WdiffError
from wdiff.readers.onnx import _without_raw_data, read_onnx

SAMPLES = Path(__file__).parent.parent / "sample_checkpoints" / "digits-mlp-onnx"
NP = {
    "F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz, "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WDIFF_CACHE", str(tmp_path / "cache"))


def _read(ref) -> np.ndarray:
    """Decode a TensorRef's bytes by offset: what the kernels see."""
    raw = np.fromfile(ref.path, dtype=ref.kind.storage, count=ref.numel, offset=ref.offset)
    return raw.view(ref.kind.decoded).reshape(ref.shape)


def _walk(code: str, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = {"layer.weight": rng.standard_normal((7, 5)), "layer.bias": rng.standard_normal(5)}
    out = []
    for _ in range(count):
        out.append({k: v.astype(NP[code]) for k, v in w.items()})
        w = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in w.items()}
    return out


@pytest.mark.parametrize("typed", [False, True], ids=["raw_data", "typed"])
@pytest.mark.parametrize("code", list(NP))
def test_initializers_read_by_offset_equal_onnx_numpy_helper(tmp_path, code, typed):
    import onnx
    from onnx import numpy_helper

    weights = {k: (v, code) for k, v in _walk(code, 1)[0].items()}
    path = onnx_model(tmp_path / "m.onnx", weights, typed=typed)
    refs = read_onnx(path)
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        expected = numpy_helper.to_array(tensor)
        ref = refs[tensor.name]
        assert ref.dtype == code and ref.shape == expected.shape
        assert (ref.path == str(path)) is not typed  # raw_data is read in place, typed fields decoded
        np.testing.assert_array_equal(_read(ref).view(np.uint8), expected.view(np.uint8))


def test_raw_data_offsets_point_at_the_bytes_in_the_file(tmp_path):
    """The wire-format walk finds each raw_data field where its bytes really are."""
    import onnx

    weights = {f"w{i}": (np.arange(i + 1, dtype=np.float32) * (i + 1), "F32") for i in range(5)}
    path = onnx_model(tmp_path / "m.onnx", weights)
    blob = path.read_bytes()
    model = onnx.load(str(path))
    _, ranges = _without_raw_data(str(path))
    assert len(ranges) == 5
    for tensor, (offset, length) in zip(model.graph.initializer, ranges):
        assert blob[offset : offset + length] == tensor.raw_data
    # the copy onnx parses is the same model without the weight bytes
    stripped = onnx.load_model_from_string(_without_raw_data(str(path))[0])
    for tensor in model.graph.initializer:
        tensor.ClearField("raw_data")
    assert stripped.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


@pytest.mark.parametrize("storage", ["raw_data", "typed", "external"])
@pytest.mark.parametrize("code", ["F32", "BF16", "F8_E4M3"])
def test_run_on_an_onnx_sequence_matches_the_reference(tmp_path, code, storage):
    seq = _walk(code, 4, seed=3)
    for step, w in zip([10, 20, 30, 40], seq):
        onnx_model(
            tmp_path / "run" / f"step_{step}" / "model.onnx", {k: (v, code) for k, v in w.items()},
            typed=storage == "typed", external="model.onnx.data" if storage == "external" else None,
        )  # fmt: skip
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, chunk_elements=6)
    assert res.summary["matching"]["exact"] == 2
    for name in ("layer.weight", "layer.bias"):
        check_against_reference(res.summary["tensors"][name], res.accumulated(name), [w[name] for w in seq])


def test_external_data_beyond_2gb_is_read_by_offset(tmp_path):
    """Models above protobuf's 2 GB limit keep their weights in external data at large offsets: a
    sparse data file puts the tensor past 3 GiB (nothing is loaded whole)."""
    import onnx

    seq = _walk("F32", 3, seed=5)
    big = 3 << 30
    for step, w in enumerate(seq):
        folder = tmp_path / "run" / f"step_{step}"
        path = onnx_model(folder / "model.onnx", {k: (v, "F32") for k, v in w.items()}, external="w.bin")
        model = onnx.load(str(path), load_external_data=False)
        data = (folder / "w.bin").read_bytes()
        with open(folder / "w.bin", "r+b") as f:  # move every tensor up by 3 GiB
            f.truncate(0)
            f.seek(big)
            f.write(data)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "offset":
                    entry.value = str(int(entry.value) + big)
            if not any(e.key == "offset" for e in tensor.external_data):
                tensor.external_data.add(key="offset", value=str(big))
        onnx.save_model(model, str(path))
    refs = read_onnx(tmp_path / "run" / "step_0" / "model.onnx")
    assert all(r.offset >= big for r in refs.values())
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False)
    for name in ("layer.weight", "layer.bias"):
        check_against_reference(res.summary["tensors"][name], res.accumulated(name), [w[name] for w in seq])


# --- external data attacks: each refused with one line naming the model -------------------------------


def _set_external(path: Path, **changes: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    info = {e.key: e.value for e in tensor.external_data}
    info.update(changes)
    del tensor.external_data[:]
    for key, value in info.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save_model(model, str(path))


def _attack(tmp_path: Path, case: str) -> Path:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = onnx_model(tmp_path / "m" / "model.onnx", {"w": (w, "F32")}, external="w.bin")
    data = tmp_path / "m" / "w.bin"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(12, dtype=np.float32).tobytes())
    if case == "absolute":
        _set_external(path, location=str(secret))
    elif case == "dotdot":
        _set_external(path, location="../secret.bin")
    elif case == "dotdot-inside":
        (tmp_path / "m" / "sub").mkdir()
        _set_external(path, location="sub/../../secret.bin")
    elif case == "symlink":
        data.unlink()
        data.symlink_to(secret)
    elif case == "symlinked-folder":
        (tmp_path / "m" / "d").symlink_to(tmp_path)
        _set_external(path, location="d/secret.bin")
    elif case == "hardlink":
        data.unlink()
        os.link(secret, data)
    elif case == "offset-past-end":
        _set_external(path, offset="4096", length="48")
    elif case == "length-past-end":
        _set_external(path, offset="8", length="48")
    elif case == "wrong-length":
        _set_external(path, offset="0", length="40")
    elif case == "missing":
        data.unlink()
    elif case == "folder":
        data.unlink()
        data.mkdir()
    return path


ATTACKS = {
    "absolute": "absolute path",
    "dotdot": "leaves the model's folder",
    "dotdot-inside": "leaves the model's folder",
    "symlink": "symlink",
    "symlinked-folder": "symlink",
    "hardlink": "hard link",
    "offset-past-end": "runs past the end",
    "length-past-end": "runs past the end",
    "wrong-length": "needs 48 bytes",
    "missing": "cannot open",
    "folder": "not a regular file",
}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_external_data_attacks_are_refused(tmp_path, case):
    path = _attack(tmp_path, case)
    with pytest.raises(WdiffError) as err:
        read_onnx(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and ATTACKS[case] in message


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "offset-past-end"])
def test_the_onnx_library_refuses_the_same_attacks(tmp_path, case):
    """The rules wdiff applies are the library's own (onnx 1.23): it refuses these too."""
    import onnx

    path = _attack(tmp_path, case)
    with pytest.raises(Exception):  # noqa: B017 - onnx raises ValueError or its C++ checker errors
        onnx.load(str(path))


@pytest.mark.parametrize("location", [None, "./w.bin", "sub/../w.bin"])
def test_harmless_locations_are_accepted_like_onnx_accepts_them(tmp_path, location):
    import onnx

    path = _attack(tmp_path, "none")
    if location:
        (path.parent / "sub").mkdir()
        _set_external(path, location=location)
    expected = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_read(read_onnx(path)["w"]), expected)
    onnx.load(str(path))  # the library accepts it too


BROKEN = [b"", b"\x08\x07\x12\xff\xff", b"\x08\x07\x3a\x05\x2a\x03abc", b"garbage" * 9]


@pytest.mark.parametrize("blob", BROKEN)
def test_broken_models_are_refused_with_one_line(tmp_path, blob):
    path = tmp_path / "bad.onnx"
    path.write_bytes(blob)
    with pytest.raises(WdiffError, match="bad.onnx"):
        read_onnx(path)


# --- matching made-up names across exports -------------------------------------------------------------


def test_made_up_names_are_matched_by_position_not_number(tmp_path):
    """Two transposed copies of the same shape, consumed by MatMul at different places in the graph;
    the later export numbers them the other way round and lists them in another order."""
    rng = np.random.default_rng(1)
    first, second = rng.standard_normal((3, 8, 4)), rng.standard_normal((3, 8, 4))
    bias = rng.standard_normal((3, 4))
    numbers = [(14, 15), (15, 14), (31, 7)]  # the number of the first MatMul's weight, then the second's
    for t in range(3):
        a, b = numbers[t]
        weights = {
            f"onnx::MatMul_{b}": (second[t].astype(np.float32), "F32"),
            "fc.bias": (bias[t].astype(np.float32), "F32"),
            f"onnx::MatMul_{a}": (first[t].astype(np.float32), "F32"),
        }
        consumers = {f"onnx::MatMul_{a}": ("MatMul", 1), f"onnx::MatMul_{b}": ("MatMul", 1)}
        consumers["fc.bias"] = ("Add", 1)
        order = [f"onnx::MatMul_{a}", "fc.bias", f"onnx::MatMul_{b}"]  # topological order of the consumers
        onnx_model(tmp_path / f"export_{t}.onnx", weights, consumers, order)
    paths = [tmp_path / f"export_{t}.onnx" for t in range(3)]
    res = wdiff.run(paths, tmp_path / "out", render=False)
    matching = res.summary["matching"]
    assert matching["exact"] == 1 and matching["by_position"] == 2 and matching["unmatched"] == []
    pairs = {p["name"]: p["names"] for p in matching["pairs"]}
    assert pairs == {"onnx::MatMul_14": ["onnx::MatMul_14", "onnx::MatMul_15", "onnx::MatMul_31"],
                     "onnx::MatMul_15": ["onnx::MatMul_15", "onnx::MatMul_14", "onnx::MatMul_7"]}  # fmt: skip
    tensors = res.summary["tensors"]
    check_against_reference(tensors["onnx::MatMul_14"], res.accumulated("onnx::MatMul_14"), list(first))
    check_against_reference(tensors["onnx::MatMul_15"], res.accumulated("onnx::MatMul_15"), list(second))
    check_against_reference(tensors["fc.bias"], res.accumulated("fc.bias"), list(bias))


def test_ambiguous_positions_are_reported_not_guessed(tmp_path):
    w = np.ones((2, 2), np.float32)
    onnx_model(tmp_path / "a_1.onnx", {"keep": (w, "F32"), "val_1": (w, "F32")}, {"val_1": ("MatMul", 1)})
    onnx_model(
        tmp_path / "a_2.onnx", {"keep": (w, "F32"), "val_1": (w, "F32"), "val_2": (w, "F32")},
        {"val_1": ("MatMul", 1), "val_2": ("MatMul", 1)},
    )  # fmt: skip
    run = scan([tmp_path / "a_1.onnx", tmp_path / "a_2.onnx"])
    assert [t.name for t in run.tensors] == ["keep"]
    assert run.matching["unmatched"][0]["count"] == 2 and run.matching["unmatched"][0]["count_in_first"] == 1
    assert any(s.name == "val_1" for s in run.skipped)


def test_shared_external_range_is_reported_once_with_its_aliases(tmp_path):
    """Two initializer names pointing at the same external bytes (a tied weight) are one tensor."""
    import onnx

    seq = _walk("F32", 3, seed=9)
    for t, w in enumerate(seq):
        path = onnx_model(
            tmp_path / f"s_{t}" / "model.onnx",
            {"embed.weight": (w["layer.weight"], "F32"), "head.weight": (w["layer.weight"], "F32")},
            external="w.bin",
        )
        model = onnx.load(str(path), load_external_data=False)
        first = {e.key: e.value for e in model.graph.initializer[0].external_data}
        second = model.graph.initializer[1]
        del second.external_data[:]
        for key, value in first.items():
            second.external_data.add(key=key, value=value)
        onnx.save_model(model, str(path))
    res = wdiff.run(tmp_path, tmp_path / "out", render=False)
    assert res.names == ["embed.weight"]
    assert res.summary["tensors"]["embed.weight"]["aliases"] == ["head.weight"]
    entry, acc = res.summary["tensors"]["embed.weight"], res.accumulated("embed.weight")
    check_against_reference(entry, acc, [w["layer.weight"] for w in seq])


# --- real exports from a training run (both PyTorch exporters) ----------------------------------------


MADE_UP = {"torchscript": ("onnx::MatMul_24", "onnx::MatMul_25"), "dynamo": ("val_0", "val_4")}
NAMED = {
    "row.bias",
    "norm.weight",
    "norm.bias",
    "mix.bias",
    "norm2.weight",
    "norm2.bias",
    "head.weight",
    "head.bias",
}


@pytest.mark.parametrize("exporter", list(MADE_UP))
def test_real_exports_match_the_reference(tmp_path, exporter):
    """Exports taken during training, step 0 included. At step 0 the two LayerNorms are equal
    (PyTorch initialises weight 1, bias 0) and both exporters stored them once: TorchScript as
    Identity copies, dynamo by letting both nodes read ``norm.*``."""
    import onnx
    from onnx import numpy_helper

    folder = SAMPLES / exporter
    res = wdiff.run(folder, tmp_path / "out", render=False, chunk_elements=100)
    steps = sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.onnx"))
    assert [c["step"] for c in res.summary["checkpoints"]] == steps == [0, 50, 100, 150, 200, 250, 300]
    arrays = []
    for step in steps:
        model = onnx.load(str(folder / f"step_{step}.onnx"))
        arrays.append({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    assert "norm2.weight" not in arrays[0] and "norm2.weight" in arrays[1]
    arrays[0]["norm2.weight"], arrays[0]["norm2.bias"] = np.ones(16, np.float32), np.zeros(16, np.float32)
    assert set(res.names) == NAMED | set(MADE_UP[exporter]) and res.summary["skipped"] == (
        []
        if exporter == "torchscript"
        else [{"name": "val_11", "reason": "dtype I64 is not a float: not computed"}]
    )
    matching = res.summary["matching"]
    for made_up in MADE_UP[exporter]:
        pair = {"name": made_up, "names": [made_up] * 7, "consumer": "MatMul input 1"}
        assert pair in matching["pairs"]
    if exporter == "dynamo":
        assert matching["exact"] == 6 and matching["by_sharing"] == 2
        assert {"name": "norm2.weight", "checkpoint": 0, "shares": "norm.weight"} in matching["shared"]
    else:  # the Identity copies carry the names
        assert matching["exact"] == 8 and matching["by_sharing"] == 0
    for name in res.names:
        entry = res.summary["tensors"][name]
        check_against_reference(entry, res.accumulated(name), [a[name] for a in arrays])


def test_both_exporters_give_the_same_change(tmp_path):
    """The same training run exported twice: each transposed Linear weight is one tensor under two
    made-up names, and every weight's accumulated change is the same."""
    ts = wdiff.run(SAMPLES / "torchscript", tmp_path / "ts", render=False)
    dy = wdiff.run(SAMPLES / "dynamo", tmp_path / "dy", render=False)
    for a, b in zip(MADE_UP["torchscript"], MADE_UP["dynamo"]):
        np.testing.assert_array_equal(ts.accumulated(a), dy.accumulated(b))
    for name in NAMED:
        np.testing.assert_array_equal(ts.accumulated(name), dy.accumulated(name))


def test_deduplicated_initializers_are_filled_in(tmp_path):
    """Hand-built: export 0 stores two equal LayerNorm weights once, as the TorchScript exporter
    does (``b = Identity(a)``) or as dynamo does (both nodes read ``a``); later exports store both."""
    import onnx
    from onnx import helper

    rng = np.random.default_rng(2)
    values = [{"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}]
    values += [{k: rng.standard_normal(4).astype(np.float32) for k in "ab"} for _ in range(2)]
    for style in ("identity", "shared"):
        (tmp_path / style).mkdir()
        for t, v in enumerate(values):
            names = ["a", "b"] if t else ["a"]
            inits = [helper.make_tensor(n, 1, [4], v[n].tobytes(), raw=True) for n in names]
            nodes = []
            second = "b"
            if t == 0 and style == "identity":
                nodes.append(helper.make_node("Identity", ["a"], ["b"]))
            elif t == 0:
                second = "a"
            nodes += [
                helper.make_node("LayerNormalization", ["x", "a"], ["y"]),
                helper.make_node("LayerNormalization", ["y", second], ["z"]),
            ]
            io = [helper.make_tensor_value_info(n, 1, [4]) for n in ("x", "z")]
            graph = helper.make_graph(nodes, "g", io[:1], io[1:], initializer=inits)
            onnx.save_model(helper.make_model(graph), str(tmp_path / style / f"step_{t}.onnx"))
        res = wdiff.run(tmp_path / style, tmp_path / f"out-{style}", render=False)
        assert res.names == ["a", "b"] and res.summary["matching"]["by_sharing"] == (style == "shared")
        for name in "ab":
            entry = res.summary["tensors"][name]
            check_against_reference(entry, res.accumulated(name), [v[name] for v in values])


# --- fuzzing the reader: any bytes give tensors inside their files or one WdiffError -------------------


def _fuzz_once(tmp_path: Path, base: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    blob = bytearray(base)
    for pos, value in edits:
        blob[pos % len(blob)] = value
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(bytes(blob[: max(0, len(blob) - cut)]))
    try:
        refs = read_onnx(path)
    except WdiffError as e:
        assert "\n" not in str(e)
        return
    for ref in refs.values():
        assert ref.offset >= 0 and ref.offset + ref.nbytes <= os.path.getsize(ref.path)
        assert ref.nbytes == ref.numel * ref.kind.bits // 8


def _fuzz_base(folder: Path, external: bool) -> bytes:
    """A small model; with ``external``, its data in ``w.bin`` beside the fuzzed file (the mutations
    then hit locations, offsets and lengths)."""
    rng = np.random.default_rng(0)
    weights = {"a": (rng.standard_normal((3, 4)).astype(np.float32), "F32")}
    weights["b"] = (rng.standard_normal(5).astype(ml_dtypes.bfloat16), "BF16")
    path = onnx_model(
        folder / "base.onnx", weights, {"a": ("MatMul", 1)}, external="w.bin" if external else None
    )
    return path.read_bytes()


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("slow", [pytest.param(True, marks=pytest.mark.slow), False])
def test_mutated_models_never_escape_as_other_errors(tmp_path, slow, external):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = _fuzz_base(tmp_path, external)
    edit = st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255))

    @settings(max_examples=2000 if slow else 150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(edit, max_size=6), st.integers(0, 40))
    def run(edits, cut):
        _fuzz_once(tmp_path, base, edits, cut)

    run()


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("WDIFF_CACHE", str(blocked / "cache"))
    path = onnx_model(tmp_path / "m.onnx", {"w": (np.ones(3, np.float16), "F16")}, typed=True)
    with pytest.raises(WdiffError, match="cannot write the decoded initializer 'w'.*WDIFF_CACHE"):
        read_onnx(path)


def test_equal_typed_initializers_are_not_taken_for_tied_weights(tmp_path):
    """Two LayerNorm weights that stay all ones, stored in typed fields, are two tensors."""
    for t in range(2):
        ones = np.ones(4, np.float32)
        onnx_model(
            tmp_path / f"s_{t}.onnx", {"a.weight": (ones, "F32"), "b.weight": (ones, "F32")}, typed=True
        )
    run = scan(tmp_path)
    assert run.aliases == {} and [t.name for t in run.tensors] == ["a.weight", "b.weight"]


def test_cache_files_are_checked_before_reuse(tmp_path, monkeypatch):
    """A damaged cache file is rewritten, not trusted; a cache folder that is a symlink is refused."""
    path = onnx_model(tmp_path / "m.onnx", {"w": (np.arange(3, dtype=np.float16), "F16")}, typed=True)
    ref = read_onnx(path)["w"]
    Path(ref.path).write_bytes(b"\0" * 6)
    again = read_onnx(path)["w"]
    assert again.path == ref.path
    np.testing.assert_array_equal(_read(again), np.arange(3, dtype=np.float16))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "cache")
    monkeypatch.setenv("WDIFF_CACHE", str(link))
    with pytest.raises(WdiffError, match="not a folder of this user"):
        read_onnx(path)
