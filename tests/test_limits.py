"""Absurd claims are refused before anything is allocated: memory follows the bytes that exist."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from factories import safetensors_bytes, save, save_sharded

from wdiff.checkpoints import scan
from wdiff.errors import WdiffError
from wdiff.readers import read_checkpoint

PETABYTE = 1 << 50


def _peak(fn) -> tuple[int, float, object]:
    """Peak Python allocation (bytes) and seconds of ``fn()``, and what it returned or raised."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        outcome: object = fn()
    except WdiffError as e:
        outcome = e
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, seconds, outcome


@pytest.mark.parametrize(
    "claim, header, problem",
    [
        ("a tensor of a petabyte",
         {"w": {"dtype": "F32", "shape": [PETABYTE // 4], "data_offsets": [0, PETABYTE]}},
         "file is truncated: the header describes"),
        ("2**62 x 2**62 elements", {"w": {"dtype": "F64", "shape": [2**62, 2**62], "data_offsets": [0, 8]}},
         "needs"),
        ("100,000 dimensions of 2**62",
         {"w": {"dtype": "F32", "shape": [2**62] * 100_000, "data_offsets": [0, 8]}},
         "needs"),
        ("offsets past 2**64", {"w": {"dtype": "U8", "shape": [2**70], "data_offsets": [0, 2**70]}},
         "file is truncated"),
    ],
)  # fmt: skip
def test_claims_beyond_the_file_cost_nothing(tmp_path, claim, header, problem):
    path = tmp_path / "claim.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 8))
    size = path.stat().st_size
    peak, seconds, outcome = _peak(lambda: read_checkpoint(path))
    assert isinstance(outcome, WdiffError) and problem in str(outcome), outcome
    assert peak < 20 * size + (1 << 20), f"{claim}: {peak} bytes allocated for a {size}-byte file"
    assert seconds < 2.0 and len(str(outcome)) < len(str(path)) + 300


def test_header_length_claiming_petabytes_is_refused_unread(tmp_path):
    path = tmp_path / "claim.safetensors"
    path.write_bytes(safetensors_bytes(b"{}", length=PETABYTE))
    peak, _, outcome = _peak(lambda: read_checkpoint(path))
    assert "exceeds the 100 MB limit" in str(outcome)
    assert peak < 1 << 16


def test_header_length_within_the_limit_but_past_the_file_is_refused_unread(tmp_path):
    path = tmp_path / "claim.safetensors"
    path.write_bytes(safetensors_bytes(b"{}", length=99_000_000))
    peak, _, outcome = _peak(lambda: read_checkpoint(path))
    assert "runs past the end of the" in str(outcome)
    assert peak < 1 << 16


def test_a_sparse_terabyte_checkpoint_is_scanned_in_kilobytes(tmp_path):
    """A real (sparse) 1 TB file with a valid header: scanning holds its header, not its data."""
    tera = 1 << 40
    paths = []
    for step in (1, 2):
        raw = safetensors_bytes({"w": {"dtype": "F32", "shape": [tera // 4], "data_offsets": [0, tera]}})
        path = tmp_path / f"step_{step}.safetensors"
        with open(path, "wb") as f:
            f.write(raw)
            f.truncate(len(raw) + tera)  # sparse: no disk blocks behind the zeros
        paths.append(path)
    peak, _, run = _peak(lambda: scan(tmp_path))
    assert not isinstance(run, WdiffError), run
    assert run.tensors[0].numel == tera // 4 and run.bytes_per_pass == 2 * tera
    assert peak < 1 << 20


def test_an_oversized_shard_index_is_refused_unread(tmp_path):
    folder = save_sharded(tmp_path / "ckpt", {"a": np.zeros(2, np.float32)}, shards=1)
    index = folder / "model.safetensors.index.json"
    with open(index, "r+b") as f:
        f.truncate((1 << 30) + 1)  # sparse
    peak, _, outcome = _peak(lambda: read_checkpoint(folder))
    assert "over the 256 MiB limit" in str(outcome)  # INDEX_LIMIT
    assert peak < 1 << 16


def test_a_huge_weight_map_costs_what_its_bytes_cost(tmp_path):
    """A 10 MB index naming 200,000 tensors is parsed; memory stays a small multiple of its size."""
    save(tmp_path / "ckpt" / "model-00001-of-00001.safetensors", {"a": np.zeros(2, np.float32)})
    weight_map = {f"t{i}": "model-00001-of-00001.safetensors" for i in range(200_000)}
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    peak, _, outcome = _peak(lambda: read_checkpoint(tmp_path / "ckpt"))
    assert "listed in the index is not in this shard" in str(outcome)
    assert peak < 20 * Path(index).stat().st_size
