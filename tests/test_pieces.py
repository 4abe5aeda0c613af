"""Tensors stored in several byte ranges (``PiecesRef``: sharded torch.distributed.checkpoint tensors,
strided PyTorch views) through the ``pieces`` chunk task, against the float64 numpy reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from kinds import check_against_reference

from wdiff import api
from wdiff.errors import WdiffError
from wdiff.readers.base import Piece, PiecesRef, TensorRef
from wdiff.sequence import AlignedTensor, Checkpoint, Run

CODES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


def _scatter(folder, t: int, values: np.ndarray, code: str, rng, cuts: int) -> TensorRef:
    """Write ``values`` (flattened) as ``cuts + 1`` pieces, shuffled over two files with gaps between
    them; return the PiecesRef that finds them again (a plain TensorRef when ``cuts`` is 0)."""
    raw = values.astype(CODES[code]).ravel()
    size = raw.itemsize
    bounds = [0, *sorted(rng.choice(np.arange(1, raw.size), cuts, replace=False).tolist()), raw.size]
    spans = list(zip(bounds, bounds[1:]))
    files = [folder / f"ckpt{t}-a.bin", folder / f"ckpt{t}-b.bin"]
    blobs = [bytearray(rng.integers(0, 256, 13, dtype=np.uint8).tobytes()) for _ in files]
    pieces = []
    for k in rng.permutation(len(spans)):
        lo, hi = spans[k]
        which = int(rng.integers(0, 2))
        blob = blobs[which]
        offset = len(blob)
        blob += raw[lo:hi].tobytes() + rng.integers(0, 256, 7, dtype=np.uint8).tobytes()
        pieces.append(Piece(lo, hi - lo, str(files[which]), offset))
    for path, blob in zip(files, blobs):
        path.write_bytes(bytes(blob))
    pieces.sort(key=lambda p: p.start)
    if cuts == 0:
        p = pieces[0]
        return TensorRef("w", code, values.shape, p.path, p.offset, raw.size * size)
    first = pieces[0]
    return PiecesRef("w", code, values.shape, first.path, first.offset, raw.size * size, tuple(pieces))


@pytest.mark.parametrize("code", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("chunk", [1000, 1 << 22])
def test_pieces_match_the_numpy_reference(tmp_path, code, chunk):
    rng = np.random.default_rng(7)
    shape = (37, 53)
    weights = [rng.standard_normal(shape)]
    for _ in range(4):
        weights.append(weights[-1] + rng.standard_normal(shape) * 0.05)
    stored = [w.astype(CODES[code]).astype(np.float64) for w in weights]
    # checkpoint 0 in one range, the others in 1, 5 and 40 cuts: every mix of sources
    refs = [
        _scatter(tmp_path, t, w, code, rng, cuts)
        for t, (w, cuts) in enumerate(zip(weights, [0, 1, 5, 40, 3]))
    ]
    checkpoints = tuple(Checkpoint(str(tmp_path / f"ckpt{t}"), t * 10, {"w": r}) for t, r in enumerate(refs))
    tensor = AlignedTensor("w", shape, tuple(refs))
    assert tensor.source == "pieces"
    run = Run(str(tmp_path), checkpoints, (tensor,), ())
    res = api.run(run, tmp_path / "out", render=False, chunk_elements=chunk)
    check_against_reference(res.summary["tensors"]["w"], res.accumulated("w"), stored)
    np.testing.assert_allclose(
        res.neuron_change("w"), res.accumulated("w").astype(np.float64).sum(axis=1), rtol=1e-5
    )


def test_a_piece_past_the_end_of_its_file_is_one_line(tmp_path):
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((8, 8)) for _ in range(2)]
    refs = [_scatter(tmp_path, t, w, "F32", rng, 3) for t, w in enumerate(weights)]
    last = refs[1].pieces[-1]  # type: ignore[attr-defined]
    with open(last.path, "r+b") as f:
        f.truncate(last.offset + 4)
    checkpoints = tuple(Checkpoint(str(tmp_path / f"c{t}"), t, {"w": r}) for t, r in enumerate(refs))
    run = Run(str(tmp_path), checkpoints, (AlignedTensor("w", (8, 8), tuple(refs)),), ())
    with pytest.raises(WdiffError, match=r"ckpt1-.\.bin: reading tensor 'w' failed: the file shrank"):
        api.run(run, tmp_path / "out", render=False)
    assert not (tmp_path / "out").exists()
