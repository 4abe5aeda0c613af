"""``map_dtype="bfloat16"`` (``--map-dtype bfloat16``): the accumulated map stored rounded to BF16.

What is checked: the kernel's rounding is ml_dtypes' (round to nearest even, NaN and infinities kept)
on every kind of float32; a BF16 map is exactly the float32 map of the same run rounded, and every
other output (row sums, the scene's cells, the PLY, findings, metrics, the summary's tensors) is the
same bytes as the float32 run's; the scene pools a BF16 map straight from the file like a float32
one; a BF16 map is recomputed, never extended, when the run grows (a float32 one is extended and
stored rounded once); ``watch`` refuses it; a bad value is one line naming the flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from factories import random_sequence, save, trainer_run, wdiff_cli
from kinds import adapter_checkpoint, assert_same_but_the_map, check_against_reference
from safetensors.numpy import load_file

import wdiff
from wdiff import kernels
from wdiff.checks import OptionError
from wdiff.results import Results

BF16 = ml_dtypes.bfloat16
SAMPLE = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "digits-bert-bf16-sharded"
SHAPES = {"emb": (97, 33), "attn.w": (40, 40), "norm": (33,), "conv": (6, 3, 3, 3)}
OPTIONS = {"render": False, "max_points": 600, "chunk_elements": 500, "spectrum": False}


def _bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).view(np.uint16)


def test_kernel_rounding_is_ml_dtypes_rounding_for_every_kind_of_float32():
    rng = np.random.default_rng(0)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20,
         3.3895314e38, 3.4028235e38, -3.4028235e38, 1e-45, 1.17549435e-38, 9.2e-41],
        np.float32,
    )  # fmt: skip
    values = np.concatenate([special, rng.integers(0, 2**32, 1_000_000, dtype=np.uint32).view(np.float32)])
    got = np.empty(values.size, np.int16)
    kernels.round_bf16(values, got)
    want = values.astype(BF16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(want)[~nan])
    widened = got.view(BF16).astype(np.float32)
    assert np.isnan(widened[nan]).all()
    np.testing.assert_array_equal(np.signbit(widened[nan]), np.signbit(values[nan]))
    halfway = (float(ml_dtypes.finfo(BF16).max) + 2.0**128) / 2  # from here on BF16 rounds to infinity
    assert np.isinf(widened[np.isfinite(values) & (np.abs(values) >= halfway)]).all()


def _two_runs(inputs, tmp_path: Path) -> tuple[Results, Results]:
    f32 = wdiff.run(inputs, tmp_path / "f32", **OPTIONS)
    bf16 = wdiff.run(inputs, tmp_path / "bf16", map_dtype="bfloat16", **OPTIONS)
    return f32, bf16


def _nan_run(root: Path) -> Path:
    seq = random_sequence(SHAPES, 4, seed=3)
    seq[2]["attn.w"][3, 4] = np.nan
    seq[3]["norm"][5] = np.inf
    return trainer_run(root, seq, [10, 20, 30, 40])


@pytest.mark.parametrize("which", ["bf16 sample", "float32 run with NaN and Inf"])
def test_a_bfloat16_map_is_the_float32_map_rounded_and_nothing_else_changes(tmp_path, which):
    inputs = SAMPLE if which == "bf16 sample" else _nan_run(tmp_path / "run")
    f32, bf16 = _two_runs(inputs, tmp_path)
    stored_f32 = load_file(str(f32.path / "accumulated.safetensors"))  # as safetensors reads them
    stored_bf16 = load_file(str(bf16.path / "accumulated.safetensors"))
    for name in f32.names:
        assert stored_f32[name].dtype == np.float32 and stored_bf16[name].dtype == BF16, name
        assert f32.map_dtype(name) == "F32" and bf16.map_dtype(name) == "BF16"
        exact = stored_f32[name]
        np.testing.assert_array_equal(_bits(stored_bf16[name]), _bits(exact.astype(BF16)), err_msg=name)
        got = bf16.accumulated(name)  # widened back to float32, exactly
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, stored_bf16[name].astype(np.float32))
        finite = np.isfinite(exact) & (exact != 0)
        assert np.all(np.abs(got[finite] - exact[finite]) <= 2**-8 * np.abs(exact[finite])), name
    data = sum(int(np.prod(f32.summary["tensors"][n]["shape"])) for n in f32.names)
    for res, itemsize in ((f32, 4), (bf16, 2)):  # the data part: two bytes a value fewer
        path = res.path / "accumulated.safetensors"
        header = int.from_bytes(path.read_bytes()[:8], "little")
        assert path.stat().st_size == 8 + header + itemsize * data
    assert_same_but_the_map(f32, bf16)
    with open(bf16.path / "accumulated.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "float32" in header["__metadata__"]["rounding"]


def test_the_scene_pools_a_bfloat16_map_from_the_file_like_its_float32_values(tmp_path):
    """Without ``pooled.safetensors`` (or for another point budget) the scene pools the map file
    itself: a BF16 map by the Numba kernel, widened as it reads, equal to pooling the same values
    stored as float32."""
    from wdiff.scene import build_scene

    _, bf16 = _two_runs(_nan_run(tmp_path / "run"), tmp_path)
    (bf16.path / "pooled.safetensors").unlink()
    widened = tmp_path / "widened" / "accumulated.safetensors"
    save(widened, {name: bf16.accumulated(name) for name in bf16.names})
    for budget in (50, 600, 10_000):
        a = build_scene(bf16.path / "accumulated.safetensors", bf16.names, max_points=budget)
        b = build_scene(widened, bf16.names, max_points=budget)
        assert a.pool_factor == b.pool_factor
        np.testing.assert_array_equal(a.xyz, b.xyz)
        np.testing.assert_array_equal(a.value, b.value)


def test_a_bfloat16_map_is_recomputed_when_the_run_grows_a_float32_one_is_extended(tmp_path):
    seq = random_sequence(SHAPES, 6, dtype="BF16", seed=5)
    root = trainer_run(tmp_path / "run", seq, [1, 2, 3, 4, 5, 6])
    later = tmp_path / "later"  # checkpoints 4 to 6, moved in as training "writes" them
    later.mkdir()
    for step in (4, 5, 6):
        (root / f"checkpoint-{step}").rename(later / f"checkpoint-{step}")
    out = tmp_path / "out"
    assert wdiff.run(root, out, map_dtype="bfloat16", **OPTIONS).summary["update"] == "full"
    assert wdiff.run(root, out, map_dtype="bfloat16", **OPTIONS).summary["update"] == "up to date"
    kept = wdiff.run(root, out, **OPTIONS)  # the default keeps the storage that was asked for
    assert (kept.summary["update"], kept.summary["map_choice"]) == ("up to date", "bfloat16")
    float32 = wdiff.run(root, out, map_dtype="float32", **OPTIONS)
    assert float32.summary["update"] == "full"  # float32 asked: computed again
    for step in (4, 5):
        (later / f"checkpoint-{step}").rename(root / f"checkpoint-{step}")
    batch = wdiff.run(root, tmp_path / "batch", map_dtype="bfloat16", **OPTIONS)
    grown = wdiff.run(root, out, map_dtype="bfloat16", **OPTIONS)  # from float32 results: extended
    assert grown.summary["update"] == "incremental from 3"
    for name in batch.names:  # the exact float32 sum, rounded once: the batch run's bits
        np.testing.assert_array_equal(grown.accumulated(name), batch.accumulated(name), err_msg=name)
        check_against_reference(
            batch.summary["tensors"][name], batch.accumulated(name), [c[name] for c in seq[:5]], "BF16"
        )
    (later / "checkpoint-6").rename(root / "checkpoint-6")
    again = wdiff.run(root, out, map_dtype="bfloat16", **OPTIONS)
    assert again.summary["update"] == "full"  # a BF16 map is not summed on
    for name in batch.names:
        check_against_reference(
            again.summary["tensors"][name], again.accumulated(name), [c[name] for c in seq], "BF16"
        )


def test_a_run_committed_in_parts_keeps_float32_until_the_last_part(tmp_path):
    seq = random_sequence(SHAPES, 5, dtype="BF16", seed=6)
    root = trainer_run(tmp_path / "run", seq, [1, 2, 3, 4, 5])
    parts = wdiff.run(root, tmp_path / "parts", map_dtype="bfloat16", commit_every=2, **OPTIONS)
    batch = wdiff.run(root, tmp_path / "batch", map_dtype="bfloat16", **OPTIONS)
    assert parts.summary["update"].startswith("incremental from")
    for name in batch.names:
        assert parts.map_dtype(name) == "BF16"
        np.testing.assert_array_equal(parts.accumulated(name), batch.accumulated(name), err_msg=name)


def test_watch_refuses_a_bfloat16_map_and_a_bad_value_is_one_line(tmp_path):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 2), [1, 2])
    with pytest.raises(OptionError, match="only a float32 map is"):
        wdiff.watch(root, tmp_path / "out", map_dtype="bfloat16", poll=0.1, until=lambda: True)
    p = wdiff_cli("watch", str(root), "-o", str(tmp_path / "out"), "--map-dtype", "bfloat16", "--poll", "0.1")
    assert p.returncode == 2 and p.stderr.startswith("wdiff: error: --map-dtype"), p.stderr
    assert p.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    p = wdiff_cli("run", str(root), "-o", str(tmp_path / "out"), "--map-dtype", "float16")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(
        "wdiff: error: --map-dtype must be one of auto, float32, bfloat16, none, got 'float16'"
    )
    assert not (tmp_path / "out").exists()


def test_computed_lora_changes_store_and_extend_a_bfloat16_map_like_stored_tensors(tmp_path):
    """A LoRA run's tensors are computed products (``wdiff.blocks``), which write and read the map
    through the same kernels: BF16 is the float32 map rounded, and an extension from float32 results
    gives the batch run's bits."""
    rng = np.random.default_rng(8)
    prefix = "base_model.model."
    state = {
        f"{prefix}q.lora_A.weight": rng.standard_normal((2, 30)),
        f"{prefix}q.lora_B.weight": rng.standard_normal((20, 2)),
    }
    root = tmp_path / "run"
    for step in range(1, 6):
        state = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
        adapter_checkpoint(root / f"checkpoint-{step}", {k: v.astype(np.float32) for k, v in state.items()},
                           {"r": 2, "lora_alpha": 4}, step=step)  # fmt: skip
    f32, bf16 = _two_runs(root, tmp_path)
    assert bf16.map_dtype("q.weight") == "BF16"
    exact = f32.accumulated("q.weight")
    np.testing.assert_array_equal(_bits(bf16.accumulated("q.weight").astype(BF16)), _bits(exact.astype(BF16)))
    later = tmp_path / "later"
    later.mkdir()
    (root / "checkpoint-5").rename(later / "checkpoint-5")
    wdiff.run(root, tmp_path / "grown", **OPTIONS)
    (later / "checkpoint-5").rename(root / "checkpoint-5")
    grown = wdiff.run(root, tmp_path / "grown", map_dtype="bfloat16", **OPTIONS)
    assert grown.summary["update"] == "incremental from 4"
    np.testing.assert_array_equal(grown.accumulated("q.weight"), bf16.accumulated("q.weight"))
