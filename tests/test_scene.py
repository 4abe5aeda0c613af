"""The scene: pooling against numpy, the point budget, layout, colours, PLY bytes, the picture.

Test data is an ``accumulated.safetensors`` written here with the official writer: assorted shapes
(scalar, zero-size, 1-D, 4-D conv, uneven 2-D, a tall one that folds) so every layout rule is hit.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from wdiff.errors import WdiffError
from wdiff.scene import Colors, build_scene, colorize, render_scene, write_points_ply
from wdiff.scene import color as color_mod
from wdiff.scene.accumulated import AccumulatedFile
from wdiff.scene.layout import coarsen_scene
from wdiff.scene.ply import VERTEX_DTYPE, ply_header
from wdiff.scene.pooling import GridPooler, pool_factor

SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed.weight": (37, 23),
    "model.layers.0.attn.q.weight": (50, 41),
    "model.layers.0.attn.q.bias": (41,),
    "model.layers.0.conv.weight": (6, 3, 5, 5),
    "model.layers.0.scale": (),
    "model.layers.1.empty": (0, 3),
    "model.layers.1.mlp.weight": (301, 257),
    "model.layers.1.mlp.bias": (257,),
    "model.head.weight": (7, 300),
    "model.long.weight": (4, 50, 3),  # rows of 150 values: split along dim 1 when chunks are small
}
NAMES = list(SHAPES)  # the caller's order, deliberately not alphabetical


def grid_of(array: np.ndarray) -> np.ndarray:
    """The 2-D view the scene draws: rows = first dimension, columns = the rest."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(1, -1)
    return array.reshape(array.shape[0], math.prod(array.shape[1:]))


def reference_pool(grid: np.ndarray, block: tuple[int, int], pool: str) -> np.ndarray:
    """Independent pooling: pad to whole blocks, reshape, reduce ignoring the padding."""
    br, bc = block
    r, c = grid.shape
    pr, pc = math.ceil(r / br), math.ceil(c / bc)
    padded = np.full((pr * br, pc * bc), np.nan, dtype=np.float64)
    padded[:r, :c] = grid
    tiles = padded.reshape(pr, br, pc, bc)
    reduce = np.nanmax if pool == "max" else np.nanmean
    return reduce(tiles, axis=(1, 3))


def total_cells(factor: int) -> int:
    grids = [grid_of(np.empty(s)).shape for s in SHAPES.values() if math.prod(s) > 0]
    return sum(math.ceil(r / factor) * math.ceil(c / factor) for r, c in grids)


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for name, shape in SHAPES.items():
        a = rng.gamma(1.5, 1e-3, size=shape).astype(np.float32)
        if a.size > 10:
            a.reshape(-1)[::11] = 0.0  # frozen weights: exact zeros
        out[name] = np.asarray(a, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory: pytest.TempPathFactory, tensors: dict[str, np.ndarray]) -> Path:
    path = tmp_path_factory.mktemp("out") / "accumulated.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    return path


N_NONEMPTY = sum(1 for s in SHAPES.values() if math.prod(s) > 0)


# --- reading in blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 22])
def test_blocks_cover_each_grid_once_within_the_budget(accumulated, tensors, chunk):
    with AccumulatedFile(accumulated, chunk_elements=chunk) as f:
        for name, array in tensors.items():
            expected = grid_of(array)
            rebuilt = np.full(expected.shape, np.nan, dtype=np.float32)
            inner = math.prod(array.shape[2:]) if array.ndim > 2 else 1
            for row, col, block in f.blocks(name):
                assert block.size <= max(chunk, inner)
                target = rebuilt[row : row + block.shape[0], col : col + block.shape[1]]
                assert np.isnan(target).all(), "a block overlaps another"
                target[...] = block
            np.testing.assert_array_equal(rebuilt, expected)


def test_reads_only_slices_and_releases_the_mapping(accumulated, monkeypatch):
    """build_scene reads values only through the pooling kernel (no whole-tensor or mapped reads);
    ``blocks()`` reads ``get_slice`` pieces of at most one chunk, reopening the handle every
    ``remap_bytes`` so mapped pages do not pile up."""
    import safetensors as st

    real_open = st.safe_open
    opens, reads = [], []

    class Spy:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)
            opens.append(1)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            reads.append(("tensor", name, self._f.get_slice(name).get_shape()))
            return self._f.get_tensor(name)

        def get_slice(self, name):
            sl = self._f.get_slice(name)

            class SliceSpy:
                def get_shape(self):
                    return sl.get_shape()

                def get_dtype(self):
                    return sl.get_dtype()

                def __getitem__(self, index):
                    out = sl[index]
                    reads.append(("slice", name, out.size))
                    return out

            return SliceSpy()

    monkeypatch.setattr(st, "safe_open", Spy)
    scene = build_scene(accumulated, NAMES, chunk_elements=500)
    assert len(scene) > 0
    assert reads == [] and len(opens) == 1  # the header only: values come through pread
    with AccumulatedFile(accumulated, chunk_elements=500) as f:
        whole = [f.blocks(name) for name in NAMES]
        [list(b) for b in whole]
    assert [r for r in reads if r[0] == "tensor"] == [("tensor", "model.layers.0.scale", [])]
    assert max(r[2] for r in reads if r[0] == "slice") <= 500
    reads.clear()
    opens.clear()
    with AccumulatedFile(accumulated, chunk_elements=500, remap_bytes=4000) as f:
        nbytes = sum(b.nbytes for _, _, b in f.blocks("model.layers.1.mlp.weight"))
    assert nbytes == 301 * 257 * 4
    blocks = 301  # one 257-value row (1028 bytes) per block: a reopen after every 4 blocks
    assert len(opens) == 1 + blocks // 4


def test_missing_tensor_and_integer_dtype_are_user_errors(tmp_path, accumulated):
    with pytest.raises(WdiffError, match="no tensor named 'nope'"):
        build_scene(accumulated, ["model.embed.weight", "nope"])
    bad = tmp_path / "accumulated.safetensors"
    safetensors.numpy.save_file({"w": np.zeros((2, 2), np.int32)}, str(bad))
    with pytest.raises(WdiffError, match="dtype I32, not float"):
        build_scene(bad)


# --- pooling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("budget", [40_000, 5_000, 600, 97, N_NONEMPTY])
def test_pooled_cells_match_numpy_reference(accumulated, tensors, pool, budget):
    scene = build_scene(accumulated, NAMES, max_points=budget, pool=pool, chunk_elements=333)
    s = scene.pool_factor
    assert s > 1 or budget == 40_000
    for k, name in enumerate(NAMES):
        grid = grid_of(tensors[name])
        p = scene.placements[k]
        if grid.size == 0:
            assert p.count == 0
            continue
        block = (1, s) if grid.shape[0] == 1 else (s, s)
        assert p.block == block
        expected = reference_pool(grid.astype(np.float64), block, pool)
        got = scene.cells(k)
        if pool == "max":
            np.testing.assert_array_equal(got, expected.astype(np.float32))
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_pooling_does_not_depend_on_how_blocks_are_cut(tensors):
    rng = np.random.default_rng(3)
    grid = grid_of(tensors["model.layers.1.mlp.weight"])
    for pool in ("max", "mean"):
        whole = GridPooler(*grid.shape, (7, 7), pool)
        whole.add(0, 0, grid)
        ragged = GridPooler(*grid.shape, (7, 7), pool)
        rows = np.unique(np.r_[0, rng.integers(1, grid.shape[0], 9), grid.shape[0]])
        cols = np.unique(np.r_[0, rng.integers(1, grid.shape[1], 9), grid.shape[1]])
        for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
            for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
                ragged.add(int(r0), int(c0), grid[r0:r1, c0:c1])
        np.testing.assert_allclose(ragged.result(), whole.result(), rtol=1e-6)


def test_non_finite_values_reach_their_cell_and_are_counted():
    grid = np.ones((10, 10), np.float32)
    grid[1, 1], grid[8, 9] = np.nan, np.inf
    for pool in ("max", "mean"):
        pooler = GridPooler(10, 10, (4, 4), pool)
        for r in range(0, 10, 3):  # blocks cut across cell boundaries
            pooler.add(r, 0, grid[r : r + 3])
        cells = pooler.result()
        assert pooler.nonfinite == 2
        assert np.isnan(cells[0, 0]) and np.isposinf(cells[2, 2])
        assert np.isfinite(np.delete(cells.ravel(), [0, 8])).all()


# --- budget --------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [N_NONEMPTY, N_NONEMPTY + 1, 50, 333, 1000, 5000, 98_765])
def test_point_budget_is_hard_and_the_factor_is_the_smallest_that_fits(accumulated, budget):
    scene = build_scene(accumulated, NAMES, max_points=budget)
    s = scene.pool_factor
    assert len(scene) == total_cells(s) <= budget
    assert s == 1 or total_cells(s - 1) > budget
    assert scene.xyz.shape == (len(scene), 3) and scene.xyz.dtype == np.float32
    assert scene.value.dtype == np.float32 and scene.tensor_index.dtype == np.int32


def test_budget_below_the_number_of_tensors_is_refused(accumulated):
    with pytest.raises(ValueError, match=f"non-empty tensors \\({N_NONEMPTY}\\)"):
        build_scene(accumulated, NAMES, max_points=N_NONEMPTY - 1)
    with pytest.raises(ValueError, match="smaller than the number"):
        pool_factor([(3, 3), (0, 5), (1, 1)], max_points=1)


# --- layout --------------------------------------------------------------------------------------


def test_layout_places_cells_at_block_centres_in_depth_order(accumulated, tensors):
    scene = build_scene(accumulated, NAMES, max_points=5000)
    s = scene.pool_factor
    assert s == 5  # total_cells(4) = 5600 would not fit
    z = [p.origin[2] for p in scene.placements]
    assert all(a >= b for a, b in zip(z, z[1:], strict=False)), "first tensor in front (z = 0)"
    assert z[0] == 0.0
    for k, p in enumerate(scene.placements):
        xyz = scene.xyz[p.start : p.start + p.count]
        assert (scene.tensor_index[p.start : p.start + p.count] == k).all()
        assert (xyz[:, 2] == np.float32(p.origin[2])).all()
        if not p.count:
            continue
        i, j = np.divmod(np.arange(p.count), p.grid[1])
        br, bc = p.block
        row_centre = (i * br + np.minimum((i + 1) * br, p.rows) - 1) / 2
        col_centre = (j * bc + np.minimum((j + 1) * bc, p.cols) - 1) / 2
        np.testing.assert_allclose(xyz[:, 0], p.origin[0] + col_centre, atol=1e-3)
        np.testing.assert_allclose(xyz[:, 1], p.origin[1] - row_centre, atol=1e-3)
        # true width and height: the cells span exactly the tensor's extent
        assert np.ptp(xyz[:, 0]) == pytest.approx(col_centre.max() - col_centre.min(), abs=1e-3)
    for b in scene.blocks:  # every slice centred on x = 0, top-aligned at y = 0
        assert b.frame[0] == pytest.approx(-b.frame[1])
        tops = [scene.placements[k].bounds[2] for k in range(b.first, b.end) if scene.placements[k].count]
        assert max(tops) == pytest.approx(0.0)
    by_name = dict(zip(NAMES, scene.placements, strict=True))
    assert by_name["model.layers.0.scale"].count == 1
    assert by_name["model.layers.1.empty"].count == 0
    assert by_name["model.layers.0.attn.q.bias"].grid == (1, 9)  # 41 values in 1 x 5 blocks
    assert by_name["model.layers.0.attn.q.bias"].block == (1, 5)
    assert by_name["model.layers.0.conv.weight"].grid == (2, 15)  # 6 x 75 in 5 x 5 blocks


def test_one_slice_per_block_with_gaps_and_a_sensible_box(accumulated):
    scene = build_scene(accumulated, NAMES)
    labels = [b.label for b in scene.blocks]
    # embed (embedding) | layers.0 | layers.1 | head (a head) | long (unknown, its own block)
    assert labels == ["model.embed", "model.layers.0", "model.layers.1", "model.head", "model.long"]
    z = [b.z for b in scene.blocks]
    assert z[0] == 0 and all(a > b for a, b in zip(z, z[1:]))
    for k, b in enumerate(scene.blocks):
        members = scene.placements[b.first : b.end]
        assert {p.origin[2] for p in members} == {b.z} and {p.slice for p in members} == {k}
        left, right, top, bottom = b.frame
        for p in members:
            if p.count:  # every tensor inside its frame
                pl, pr, pt, pb = p.bounds
                assert left < pl and pr < right and pb > bottom and pt < top
        shown = [p.bounds for p in members if p.count]
        for i, u in enumerate(shown):  # tensors of a block never overlap
            for v in shown[i + 1 :]:
                assert u[1] <= v[0] or v[1] <= u[0] or u[3] >= v[2] or v[3] >= u[2]
    extent = np.ptp(scene.xyz, axis=0)
    assert 0.5 < extent[2] / max(extent[0], extent[1]) < 3.5  # a box, not a needle or a pancake


def test_layout_is_deterministic_and_independent_of_chunking(accumulated):
    a = build_scene(accumulated, NAMES, max_points=2000, chunk_elements=50)
    b = build_scene(accumulated, NAMES, max_points=2000)
    assert a.placements == b.placements and a.names == b.names == tuple(NAMES)
    for field in ("xyz", "value", "tensor_index"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert not a.xyz.flags.writeable


def test_default_order_is_network_order(accumulated):
    scene = build_scene(accumulated)
    assert scene.names[:3] == (
        "model.embed.weight",
        "model.layers.0.attn.q.bias",
        "model.layers.0.attn.q.weight",
    )
    assert scene.names[-1] == "model.head.weight"


def test_locate_maps_a_point_back_to_its_weights(accumulated, tensors):
    scene = build_scene(accumulated, NAMES, max_points=800)
    for point in np.random.default_rng(0).integers(0, len(scene), 50):
        name, (r0, r1), (c0, c1) = scene.locate(int(point))
        assert scene.value[point] == grid_of(tensors[name])[r0:r1, c0:c1].max()


def test_a_tall_tensor_is_folded_into_panels_that_keep_its_area(tmp_path):
    rng = np.random.default_rng(1)
    tall = rng.random((4000, 20), dtype=np.float32)
    path = tmp_path / "accumulated.safetensors"
    safetensors.numpy.save_file({"emb.weight": tall, "l.0.w": rng.random((20, 40), np.float32)}, path)
    scene = build_scene(path, ["emb.weight", "l.0.w"], max_points=20_000)
    p = scene.placements[0]
    assert p.panels == 14 and p.panel_rows % p.block[0] == 0  # sqrt(4000 / 20) ~ 14 panels
    xyz = scene.xyz[: p.count]
    assert 0.5 < np.ptp(xyz[:, 0]) / np.ptp(xyz[:, 1]) < 2.0  # about square
    for point in (0, 57, p.count - 1):
        name, (r0, r1), (c0, c1) = scene.locate(point)
        centre = p.position((r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2)
        np.testing.assert_allclose(xyz[point], centre, atol=1e-3)
    assert scene.placements[1].panels == 1


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_coarsening_equals_pooling_from_the_file(accumulated, pool):
    fine = build_scene(accumulated, NAMES, max_points=20_000, pool=pool)
    for budget in (3000, 400):
        direct = build_scene(accumulated, NAMES, max_points=budget, pool=pool)
        coarse = coarsen_scene(fine, budget)
        assert coarse.pool_factor % fine.pool_factor == 0
        if coarse.pool_factor == direct.pool_factor:
            np.testing.assert_allclose(coarse.value, direct.value, rtol=1e-6)
            np.testing.assert_array_equal(coarse.xyz, direct.xyz)
        else:
            assert len(coarse) <= budget
        for k, p in enumerate(coarse.placements):  # either way: the reference pooling
            if p.count:
                grid = grid_of(build_scene(accumulated, [p.name], 10**6).cells(0))
                np.testing.assert_allclose(coarse.cells(k), reference_pool(grid, p.block, pool), rtol=1e-6)


# --- colour --------------------------------------------------------------------------------------


def test_a_narrow_spread_puts_typical_change_mid_scale():
    """Every healthy tensor moved about the same (0.01 +- 10%), a few cells moved 0.1 and a frozen part 0:
    the bottom of the scale is a decade below the median, so the frozen part (bottom colour) and the
    typical change (about half way up) differ, as they did not with the 1st percentile (0.0085)."""
    rng = np.random.default_rng(2)
    values = np.r_[rng.uniform(0.009, 0.011, 10_000), np.full(10, 0.1), np.zeros(500)].astype(np.float32)
    _, cs = colorize(values)
    assert cs.vmin == pytest.approx(
        np.median(values[values > 0]) / 10, rel=1e-6
    ) and cs.vmax == pytest.approx(0.1)
    from wdiff.scene.color import normalize

    t = normalize(np.array([0.0, 0.01, 0.1], np.float32), cs)
    assert t[0] == 0 and 0.45 < t[1] < 0.55 and t[2] == 1


def test_log_colours_follow_matplotlib_and_flag_non_finite():
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    rng = np.random.default_rng(5)
    values = np.r_[rng.lognormal(-6, 2, 5000), 0.0, 0.0, np.nan, np.inf].astype(np.float32)
    rgb, cs = colorize(values)
    positive = values[np.isfinite(values) & (values > 0)]
    assert cs.scale == "log" and cs.vmax == positive.max()
    assert cs.vmin == pytest.approx(min(np.percentile(positive, 1.0), np.median(positive) / 10))
    assert rgb.dtype == np.uint8 and rgb.shape == (values.size, 3)
    cmap = matplotlib.colormaps["viridis"]
    inside = np.isfinite(values) & (values >= cs.vmin)
    expected = cmap(LogNorm(cs.vmin, cs.vmax)(values[inside]), bytes=True)[:, :3]
    np.testing.assert_array_equal(rgb[inside], expected)
    bottom = cmap(0.0, bytes=True)[:3]
    assert (rgb[np.isfinite(values) & (values < cs.vmin)] == bottom).all()  # zeros included
    assert (rgb[-2:] == color_mod.FLAG_RGB).all()
    assert not (cmap(np.linspace(0, 1, 256), bytes=True)[:, :3] == color_mod.FLAG_RGB).all(1).any()

    rgb, cs = colorize(values, scale="linear")
    assert (cs.vmin, cs.vmax) == (0.0, float(np.nanmax(values[np.isfinite(values)])))
    finite = np.isfinite(values)
    expected = cmap(Normalize(cs.vmin, cs.vmax)(values[finite]), bytes=True)[:, :3]
    np.testing.assert_array_equal(rgb[finite], expected)


def test_colour_scale_survives_degenerate_values():
    for values in (np.zeros(4, np.float32), np.full(3, np.nan, np.float32), np.ones(5, np.float32)):
        rgb, cs = colorize(values)
        assert 0 < cs.vmin < cs.vmax
        assert rgb.shape == (values.size, 3)
    with pytest.raises(ValueError, match="scale must be one of"):
        colorize(np.ones(2, np.float32), scale="sqrt")


# --- PLY -----------------------------------------------------------------------------------------

GOLDEN_HEADER = (
    b"ply\n"
    b"format binary_little_endian 1.0\n"
    b"comment wdiff accumulated weight change sum_t |W(t+1)-W(t)|, one point per pooled cell\n"
    b"element vertex 3\n"
    b"property float x\n"
    b"property float y\n"
    b"property float z\n"
    b"property uchar red\n"
    b"property uchar green\n"
    b"property uchar blue\n"
    b"property float quality\n"
    b"property float scalar_accumulated\n"
    b"end_header\n"
)


def test_ply_header_is_golden_and_records_are_packed(tmp_path, accumulated):
    assert ply_header(3) == GOLDEN_HEADER
    assert VERTEX_DTYPE.itemsize == 23
    scene = build_scene(accumulated, NAMES, max_points=3 * N_NONEMPTY)
    colors = colorize(scene.value)
    path = tmp_path / "points.ply"
    write_points_ply(scene, colors, path)
    data = path.read_bytes()
    header = ply_header(len(scene))
    assert data.startswith(header) and len(data) == len(header) + 23 * len(scene)
    first = np.frombuffer(data, dtype=VERTEX_DTYPE, count=1, offset=len(header))[0]
    assert tuple(first)[:3] == tuple(scene.xyz[0]) and first[6] == first[7] == scene.value[0]


def test_ply_reads_back_with_plyfile_and_open3d(tmp_path, accumulated):
    plyfile = pytest.importorskip("plyfile")
    import open3d as o3d

    scene = build_scene(accumulated, NAMES, max_points=4000)
    rgb, _ = colorize(scene.value)
    path = tmp_path / "points.ply"
    path.write_bytes(b"old")  # replaced atomically
    write_points_ply(scene, rgb, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["points.ply"]  # no temporary left

    vertex = plyfile.PlyData.read(str(path))["vertex"]
    assert vertex.count == len(scene)
    np.testing.assert_array_equal(np.c_[vertex["x"], vertex["y"], vertex["z"]], scene.xyz)
    np.testing.assert_array_equal(np.c_[vertex["red"], vertex["green"], vertex["blue"]], rgb)
    np.testing.assert_array_equal(vertex["scalar_accumulated"], scene.value)
    np.testing.assert_array_equal(vertex["quality"], scene.value)

    cloud = o3d.io.read_point_cloud(str(path))
    np.testing.assert_allclose(np.asarray(cloud.points), scene.xyz, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(cloud.colors) * 255, rgb, atol=1e-6)


def test_ply_writer_refuses_mismatched_inputs(tmp_path, accumulated):
    scene = build_scene(accumulated, NAMES, max_points=100)
    with pytest.raises(ValueError, match="must both be"):
        write_points_ply(scene, np.zeros((len(scene) - 1, 3), np.uint8), tmp_path / "p.ply")
    with pytest.raises(ValueError, match="uint8"):
        write_points_ply(scene, np.zeros((len(scene), 3), np.float32), tmp_path / "p.ply")
    assert list(tmp_path.iterdir()) == []


# --- picture -------------------------------------------------------------------------------------


def test_importing_the_scene_stays_light():
    code = "import sys, wdiff.scene; print(sorted({'open3d', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_render_shows_the_whole_model_in_colormap_colours(tmp_path, capfd):
    import matplotlib
    import matplotlib.image

    from wdiff.scene import render

    rng = np.random.default_rng(2)
    hot = rng.gamma(2.0, 1e-3, (64, 96)).astype(np.float32)
    hot[:8, :8] = 1.0  # where change concentrates
    hot[40, 50] = np.nan
    tensors = {f"h.{k}.w": hot * (k + 1) for k in range(3)} | {"h.2.b": np.zeros(96, np.float32)}
    path = tmp_path / "accumulated.safetensors"
    safetensors.numpy.save_file(tensors, path)
    scene = build_scene(path, list(tensors))
    colors = colorize(scene.value)
    png = tmp_path / "render.png"
    width, height = 640, 420
    render_scene(scene, png, title="three layers", size=(width, height), color_scale=colors.scale)

    assert capfd.readouterr().out == ""  # Filament's banner does not reach stdout
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (height, width)
    top, bottom = 40, 22  # title band, footer band
    view = (image[top : height - bottom, : width - 170, :3] * 255).round().astype(np.uint8)
    background = np.round(np.array(render.BACKGROUND) * 255).astype(np.uint8)
    lit = np.abs(view.astype(int) - background).sum(axis=2) > 3
    assert 0.15 < lit.mean() < 0.9
    # the whole model is in the frame: nothing touches the border of the 3D view
    assert not lit[0].any() and not lit[-1].any() and not lit[:, 0].any() and not lit[:, -1].any()
    # pixels carry exact colormap colours (unlit, no tone mapping), many distinct ones
    lut = matplotlib.colormaps["viridis"](np.arange(256), bytes=True)[:, :3]
    codes = view[lit].astype(np.int64) @ [65536, 256, 1]
    lut_codes = lut.astype(np.int64) @ [65536, 256, 1]
    present = np.isin(lut_codes, codes)
    assert present.sum() >= 40
    assert present[-8:].any(), "the hot corner shows at the top of the scale"
    flag = np.int64(np.dot(color_mod.FLAG_RGB, [65536, 256, 1]))
    assert (codes == flag).any(), "NaN cells show in the flag colour"


def test_camera_projection_matches_open3d():
    import open3d as o3d
    from open3d.visualization import rendering

    from wdiff.scene import render

    points = np.array([[-40.0, 5, 0], [40, 5, 0], [-40, -30, -90], [40, -30, -90]])
    camera = render.fit_camera(points, 1.5)
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    cam = rendering.Camera  # a camera object needs an engine: take the renderer's
    with render._quiet_native_stdout():
        renderer = rendering.OffscreenRenderer(150, 100)
    view = renderer.scene.camera
    view.set_projection(camera.fov_deg, 1.5, camera.near, camera.far, cam.FovType.Vertical)
    view.look_at(camera.center, camera.eye, camera.up)
    clip = (np.asarray(view.get_projection_matrix()) @ np.asarray(view.get_view_matrix())) @ np.c_[
        points, np.ones(4)
    ].T
    ndc = clip[:3] / clip[3]
    expected = np.c_[(ndc[0] + 1) / 2 * 150, (1 - ndc[1]) / 2 * 100]
    np.testing.assert_allclose(camera.project(points, 150, 100), expected, atol=1e-3)
    assert (np.abs(ndc[:2]) <= 1).all() and np.abs(ndc[:2]).max() > 0.85  # fits, snugly
    del renderer


def test_render_scene_accepts_colors_from_colorize(tmp_path, accumulated):
    scene = build_scene(accumulated, NAMES, max_points=2000)
    colors = colorize(scene.value, scale="linear")
    assert isinstance(colors, Colors)
    write_points_ply(scene, colors, tmp_path / "points.ply")  # Colors or a bare array
    with pytest.raises(ValueError, match="too small"):
        render_scene(scene, tmp_path / "r.png", size=(200, 100))


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("shape, block", [((301, 257), (7, 7)), ((50_001,), (1, 13)), ((9, 5, 3, 3), (4, 4))])
def test_pooling_kernel_equals_the_grid_pooler(tmp_path, pool, shape, block):
    """The file-reading kernel (the hot path) against the numpy pooler, across 64 KiB read pieces,
    with NaN and Inf planted."""
    rng = np.random.default_rng(7)
    values = rng.random(shape, dtype=np.float32)
    flat = values.reshape(-1)
    flat[[5, 20_000 % flat.size, flat.size - 1]] = [np.nan, np.inf, np.nan]
    path = tmp_path / "acc.safetensors"
    safetensors.numpy.save_file({"w": values}, str(path))
    with AccumulatedFile(path) as f:
        info = f.info("w")
        cells, bad = f.pooled("w", block, pool)
        reference = GridPooler(info.rows, info.cols, block, pool)
        for row, col, piece in f.blocks("w"):
            reference.add(row, col, piece)
    assert bad == reference.nonfinite == 3
    np.testing.assert_allclose(cells, reference.result(), rtol=1e-6, equal_nan=True)
