"""Kernels and the Dask chunk graph against a float64 numpy reference, on deliberately uneven chunks."""

from __future__ import annotations

import numpy as np
import pytest
from factories import DTYPES, random_sequence, reference, save, trainer_run
from safetensors.numpy import load_file

from wdiff import kernels
from wdiff.checkpoints import scan
from wdiff.compute import compute
from wdiff.results import create_accumulated, layout_accumulated

SHAPES = {
    "model.embed.weight": (61, 17),
    "model.layers.0.attn.q.weight": (33, 29),
    "model.layers.0.norm.weight": (29,),
    "model.layers.1.conv.weight": (5, 3, 3, 3),
    "model.layers.1.scale": (),
    "model.layers.1.empty": (0, 4),
    "head.bias": (1,),
}


def _compute(run, tmp_path, **kw):
    layout = layout_accumulated((t.name, t.shape) for t in run.tensors)
    path = tmp_path / "acc.safetensors"
    create_accumulated(path, layout)
    result = compute(run, str(path), layout, **kw)
    return result, load_file(str(path))


def _check(result, acc, checkpoints, shapes=SHAPES):
    for name in shapes:
        ref = reference(checkpoints, name)
        got = result.tensors[name]
        scale = max(float(np.max(ref["accumulated"], initial=0.0)), 1e-30)
        assert acc[name].shape == shapes[name] and acc[name].dtype == np.float32
        np.testing.assert_allclose(acc[name], ref["accumulated"], rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(got["accumulated_l1"], ref["accumulated"].sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["net_l2"], ref["net_l2"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["interval_l2"], ref["interval_l2"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["interval_l1"], ref["interval_l1"], rtol=1e-4, atol=1e-6)
        if ref["accumulated"].size:
            rows = ref["accumulated"].reshape(
                ref["accumulated"].shape[0] if ref["accumulated"].ndim else 1, -1
            )
            np.testing.assert_allclose(result.neuron_change[name], rows.sum(axis=1), rtol=1e-4, atol=1e-5)
        else:
            assert name not in result.neuron_change
        np.testing.assert_allclose(got["l2"], ref["l2"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["distance_l2"], ref["distance_l2"], rtol=1e-4, atol=1e-6)
        assert [r is None for r in got["rotation"]] == [r is None for r in ref["rotation"]]
        for r, x in zip(got["rotation"], ref["rotation"]):
            if x is not None:
                np.testing.assert_allclose(r, max(x, 0.0), rtol=1e-3, atol=1e-7)
        if ref["relative_change"] is None:
            assert got["relative_change"] is None
        else:
            np.testing.assert_allclose(got["relative_change"], ref["relative_change"], rtol=1e-4)


@pytest.mark.parametrize("code", ["F32", "F64", "F16", "BF16", "F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_compute_matches_numpy_reference(tmp_path, code, chunk):
    checkpoints = random_sequence(SHAPES, count=4, dtype=code, seed=len(code) + chunk)
    run = scan(trainer_run(tmp_path / "run", checkpoints, steps=[10, 20, 30, 40]))
    result, acc = _compute(run, tmp_path, chunk_elements=chunk)
    _check(result, acc, checkpoints)
    assert result.read_bytes == run.bytes_per_pass


def test_threads_and_sync_give_identical_bits(tmp_path):
    checkpoints = random_sequence(SHAPES, count=5, seed=9)
    run = scan(trainer_run(tmp_path / "run", checkpoints, steps=[1, 2, 3, 4, 5]))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r1, a1 = _compute(run, tmp_path / "a", chunk_elements=13, scheduler="threads", workers=2)
    r2, a2 = _compute(run, tmp_path / "b", chunk_elements=13, scheduler="sync")
    for name in a1:
        assert a1[name].tobytes() == a2[name].tobytes()
    assert r1.tensors == r2.tensors


def test_dtype_change_between_checkpoints(tmp_path):
    seq = random_sequence({"w": (9, 4)}, count=3, dtype="F32", seed=2)
    seq[1] = {"w": seq[1]["w"].astype(DTYPES["BF16"][0])}
    seq[2] = {"w": seq[2]["w"].astype(np.float16)}
    paths = [save(tmp_path / f"s{i}.safetensors", c) for i, c in enumerate(seq)]
    run = scan(paths)
    result, acc = _compute(run, tmp_path, chunk_elements=5)
    _check(result, acc, seq, {"w": (9, 4)})  # blocks decoded to float32 first, then the same kernels
    assert result.tensors["w"]["dtype"] == ["BF16", "F16", "F32"]


@pytest.mark.parametrize(
    "code, sizes, top", [("F32", (3e-5, 1e-4, 3e-4), 1e-7), ("BF16", (3e-3, 6e-3, 1e-2), 1e-4)]
)
def test_small_rotations_are_resolved(tmp_path, code, sizes, top):
    """A layer that turns by 1e-10..1e-7 over a million weights: 1 - cos from float32 dot products
    cannot see that (the cosine rounds to 1 +- 1e-7); the squared distances to W(0) do. (BF16 cannot
    hold changes that small: its steps are larger.)"""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal(1 << 20)
    steps = [w0 + rng.standard_normal(w0.size) * s for s in (0.0, *sizes)]
    seq = [{"w": w.astype(DTYPES[code][0])} for w in steps]
    run = scan([save(tmp_path / f"s{i}.safetensors", c) for i, c in enumerate(seq)])
    result, _ = _compute(run, tmp_path, chunk_elements=100_003)
    ref = reference(seq, "w")["rotation"]
    assert 1e-10 < ref[1] < ref[3] < top
    np.testing.assert_allclose(result.tensors["w"]["rotation"], ref, rtol=1e-3, atol=1e-13)


def test_nonfinite_values_are_counted_not_hidden(tmp_path):
    seq = random_sequence({"w": (4, 4)}, count=3, seed=1)
    seq[2]["w"][1, 2] = np.nan
    seq[2]["w"][3, 3] = np.inf
    run = scan([save(tmp_path / f"s{i}.safetensors", c) for i, c in enumerate(seq)])
    result, acc = _compute(run, tmp_path, chunk_elements=3)
    assert result.tensors["w"]["nonfinite"] == [0, 0, 2]
    assert np.isnan(acc["w"][1, 2]) and np.isinf(acc["w"][3, 3])
    finite = np.isfinite(acc["w"])
    ref = reference(seq, "w")["accumulated"]
    np.testing.assert_allclose(acc["w"][finite], ref[finite], atol=1e-6)


def test_kernel_step_against_numpy_one_liner():
    rng = np.random.default_rng(0)
    f, a, b = (rng.standard_normal(1001).astype(np.float32) for _ in range(3))
    lut = kernels.decode_table("F32")
    acc = np.full_like(a, 0.5)
    assert kernels.start(a, lut) == pytest.approx((np.sum(a.astype(np.float64) ** 2), 0), rel=1e-12)
    fold = kernels.fold_interval
    diff_sum, diff_sumsq, sumsq, dist, nonfinite, total, peak = fold(f, a, b, lut, acc, False)
    b64 = b.astype(np.float64)
    np.testing.assert_allclose(acc, 0.5 + np.abs(b - a), rtol=1e-6)
    np.testing.assert_allclose(diff_sum, np.sum(np.abs(b64 - a)), rtol=1e-6)
    np.testing.assert_allclose(diff_sumsq, np.sum((b64 - a) ** 2), rtol=1e-6)
    np.testing.assert_allclose(sumsq, np.sum(b64**2), rtol=1e-6)
    np.testing.assert_allclose(dist, np.sum((b64 - f) ** 2), rtol=1e-6)
    np.testing.assert_allclose(total, np.sum(acc.astype(np.float64)), rtol=1e-6)
    assert nonfinite == 0 and peak == acc.max()
    # fresh: acc is overwritten
    *_, total, peak = kernels.fold_interval(f, a, b, lut, acc, True)
    assert np.array_equal(acc, np.abs(b - a)) and peak == acc.max()


def test_kernel_step_decodes_bf16_blocks_like_ml_dtypes():
    import ml_dtypes

    rng = np.random.default_rng(1)
    f, a, b = (rng.standard_normal(777).astype(ml_dtypes.bfloat16) for _ in range(3))
    acc = np.zeros(777, np.float32)
    bits = (x.view(np.int16) for x in (f, a, b))
    sums = kernels.fold_interval(*bits, kernels.decode_table("BF16"), acc, True)
    f32, a32, b32 = (x.astype(np.float64) for x in (f, a, b))
    assert np.array_equal(acc, np.abs(b.astype(np.float32) - a.astype(np.float32)))
    np.testing.assert_allclose(sums[3], np.sum((b32 - f32) ** 2), rtol=1e-6)
    np.testing.assert_allclose(sums[0], np.sum(np.abs(b32 - a32)), rtol=1e-6)


def test_kernel_sums_leave_nonfinite_terms_out():
    a = np.array([1.0, 2.0, 3.0, np.inf], np.float32)
    b = np.array([2.0, np.nan, 5.0, 1.0], np.float32)
    lut = kernels.decode_table("F32")
    acc = np.zeros_like(a)
    assert kernels.start(a, lut) == (14.0, 1)
    fold = kernels.fold_interval
    diff_sum, diff_sumsq, sumsq, dist, nonfinite, total, peak = fold(a, a, b, lut, acc, False)
    assert diff_sum == 1.0 + 2.0 and diff_sumsq == 1.0 + 4.0  # NaN and -Inf differences left out
    assert sumsq == 4.0 + 25.0 + 1.0 and dist == 1.0 + 4.0 and nonfinite == 1
    assert np.isnan(acc[1]) and np.isinf(acc[3]) and acc[0] == 1.0 and acc[2] == 2.0
    assert np.isnan(total) and np.isnan(peak)  # the map holds a NaN: so do its sum and max
    c = np.array([4.0, 2.0, 5.0, 1.0], np.float32)
    acc = np.zeros(4, np.float32)
    sums = kernels.fold_interval(c, c, np.array([4.0, 2.0, 5.0, np.inf], np.float32), lut, acc, True)
    assert np.isinf(sums[5]) and np.isinf(sums[6])  # Inf, not NaN: a real maximum


@pytest.mark.parametrize("budget, chunk", [(5000, 1000), (100_000, 333), (40, 4096)])
def test_cells_pooled_during_compute_equal_pooling_the_results_file(tmp_path, monkeypatch, budget, chunk):
    """The scene's cells come from the compute pass (pooled.safetensors); they must equal pooling
    accumulated.safetensors afterwards, whatever the chunks cut through."""
    import wdiff
    import wdiff.scene._kernels as scene_kernels
    from wdiff.scene import build_scene

    real_pool_tensor = scene_kernels.pool_tensor

    shapes = {"a": (301, 257), "b": (5000,), "c": (7, 3, 3, 3), "s": (), "e": (0, 4)}
    seq = random_sequence(shapes, 3, seed=4)
    seq[2]["a"][10, 10] = np.nan
    seq[2]["b"][77] = np.inf
    out = tmp_path / "out"
    paths = [save(tmp_path / f"s{i}.safetensors", c) for i, c in enumerate(seq)]
    res = wdiff.run(paths, out, render=False, chunk_elements=chunk, max_points=budget)
    assert (out / "pooled.safetensors").is_file()

    def must_not_read(*args):
        raise AssertionError("the scene re-read the results file although compute pooled it")

    monkeypatch.setattr(scene_kernels, "pool_tensor", must_not_read)
    from_compute = build_scene(out / "accumulated.safetensors", res.names, max_points=budget)
    monkeypatch.setattr(scene_kernels, "pool_tensor", real_pool_tensor)
    (out / "pooled.safetensors").unlink()
    from_file = build_scene(out / "accumulated.safetensors", res.names, max_points=budget)
    assert from_compute.pool_factor == from_file.pool_factor
    np.testing.assert_array_equal(from_compute.xyz, from_file.xyz)
    np.testing.assert_array_equal(from_compute.value, from_file.value)  # NaN == NaN here
    assert from_compute.nonfinite == from_file.nonfinite == 2


def _pool_reference(values: np.ndarray, grid, mean: bool) -> np.ndarray:
    """numpy: pool a rows x cols grid into cells of grid.block (max, or mean over each cell's elements)."""
    v = values.reshape(grid.rows, grid.cols)
    (br, bc), (cr, cc) = grid.block, grid.shape
    fill = 0.0 if mean else -np.inf
    padded = np.full((cr * br, cc * bc), fill)
    padded[: grid.rows, : grid.cols] = v
    blocks = padded.reshape(cr, br, cc, bc)
    if not mean:
        return blocks.max(axis=(1, 3))
    counts = np.zeros_like(padded)
    counts[: grid.rows, : grid.cols] = 1
    return blocks.sum(axis=(1, 3)) / counts.reshape(cr, br, cc, bc).sum(axis=(1, 3))


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("chunk", [13, 1 << 20])
def test_frames_pool_each_interval_change(tmp_path, mean, chunk):
    """Frames: every interval's |W(t+1) - W(t)|, pooled into cells, on uneven chunks and blocks."""
    from wdiff.compute import Grid
    from wdiff.scene.pooling import cell_counts

    shapes = {"a.weight": (37, 11), "b.bias": (23,), "c.conv": (6, 2, 3, 3)}
    checkpoints = random_sequence(shapes, count=5, dtype="BF16", seed=7)
    run = scan(trainer_run(tmp_path / "run", checkpoints, steps=[1, 2, 3, 4, 5]))
    grids = {
        "a.weight": Grid(37, 11, (4, 3), mean),
        "b.bias": Grid(1, 23, (1, 5), mean),
        "c.conv": Grid(6, 18, (2, 18), mean),
    }
    result, _ = _compute(run, tmp_path, chunk_elements=chunk, frame_grids=grids)
    for name, grid in grids.items():
        w = [np.asarray(c[name]).astype(np.float64) for c in checkpoints]
        want = np.stack([_pool_reference(np.abs(b - a), grid, mean) for a, b in zip(w, w[1:])])
        got = result.frames[name]
        if mean:  # the chunks hand over sums; the caller divides
            got = got / cell_counts(grid.rows, grid.cols, grid.block)
        assert got.shape == (4, *grid.shape)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
