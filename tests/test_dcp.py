"""torch.distributed.checkpoint folders: made by torch 2.13 at test time, read by wdiff without torch.

Every tensor wdiff locates (one byte range, or pieces across ranks' files) is read back and compared bit
for bit with what ``dcp.load`` loads. One 2-process spawn (gloo on CPU) writes the sharded folders.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_files import load_dcp, read_ref, save_dcp, save_dcp_sharded, save_dcp_state

from wdiff.errors import WdiffError
from wdiff.readers.base import PiecesRef, Skipped, TensorRef
from wdiff.readers.dcp import (
    MIN_PIECE_ELEMENTS,
    Chunk,
    DcpMetadata,
    StorageInfo,
    TensorEntry,
    _tensor,
    looks_like_dcp,
    model_prefix,
    read_dcp,
)

RNG = np.random.default_rng(0)


def _normal(shape: tuple[int, ...], dtype: object = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _mlp_and_adam(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 6, dtype=dtype)).float().pow(2).sum().backward()
    opt.step()
    return model, opt


def _tiny_transformer() -> torch.nn.Module:
    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), layer, torch.nn.Linear(16, 50)).to(torch.bfloat16)


def _assert_same(folder: Path, prefix: str, tensors: dict[str, TensorRef]) -> None:
    """Every tensor wdiff lists equals, bit for bit, what torch's own reader loads under that name."""
    reference = load_dcp(folder)
    for name, ref in tensors.items():
        want = reference[prefix + name]
        got = read_ref(ref)
        assert got.shape == want.shape and got.itemsize == want.itemsize, name
        assert got.dtype == want.dtype or ref.dtype == "BOOL", name  # wdiff keeps bools as bytes
        assert got.tobytes() == want.tobytes(), name


# --- single process --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_model_and_optimizer(tmp_path: Path, dtype: torch.dtype) -> None:
    model, opt = _mlp_and_adam(dtype)
    folder = save_dcp_state(tmp_path / "step-300", {"model": model.state_dict(), "optim": opt.state_dict()})
    assert looks_like_dcp(folder)
    got = read_dcp(folder)
    assert got.state_key == "model" and got.step == 300 and got.skipped == ()
    assert read_dcp(folder / ".metadata") == got  # the metadata file stands for its folder
    assert sorted(got.tensors) == sorted(model.state_dict())  # optimizer state left out
    code = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    assert {r.dtype for r in got.tensors.values()} == {code}
    assert all(type(r) is TensorRef for r in got.tensors.values())  # one chunk, one byte range
    _assert_same(folder, "model.", got.tensors)


def test_tiny_transformer_bf16(tmp_path: Path) -> None:
    model = _tiny_transformer()
    folder = save_dcp_state(tmp_path / "step_5", {"model": model.state_dict(), "step": 5})
    got = read_dcp(folder)
    assert got.state_key == "model" and got.step == 5
    assert sorted(got.tensors) == sorted(model.state_dict())
    _assert_same(folder, "model.", got.tensors)


def test_torchtitan_layout(tmp_path: Path) -> None:
    """torchtitan saves the model's keys at the top level beside optimizer, lr_scheduler, dataloader
    and train_state (a BytesIO holding the step)."""
    model, opt = _mlp_and_adam(torch.float32)
    state = dict(model.state_dict())
    state["optimizer"] = opt.state_dict()
    state["lr_scheduler"] = {"last_epoch": 10, "base_lrs": [0.01]}
    state["dataloader"] = {"dp_rank_0": io.BytesIO(b"sampler state")}
    state["train_state"] = io.BytesIO(pickle.dumps({"step": 10}))
    folder = save_dcp_state(tmp_path / "step-10", state)
    got = read_dcp(folder)
    assert got.state_key is None and got.step == 10
    assert sorted(got.tensors) == sorted(model.state_dict())
    _assert_same(folder, "", got.tensors)


def test_app_state_prefix(tmp_path: Path) -> None:
    """The DCP tutorial's ``{"app": AppState}`` flattens to ``app.model.*`` and ``app.optim.*``."""
    model, opt = _mlp_and_adam(torch.float32)
    folder = save_dcp_state(
        tmp_path / "ckpt", {"app": {"model": model.state_dict(), "optim": opt.state_dict()}}
    )
    got = read_dcp(folder)
    assert got.state_key == "app.model" and got.step is None
    assert sorted(got.tensors) == sorted(model.state_dict())
    _assert_same(folder, "app.model.", got.tensors)


def test_no_model_weights(tmp_path: Path) -> None:
    _, opt = _mlp_and_adam(torch.float32)
    folder = save_dcp_state(tmp_path / "optim-only", {"optimizer": opt.state_dict(), "step": 3})
    _one_line_error(
        folder, ".metadata", "holds no model weights (only optimizer or training state)", "optimizer"
    )


def test_dtypes_scalars_empty_and_strided(tmp_path: Path) -> None:
    tensors = {
        "f64": _normal((3, 5), np.float64),
        "f16": _normal((4, 4), np.float16),
        "fp8": _normal((6, 8)).astype(ml_dtypes.float8_e4m3fn),
        "fp8b": _normal((6,)).astype(ml_dtypes.float8_e5m2),
        "i64": np.arange(7, dtype=np.int64),
        "flag": np.array([True, False, True]),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3), np.float32),
    }
    folder = save_dcp(tmp_path / "mixed", tensors)
    got = read_dcp(folder)
    assert sorted(got.tensors) == sorted(tensors) and got.skipped == ()
    assert got.tensors["empty"].nbytes == 0 and got.tensors["scalar"].shape == ()
    for name, a in tensors.items():
        assert read_ref(got.tensors[name]).tobytes() == np.array(a).tobytes(), name
    _assert_same(folder, "model.", got.tensors)

    odd = {
        "transposed": torch.randn(3, 5).t(),  # saved as it is in memory: strides (1, 5)
        "channels_last": torch.randn(1, 3, 2, 2).to(memory_format=torch.channels_last),
        "complex128": torch.randn(3, dtype=torch.complex128),
        "view": torch.randn(8, 4)[2:5],  # DCP clones a view smaller than its storage
    }
    folder2 = save_dcp_state(tmp_path / "odd", {"model": odd})
    got2 = read_dcp(folder2)
    skipped = {s.name: s.reason for s in got2.skipped}
    assert sorted(skipped) == ["channels_last", "complex128", "transposed"]
    assert "stride [1, 5]" in skipped["transposed"] and "torch.complex128" in skipped["complex128"]
    assert list(got2.tensors) == ["view"]
    _assert_same(folder2, "model.", got2.tensors)


# --- two ranks -------------------------------------------------------------------------------------

SHARDED = {
    "embed.weight": _normal((11, 16)),  # uneven Shard(0): 6 + 5 rows
    "layers.0.w": _normal((8, 4)),
    "layers.0.b": _normal((1, 6)),  # one row: rank 1's chunk is empty
    "layers.0.wide": _normal((4, 256)),  # Shard(1): each chunk is 4 runs of 128
    "layers.0.narrow": _normal((8, 4)),  # Shard(1) in runs of 2 elements: too scattered
    "norm.weight": _normal((7,), ml_dtypes.bfloat16),
    "head.fp8": _normal((6, 8)).astype(ml_dtypes.float8_e4m3fn),
    "replicated": _normal((3, 3)),  # written once, by one rank
    "scale": np.float32(0.5),
}
SHARD_DIMS = {"layers.0.wide": 1, "layers.0.narrow": 1, "replicated": None}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("dcp_sharded")
    later = {k: (np.array(v) * 2).astype(np.array(v).dtype) for k, v in SHARDED.items()}
    checkpoints = {root / "step-100": SHARDED, root / "step-200": later}
    return save_dcp_sharded(checkpoints, shard_dims=SHARD_DIMS, fsdp2=(root / "fsdp2-step-1",))


def test_sharded_pieces_match_torch(sharded: list[Path]) -> None:
    for folder, step in zip(sharded[:2], (100, 200)):
        assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        got = read_dcp(folder)
        assert got.step == step and got.state_key == "model"
        assert [s.name for s in got.skipped] == ["layers.0.narrow"]
        assert "scattered" in got.skipped[0].reason
        assert sorted(got.tensors) == sorted(set(SHARDED) - {"layers.0.narrow"})
        _assert_same(folder, "model.", got.tensors)

    got = read_dcp(sharded[0])
    embed = got.tensors["embed.weight"]
    assert isinstance(embed, PiecesRef)
    assert [(p.start, p.count, Path(p.path).name) for p in embed.pieces] == [
        (0, 96, "__0_0.distcp"),
        (96, 80, "__1_0.distcp"),
    ]
    wide = got.tensors["layers.0.wide"]
    assert isinstance(wide, PiecesRef) and [p.count for p in wide.pieces] == [128] * 8
    assert [Path(p.path).name[2] for p in wide.pieces] == list("01010101")
    assert type(got.tensors["layers.0.b"]) is TensorRef  # the empty chunk adds no piece
    assert type(got.tensors["replicated"]) is TensorRef
    for name, a in SHARDED.items():
        if name in got.tensors:
            assert read_ref(got.tensors[name]).tobytes() == np.array(a).tobytes(), name


def test_fsdp2_model_and_optimizer(sharded: list[Path]) -> None:
    """A real FSDP2 (fully_shard) model: every parameter Shard(0) over 2 ranks, uneven where the rows
    do not split evenly (Embedding(11, .): 6 + 5 rows); the AdamW state is left out."""
    folder = sharded[2]
    got = read_dcp(folder)
    assert got.state_key == "model" and got.step == 1 and got.skipped == ()
    names = ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    assert sorted(got.tensors) == sorted(names)
    assert all(isinstance(r, PiecesRef) and len(r.pieces) == 2 for r in got.tensors.values())
    assert [p.count for p in got.tensors["0.weight"].pieces] == [96, 80]
    _assert_same(folder, "model.", got.tensors)


# --- chunk geometry, without files -----------------------------------------------------------------


@st.composite
def _gridded(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Chunk]]:
    """A shape and a grid of chunks tiling it (cuts anywhere along any dim, empty chunks allowed)."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    cuts = []
    for n in shape:
        inner = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
        cuts.append([0, *inner, n])
    chunks = []
    for box in np.ndindex(*(len(c) - 1 for c in cuts)):
        offsets = tuple(cuts[d][i] for d, i in enumerate(box))
        sizes = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(box))
        chunks.append(Chunk(offsets, sizes))
    if not chunks:  # a 0-d tensor: one chunk with no dims
        chunks = [Chunk((), ())]
    return shape, draw(st.permutations(chunks))


def _pieces_of(shape: tuple[int, ...], chunks: list[Chunk]) -> tuple[TensorRef | Skipped, dict[str, bytes]]:
    """Lay each chunk's elements row-major in its own blob, as DCP items are, and let the reader
    locate them."""
    full = np.arange(math.prod(shape), dtype=np.int32).reshape(shape)
    blobs, infos = {}, {}
    for k, c in enumerate(chunks):
        box = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
        blobs[f"f{k}"] = b"\0" * 8 + np.ascontiguousarray(full[box]).tobytes()
        infos[("t", c.offsets)] = StorageInfo(f"f{k}", 0, 0)
    meta = DcpMetadata({}, infos, None)
    index = {c: f"f{k}" for k, c in enumerate(chunks)}

    def locate(chunk: Chunk, info: StorageInfo) -> TensorRef:
        return TensorRef("t", "I32", chunk.sizes, index[chunk], 8, 4 * math.prod(chunk.sizes))

    return _tensor("t", "t", TensorEntry("I32", shape, tuple(chunks)), meta, locate, ".metadata"), blobs


@settings(max_examples=150, deadline=None)
@given(_gridded())
def test_any_grid_of_chunks_reassembles(case: tuple[tuple[int, ...], list[Chunk]]) -> None:
    shape, chunks = case
    ref, blobs = _pieces_of(shape, chunks)
    numel = math.prod(shape)
    if isinstance(ref, Skipped):
        assert "scattered" in ref.reason
        return
    pieces = ref.pieces if isinstance(ref, PiecesRef) else ()
    data = b"".join(blobs[p.path][p.offset : p.offset + 4 * p.count] for p in pieces)
    if not pieces:
        data = blobs.get(ref.path, b"")[ref.offset : ref.offset + ref.nbytes]
    assert np.frombuffer(data, np.int32).tolist() == list(range(numel))
    assert [p.start for p in pieces] == sorted(p.start for p in pieces)


def test_scattered_rule() -> None:
    # Shard(1) of a (64, 2) tensor: 128 runs of 1 element
    shape = (64, 2)
    ref, _ = _pieces_of(shape, [Chunk((0, 0), (64, 1)), Chunk((0, 1), (64, 1))])
    assert isinstance(ref, Skipped)
    # rows of MIN_PIECE_ELEMENTS elements are fine
    shape = (4, 2 * MIN_PIECE_ELEMENTS)
    ref, _ = _pieces_of(
        shape, [Chunk((0, 0), (4, MIN_PIECE_ELEMENTS)), Chunk((0, MIN_PIECE_ELEMENTS), (4, 64))]
    )
    assert isinstance(ref, PiecesRef) and len(ref.pieces) == 8


@pytest.mark.parametrize(
    "chunks, problem",
    [
        ([Chunk((0, 0), (3, 4)), Chunk((4, 0), (4, 4))], "leave a gap at element 12"),
        ([Chunk((0, 0), (5, 4)), Chunk((4, 0), (4, 4))], "overlap at element 16"),
        ([Chunk((0, 0), (8, 4)), Chunk((0, 0), (8, 2))], "overlap at element 0"),
        ([Chunk((0, 0), (4, 4))], "cover 16 of 32 elements"),
    ],
)
def test_chunks_must_tile(chunks: list[Chunk], problem: str) -> None:
    with pytest.raises(WdiffError, match=problem):
        _pieces_of((8, 4), chunks)


def test_model_prefix() -> None:
    assert model_prefix(["model.a", "model.b", "optim.state.0.exp_avg"]) == ("model.", ["model.a", "model.b"])
    assert model_prefix(["a", "b.c", "optimizer.state.a.exp_avg", "lr_scheduler.x"]) == ("", ["a", "b.c"])
    assert model_prefix(["app.model.a", "app.optim.x"]) == ("app.model.", ["app.model.a"])
    assert model_prefix(["model.a", "ema.a"]) == ("", ["model.a", "ema.a"])  # two models: names kept whole
    assert model_prefix(["optimizer_0.x", "callbacks.best", "model.w"]) == ("model.", ["model.w"])


# --- bad folders -----------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path, sharded: list[Path]) -> Path:
    """A copy of a 2-rank folder to damage."""
    return Path(shutil.copytree(sharded[0], tmp_path / "step-100"))


def _rewrite_metadata(folder: Path, change) -> None:
    path = folder / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # torch's own pickle, trusted here: the test wrote it
    change(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


def _set_storage(folder: Path, fqn: str, **fields: object) -> None:
    def change(metadata) -> None:
        for index, info in metadata.storage_data.items():
            if index.fqn == fqn:
                metadata.storage_data[index] = dataclasses.replace(info, **fields)
                return

    _rewrite_metadata(folder, change)


def _one_line_error(folder: Path, *fragments: str) -> str:
    with pytest.raises(WdiffError) as e:
        read_dcp(folder)
    text = str(e.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text
    return text


def test_truncated_item_file(small: Path) -> None:
    item = small / "__1_0.distcp"
    os.truncate(item, item.stat().st_size - 100)
    _one_line_error(small, str(item), "file is truncated")


@pytest.mark.parametrize(
    "relative, problem",
    [
        ("../__0_0.distcp", "leaves the checkpoint folder"),
        ("/etc/passwd", "is not a relative path"),
        ("sub/../../x.distcp", "leaves the checkpoint folder"),
        ("missing.distcp", "does not exist"),
        ("", "is not a relative path"),
        ("x\ud800.distcp", "is not a relative path"),  # a lone surrogate: no file name encodes to it
    ],
)
def test_item_path_must_stay_inside(small: Path, relative: str, problem: str) -> None:
    _set_storage(small, "model.layers.0.w", relative_path=relative)
    _one_line_error(small, str(small / ".metadata"), problem)


def test_symlink_out_of_the_folder(small: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.distcp"
    shutil.copy(small / "__1_0.distcp", outside)
    (small / "__1_0.distcp").unlink()
    (small / "__1_0.distcp").symlink_to(outside)
    _one_line_error(small, "leaves the checkpoint folder (a symlink)")


def test_symlink_inside_the_folder_is_fine(small: Path) -> None:
    (small / "__1_0.distcp").rename(small / "data.bin")
    (small / "__1_0.distcp").symlink_to("data.bin")
    assert len(read_dcp(small).tensors) == len(SHARDED) - 1


def test_length_and_offset_must_match_the_item(small: Path) -> None:
    _set_storage(small, "model.layers.0.w", length=1000)
    _one_line_error(small, "__0_0.distcp", "model.layers.0.w chunk at [0, 0]", "no end-of-archive record")


def test_range_covering_the_next_item(small: Path) -> None:
    """A range two items long ends with the next item's zip, which zipfile would happily read."""
    with open(small / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    items = sorted(
        (
            (v.offset, v.length, k.fqn)
            for k, v in metadata.storage_data.items()
            if v.relative_path == "__0_0.distcp"
        )
    )
    (_, length, fqn), (_, next_length, _) = next(
        (a, b)
        for a, b in zip(items, items[1:])
        if a[2] != "model.layers.0.narrow"  # that one is not read
    )
    _set_storage(small, fqn, length=length + next_length)
    _one_line_error(small, "__0_0.distcp", "does not start at the item's offset")


def test_item_offset_off_by_some_bytes(small: Path) -> None:
    _set_storage(small, "model.layers.0.w", offset=3)
    _one_line_error(small, "__0_0.distcp", "not a torch.save zip")


def test_transforms_are_refused(small: Path) -> None:
    _set_storage(small, "model.embed.weight", transform_descriptors=["stream.zstd/1"])
    _one_line_error(small, "stream.zstd/1", "does not decode")


def test_safetensors_serialization_is_refused(tmp_path: Path) -> None:
    """FileSystemWriter(serialization_format=SAFETENSORS) writes one safetensors blob per file and item
    offsets that do not point at the tensors: torch's own dcp.load cannot read it either."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    writer = dcp.FileSystemWriter(str(tmp_path / "st"), serialization_format=SerializationFormat.SAFETENSORS)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": {"a": torch.randn(4, 4)}, "step": 3}, storage_writer=writer)
    _one_line_error(tmp_path / "st", "__0_0.distcp", "safetensors blob")


def test_chunk_gap_in_metadata(small: Path) -> None:
    def change(metadata) -> None:
        entry = metadata.state_dict_metadata["model.layers.0.w"]
        entry.chunks[0].sizes = torch.Size([3, 4])

    _rewrite_metadata(small, change)
    _one_line_error(small, ".metadata", "'model.layers.0.w': its chunks leave a gap at element 12")


def test_dtype_must_match_the_item(small: Path) -> None:
    def change(metadata) -> None:
        metadata.state_dict_metadata["model.layers.0.w"].properties.dtype = torch.float16

    _rewrite_metadata(small, change)
    _one_line_error(small, "__0_0.distcp", "holds F32 [4, 4] where the metadata says F16 [4, 4]")


def test_unknown_global_inside_an_item(small: Path) -> None:
    """A chunk's data.pkl naming anything but the tensor rebuild functions is refused."""
    item = small / "__0_0.distcp"
    data = item.read_bytes()
    assert data.count(b"_rebuild_tensor_v2") >= 1
    item.write_bytes(
        data.replace(b"torch._utils\n_rebuild_tensor_v2", b"torch._utils\n_rebuild_tensor_v9", 1)
    )
    _one_line_error(small, str(item), "refuses to unpickle torch._utils._rebuild_tensor_v9")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return os.system, (f"touch {_Evil.canary}",)

    canary = ""


def test_malicious_global_in_metadata_never_runs(small: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _Evil.canary = str(canary)

    def change(metadata) -> None:
        metadata.planner_data = {"x": _Evil()}

    _rewrite_metadata(small, change)
    text = _one_line_error(small, str(small / ".metadata"), "refuses to unpickle")
    assert "system" in text
    assert not canary.exists()


def test_looks_like_dcp(tmp_path: Path, sharded: list[Path]) -> None:
    assert looks_like_dcp(sharded[0])
    assert not looks_like_dcp(tmp_path)  # empty
    (tmp_path / ".metadata").write_bytes(b"{not a pickle")
    (tmp_path / "__0_0.distcp").write_bytes(b"")
    assert not looks_like_dcp(tmp_path)
    only_metadata = tmp_path / "only"
    only_metadata.mkdir()
    shutil.copy(sharded[0] / ".metadata", only_metadata / ".metadata")
    assert not looks_like_dcp(only_metadata)  # no items: not finished, or not DCP
    assert not looks_like_dcp(tmp_path / "missing")


# --- damaged bytes: a one-line refusal or a consistent reading, never a crash --------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {"w": _normal((8, 4)), "b": _normal((4,), ml_dtypes.bfloat16), "s": np.float32(1)}
    return save_dcp(tmp_path_factory.mktemp("dcp_fuzz") / "step-1", tensors, extra={"step": 1})


def _fuzz(pristine: Path, examples: int) -> None:
    """Overwrite a few bytes of ``.metadata`` or an item file, maybe truncate it: ``read_dcp`` refuses
    in one line naming a file of the folder, or what it accepts stays inside the folder's files."""
    outcomes = {"accepted": 0, "refused": 0}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= 100)
    @given(
        target=st.sampled_from([".metadata", "__0_0.distcp"]),
        edits=st.lists(
            st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4
        ),
        cut=st.one_of(st.none(), st.floats(0, 1)),
    )
    def one(target: str, edits: list[tuple[float, int]], cut: float | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(shutil.copytree(pristine, Path(tmp) / "step-1"))
            path = folder / target
            data = bytearray(path.read_bytes())
            for where, value in edits:
                data[int(where * len(data))] = value
            if cut is not None:
                data = data[: int(cut * len(data))]
            path.write_bytes(bytes(data))
            try:
                got = read_dcp(folder)
            except WdiffError as e:
                assert "\n" not in str(e) and str(e).startswith(str(folder)), str(e)
                outcomes["refused"] += 1
                return
            outcomes["accepted"] += 1
            for ref in got.tensors.values():
                width = ref.kind.bits // 8
                ranges = (
                    [(p.path, p.offset, p.count * width) for p in ref.pieces]
                    if isinstance(ref, PiecesRef)
                    else []
                )
                for path, offset, n in ranges or [(ref.path, ref.offset, ref.nbytes)]:
                    assert Path(path).parent == folder and offset + n <= os.path.getsize(path)

    one()
    assert outcomes["refused"] > 0


def test_damaged_bytes_quick(pristine: Path) -> None:
    _fuzz(pristine, 60)


@pytest.mark.slow
def test_damaged_bytes_long(pristine: Path) -> None:
    _fuzz(pristine, 5_000)
