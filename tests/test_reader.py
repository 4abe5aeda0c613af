"""The safetensors reader against the safetensors library and ml_dtypes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import DTYPES, MALFORMED, safetensors_bytes, save, save_sharded
from safetensors import safe_open

from wdiff import kernels
from wdiff.errors import WdiffError
from wdiff.readers import read_checkpoint
from wdiff.readers.safetensors import read_header

FLOAT_CODES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]


def _decode(ref) -> np.ndarray:
    """Decode a tensor the way compute does: raw bytes by offset through the kernels' decoder."""
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        raw = np.frombuffer(f.read(ref.nbytes), np.uint8)
    out = np.empty(ref.numel, np.float32)
    kernels.decode_into(raw.view(kernels.raw_view(ref.dtype)), kernels.decode_table(ref.dtype), out)
    return out.reshape(ref.shape)


@pytest.mark.parametrize("code", FLOAT_CODES)
def test_every_float_dtype_decodes_like_ml_dtypes(tmp_path, code):
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((7, 13)) * 3).astype(DTYPES[code][0])
    special = np.array([0.0, -0.0, 1.0, -2.5, 448.0 if "E4M3" in code else 1e4], np.float32)
    path = save(tmp_path / "m.safetensors", {"w": values, "s": special.astype(DTYPES[code][0])})
    refs = read_checkpoint(path)
    assert refs["w"].dtype == code and refs["w"].shape == (7, 13)
    np.testing.assert_array_equal(_decode(refs["w"]), values.astype(np.float32))
    np.testing.assert_array_equal(_decode(refs["s"]), special.astype(DTYPES[code][0]).astype(np.float32))


@pytest.mark.parametrize("code", ["F64", "F32", "F16", "I64", "I32", "U8", "BOOL"])
def test_offsets_match_the_library(tmp_path, code):
    rng = np.random.default_rng(4)
    tensors = {
        "b": (rng.standard_normal((3, 5)) * 9).astype(DTYPES[code][0]),
        "a": (rng.standard_normal(11) * 9).astype(DTYPES[code][0]),
        "scalar": np.array(7, DTYPES[code][0]),
        "empty": np.zeros((0, 3), DTYPES[code][0]),
    }
    path = save(tmp_path / "m.safetensors", tensors, metadata={"format": "pt"})
    refs, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    with safe_open(path, framework="numpy") as f:
        assert set(f.keys()) == set(refs)
        for name, ref in refs.items():
            expected = f.get_tensor(name)
            assert ref.shape == expected.shape and ref.dtype == code
            with open(path, "rb") as g:
                g.seek(ref.offset)
                got = np.frombuffer(g.read(ref.nbytes), expected.dtype).reshape(ref.shape)
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_refused_like_the_library(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type varies
        with safe_open(path, framework="numpy") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(WdiffError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_valid_oddities_are_accepted(tmp_path):
    # unaligned tensors (hand-written), scalars and zero-size tensors are valid
    header = {
        "x": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "y": {"dtype": "F32", "shape": [], "data_offsets": [6, 10]},
        "z": {"dtype": "F32", "shape": [0, 4], "data_offsets": [10, 10]},
    }
    path = tmp_path / "odd.safetensors"
    payload = np.array([1, 2, 3], np.float16).tobytes() + np.float32(5).tobytes()
    path.write_bytes(safetensors_bytes(header, payload))
    refs = read_checkpoint(path)
    np.testing.assert_array_equal(_decode(refs["x"]), [1, 2, 3])
    assert refs["y"].shape == () and _decode(refs["y"]) == 5
    assert refs["z"].numel == 0


def test_sharded_index(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {f"layers.{i}.w": rng.standard_normal((4, 3)).astype(np.float32) for i in range(5)}
    folder = save_sharded(tmp_path / "ckpt", tensors, shards=3)
    refs = read_checkpoint(folder)
    assert set(refs) == set(tensors)
    assert len({r.path for r in refs.values()}) == 3
    for name, ref in refs.items():
        np.testing.assert_array_equal(_decode(ref), tensors[name])


@pytest.mark.parametrize(
    "shard, problem",
    [
        ("../outside.safetensors", "leaves the checkpoint folder"),
        ("/etc/passwd", "leaves"),
        ("model-missing.safetensors", "does not exist"),
        ("x\ud800.safetensors", "is not a file name"),  # JSON's lone surrogate: no path encodes to it
    ],
)
def test_sharded_index_refuses_bad_shard_paths(tmp_path, shard, problem):
    folder = save_sharded(tmp_path / "ckpt", {"a": np.zeros(2, np.float32)}, shards=1)
    save(tmp_path / "outside.safetensors", {"a": np.zeros(2, np.float32)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(WdiffError, match=problem):
        read_checkpoint(folder)


def test_pickles_are_never_loaded(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(WdiffError, match="pytorch_model.bin: is a zip archive but not a torch.save file"):
        read_checkpoint(folder)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(b"\x80\x04\x95" + b"\0" * 60)
    with pytest.raises(WdiffError, match="model.safetensors: is a raw pickle.*never unpickles"):
        read_checkpoint(disguised)
