"""The 3D outputs built on the scene: architecture-aware order and layout, per-tensor colours,
mesh.ply, views, the film, scene.html in a real headless Chromium, ``wdiff view`` and the options.

End to end on the shipped GPT-2 sample run (tied embeddings, a cosine learning-rate schedule that
decays to zero at the last checkpoint), so the pictures are checked on real training data.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import wdiff
from wdiff.errors import WdiffError
from wdiff.naming import BODY, EMBEDDING, HEAD, network_order, role_of
from wdiff.scene import SceneOptions, build_scene, colorize_scene, render
from wdiff.scene.color import lookup_table
from wdiff.scene.film import interval_scenes, write_film
from wdiff.scene.layout import Scene
from wdiff.scene.mesh import fit, height_field, vertex_count
from wdiff.scene.ply import FACE_DTYPE, MESH_VERTEX_DTYPE, ply_header, write_mesh_ply

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


# --- order and layout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, expected",
    [
        (  # GPT-2: wte/wpe sort after h.* by name; ln_f before the head it feeds
            [
                "lm_head.weight",
                "transformer.h.10.mlp.c_fc.weight",
                "transformer.h.2.attn.c_attn.weight",
                "transformer.ln_f.weight",
                "transformer.wpe.weight",
                "transformer.wte.weight",
            ],
            [
                "transformer.wpe.weight",
                "transformer.wte.weight",
                "transformer.h.2.attn.c_attn.weight",
                "transformer.h.10.mlp.c_fc.weight",
                "transformer.ln_f.weight",
                "lm_head.weight",
            ],
        ),
        (  # BERT: the layer's own "output" stays in the body; pooler and classifier are heads
            [
                "classifier.weight",
                "bert.pooler.dense.weight",
                "bert.encoder.layer.0.output.dense.weight",
                "bert.embeddings.word_embeddings.weight",
            ],
            [
                "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.output.dense.weight",
                "bert.pooler.dense.weight",
                "classifier.weight",
            ],
        ),
        (  # Llama
            [
                "lm_head.weight",
                "model.norm.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.embed_tokens.weight",
            ],
            [
                "model.embed_tokens.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.norm.weight",
                "lm_head.weight",
            ],
        ),
        (  # CNN: "classifier" sorts before "features" by name
            ["classifier.1.weight", "features.3.weight", "features.0.weight"],
            ["features.0.weight", "features.3.weight", "classifier.1.weight"],
        ),
        (  # T5: encoder before decoder; unknown names keep natural order
            [
                "decoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "shared.weight",
                "lm_head.weight",
            ],
            [
                "shared.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "decoder.block.0.layer.0.SelfAttention.q.weight",
                "lm_head.weight",
            ],
        ),
        (["fc10.weight", "fc2.weight", "fc1.weight"], ["fc1.weight", "fc2.weight", "fc10.weight"]),
    ],
)
def test_network_order_puts_embeddings_first_and_heads_last(names, expected):
    assert network_order(names) == expected
    assert network_order(list(reversed(expected))) == expected


def test_roles():
    assert role_of("gpt_neox.embed_in.weight") == EMBEDDING
    assert role_of("embed_out.weight") == HEAD  # GPT-NeoX's output layer
    assert role_of("model.layers.3.mlp.down_proj.weight") == BODY
    assert role_of("bert.encoder.layer.0.output.LayerNorm.weight") == BODY


CNN = {  # a small VGG-like CNN: conv kernels (out, in, kh, kw), then a classifier
    "features.0.weight": (16, 3, 3, 3),
    "features.0.bias": (16,),
    "features.3.weight": (32, 16, 3, 3),
    "features.3.bias": (32,),
    "classifier.1.weight": (10, 512),
    "classifier.1.bias": (10,),
}


def _save(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {n: rng.gamma(1.5, 1e-3, s).astype(np.float32) for n, s in shapes.items()}
    safetensors.numpy.save_file(tensors, path)
    return path


def test_cnn_layout_kernels_as_out_by_in_khkw_blocks_in_order(tmp_path):
    path = _save(tmp_path / "accumulated.safetensors", CNN)
    scene = build_scene(path)  # default: network order
    assert [b.label for b in scene.blocks] == ["features.0", "features.3", "classifier.1"]
    conv = scene.placements[scene.names.index("features.3.weight")]
    assert (conv.rows, conv.cols) == (32, 16 * 3 * 3)
    # the bias is a strip under its kernel, same left edge, inside the block's frame
    bias = scene.placements[scene.names.index("features.3.bias")]
    assert bias.bounds[0] == conv.bounds[0] and bias.bounds[2] < conv.bounds[3]
    assert bias.origin[2] == conv.origin[2] == scene.blocks[1].z < scene.blocks[0].z


def test_tensors_of_a_block_stand_side_by_side_at_true_size(tmp_path):
    shapes = {
        f"model.layers.0.{m}.weight": s
        for m, s in [("q", (64, 64)), ("k", (16, 64)), ("v", (16, 64)), ("o", (64, 64)), ("up", (128, 64))]
    }
    scene = build_scene(_save(tmp_path / "accumulated.safetensors", shapes), list(shapes))
    assert len(scene.blocks) == 1
    boxes = [p.bounds for p in scene.placements]
    assert all(b[2] == 0.0 for b in boxes)  # top-aligned
    assert all(a[1] < b[0] for a, b in zip(boxes, boxes[1:]))  # left to right, in order
    assert [b[2] - b[3] for b in boxes] == [64, 16, 16, 64, 128]  # true heights


def test_modules_of_a_block_follow_the_data_flow(tmp_path):
    flow = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    shapes = {f"model.layers.0.{m}.weight": (8,) if "norm" in m else (8, 8) for m in flow}
    scene = build_scene(_save(tmp_path / "accumulated.safetensors", shapes))  # names sorted as text
    assert scene.names[0] == "model.layers.0.input_layernorm.weight"
    reading = sorted(scene.placements, key=lambda p: (-p.bounds[2], p.bounds[0]))  # shelf by shelf
    assert [p.name.removeprefix("model.layers.0.").removesuffix(".weight") for p in reading] == flow


def test_a_very_wide_block_wraps_onto_shelves(tmp_path):
    shapes = {f"l.0.m{k}.weight": (8, 64) for k in range(12)}  # 12 x 64 wide, 8 tall
    scene = build_scene(_save(tmp_path / "accumulated.safetensors", shapes))
    left, right, top, bottom = scene.blocks[0].frame
    assert (right - left) / (top - bottom) < 6.5
    assert len({p.origin[1] for p in scene.placements}) > 1


def test_layout_is_deterministic(tmp_path):
    path = _save(tmp_path / "accumulated.safetensors", CNN)
    a, b = build_scene(path, max_points=300), build_scene(path, max_points=300)
    assert a.blocks == b.blocks and a.placements == b.placements
    assert a.xyz.tobytes() == b.xyz.tobytes() and a.value.tobytes() == b.value.tobytes()


# --- colours -------------------------------------------------------------------------------------


def test_per_tensor_normalisation_gives_every_tensor_the_top_colour(tmp_path):
    shapes = {"a.0.w": (20, 20), "a.1.w": (20, 20)}
    path = tmp_path / "accumulated.safetensors"
    small = np.full((20, 20), 1e-6, np.float32)
    small[3, 4] = 2e-6
    safetensors.numpy.save_file({"a.0.w": np.ones((20, 20), np.float32), "a.1.w": small}, path)
    scene = build_scene(path, list(shapes))
    top = tuple(lookup_table()[-1])
    rgb, cs = colorize_scene(scene, "linear", "tensor")
    assert cs.peaks == (1.0, pytest.approx(2e-6)) and "per tensor" in cs.label
    hot = scene.placements[1].start + 3 * 20 + 4
    np.testing.assert_array_equal(rgb[hot], rgb[0])  # both tensors' maxima share the top colour
    rgb_global, cs_global = colorize_scene(scene, "linear", "global")
    assert "global" in cs_global.label
    assert tuple(rgb_global[hot]) != tuple(rgb_global[0]) and tuple(rgb_global[0]) == top


def test_relative_normalisation_divides_by_each_tensors_rms(tmp_path):
    """A norm scale (values near 1) moving 0.01 and a matrix (values near 0.02) moving 0.002: globally
    the scale is brightest; relative to their sizes the matrix moved 10% and the scale 1%."""
    path = tmp_path / "accumulated.safetensors"
    acc = {
        "m.0.norm.weight": np.full((1, 64), 0.01, np.float32),
        "m.0.w": np.full((32, 32), 0.002, np.float32),
    }
    safetensors.numpy.save_file(acc, path)
    scene = build_scene(path, list(acc))
    sizes = {"m.0.norm.weight": 1.0, "m.0.w": 0.02}
    rgb, cs = colorize_scene(scene, "linear", "relative", sizes)
    assert (
        cs.peaks == (1.0, 0.02) and "RMS of its tensor's W(0)" in cs.label and cs.vmax == pytest.approx(0.1)
    )
    shown = cs.relative(scene.value, scene.tensor_index)
    np.testing.assert_allclose(shown, np.where(scene.tensor_index == 0, 0.01, 0.1), rtol=1e-6)
    top = tuple(lookup_table()[-1])
    assert tuple(rgb[scene.placements[1].start]) == top and tuple(rgb[0]) != top
    rgb_global, _ = colorize_scene(scene, "linear", "global")
    assert tuple(rgb_global[0]) == top  # globally the other way round
    with pytest.raises(ValueError, match="needs the RMS"):
        colorize_scene(scene, "linear", "relative")


def test_a_run_with_relative_colours_records_it(tmp_path):
    from factories import trainer_run

    import wdiff

    rng = np.random.default_rng(1)
    seq = [
        {
            "a.0.w": rng.standard_normal((8, 8)).astype(np.float32) * s,
            "a.0.norm.weight": np.ones(8, np.float32) * s,
        }
        for s in (1, 1.1, 1.2)
    ]
    res = wdiff.run(
        trainer_run(tmp_path / "run", seq, [1, 2, 3]),
        tmp_path / "out",
        scene=SceneOptions(normalize="relative", render=False, frames=True),
    )
    assert res.summary["scene"]["normalize"] == "relative"
    assert "frames.gif" in res.summary["scene"]["files"]  # the film's scale divides by the sizes too
    from wdiff.scene import tensor_sizes

    sizes = tensor_sizes(res.summary)
    assert sizes["a.0.norm.weight"] == pytest.approx(1.0) and sizes["a.0.w"] == pytest.approx(
        float(np.sqrt((seq[0]["a.0.w"] ** 2).mean())), rel=1e-5
    )


# --- mesh ----------------------------------------------------------------------------------------


def test_mesh_faces_are_valid_and_read_back_by_plyfile(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    tall = {"emb.weight": (4000, 20), "l.0.w": (20, 40), "l.0.b": (40,), "l.1.w": (1, 1)}
    scene = build_scene(_save(tmp_path / "accumulated.safetensors", tall), list(tall), max_points=20_000)
    assert scene.placements[0].panels > 1  # a folded tensor: panels must not be joined
    colors = colorize_scene(scene)
    shown = fit(scene, 20_000)
    vertices, triangles = height_field(shown, colors.scale)
    assert len(vertices) == vertex_count(shown) <= 20_000
    path = tmp_path / "mesh.ply"
    write_mesh_ply(path, vertices, triangles)
    data = plyfile.PlyData.read(str(path))
    v, f = data["vertex"], data["face"]
    assert v.count == len(vertices) and f.count == len(triangles)
    faces = np.stack(f["vertex_indices"])
    assert faces.shape == (len(triangles), 3) and faces.min() >= 0 and faces.max() < v.count
    np.testing.assert_array_equal(faces, triangles)
    assert len(np.unique(np.sort(faces, axis=1), axis=0)) == len(faces)  # no duplicate triangle
    for channel in ("red", "green", "blue"):
        assert v[channel].dtype == np.uint8
    np.testing.assert_array_equal(v["quality"], v["scalar_accumulated"])
    # every triangle is small: no edge spans two panels or two tensors
    xyz = np.c_[v["x"], v["y"]]
    edge = np.linalg.norm(xyz[faces[:, 0]] - xyz[faces[:, 2]], axis=1)
    assert edge.max() < 3 * shown.pool_factor * math.sqrt(2) + 1
    # one quad = two triangles per pair of neighbouring cells, per tensor
    expected = 0
    for p in shown.placements:
        r, c = max(p.grid[0], 2), max(p.grid[1], 2)
        joins = r - 1
        if p.panels > 1:
            joins -= p.panels - 1
        expected += 2 * joins * (c - 1)
    assert len(triangles) == expected
    # height follows the colour scale: the hottest cell stands highest in its slice
    hottest = int(np.nanargmax(v["quality"]))
    z0 = scene.placements[0].origin[2]
    assert v["z"][hottest] == pytest.approx(max(v["z"][np.isclose(v["quality"], v["quality"][hottest])]))
    assert v["z"].min() >= min(p.origin[2] for p in shown.placements) - 1e-3 and z0 == 0.0


def test_mesh_header_is_golden_and_open3d_reads_the_colours(tmp_path):
    import open3d as o3d

    assert ply_header(2, MESH_VERTEX_DTYPE, 1, "c") == (
        b"ply\nformat binary_little_endian 1.0\ncomment c\nelement vertex 2\n"
        b"property float x\nproperty float y\nproperty float z\n"
        b"property uchar red\nproperty uchar green\nproperty uchar blue\n"
        b"property float quality\nproperty float scalar_accumulated\n"
        b"element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    )
    assert FACE_DTYPE.itemsize == 13
    scene = build_scene(_save(tmp_path / "accumulated.safetensors", CNN))
    vertices, triangles = height_field(scene, colorize_scene(scene).scale)
    write_mesh_ply(tmp_path / "mesh.ply", vertices, triangles)
    mesh = o3d.io.read_triangle_mesh(str(tmp_path / "mesh.ply"))
    assert len(mesh.triangles) == len(triangles) and mesh.has_vertex_colors()
    np.testing.assert_allclose(
        np.asarray(mesh.vertex_colors) * 255,
        np.c_[vertices["red"], vertices["green"], vertices["blue"]],
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="out of range"):
        write_mesh_ply(tmp_path / "bad.ply", vertices, np.array([[0, 1, len(vertices)]]))
    assert not (tmp_path / "bad.ply").exists()


def test_mesh_budget_too_small_is_refused(tmp_path):
    scene = build_scene(_save(tmp_path / "accumulated.safetensors", CNN), max_points=6)
    with pytest.raises(ValueError, match="too small for a mesh"):
        fit(scene, 6)
    assert vertex_count(fit(scene, 24)) <= 24


# --- the film ------------------------------------------------------------------------------------


def _synthetic_film(tmp_path: Path) -> tuple[list[str], Scene]:
    """Frames whose change halves each interval (4 intervals) written with ``write_film``."""
    from safetensors.numpy import save_file

    shapes = {"h.0.w": (24, 40), "h.1.w": (24, 40), "h.1.b": (40,)}
    path = _save(tmp_path / "accumulated.safetensors", shapes)
    scene = build_scene(path, list(shapes))
    rng = np.random.default_rng(4)
    grid = {n: (1 if len(s) == 1 else s[0], s[-1]) for n, s in shapes.items()}
    frames = {
        n: np.stack([rng.uniform(0.5, 1, g) * 0.5**t for t in range(4)]).astype(np.float32)
        for n, g in grid.items()
    }
    save_file(
        frames,
        str(tmp_path / "frames.safetensors"),
        {"pool": "max", "blocks": '{"h.0.w": [1, 1], "h.1.w": [1, 1], "h.1.b": [1, 1]}'},
    )
    scenes = interval_scenes(frames, scene, "max", 1)
    assert len(scenes) == 4 and all(s.blocks == scene.blocks for s in scenes)
    options = SceneOptions(size=(480, 320), color_scale="linear")
    written = write_film(
        tmp_path, tmp_path / "frames.safetensors", scene, "synthetic", [10, 20, 30, 40, 50], options
    )
    return written, scene


def test_film_frames_share_camera_and_scale_and_fade(tmp_path):
    """Synthetic frames whose change halves each interval: the GIF has one frame per interval, the
    same scale for all (so later frames are darker) and the step printed in each."""
    import imageio.v3 as iio

    written, _ = _synthetic_film(tmp_path)
    assert written[0] == "frames.gif"
    gif = iio.imread(tmp_path / "frames.gif", index=None)
    assert gif.shape == (4, 320, 480, 3)
    view = gif[:, 40:-22, :-170].astype(int)
    background = np.round(np.array(render.BACKGROUND) * 255).astype(int)
    lit = np.abs(view - background).sum(axis=3) > 30
    assert all(0.05 < m < 0.9 for m in lit.mean(axis=(1, 2)))  # every frame shows the model
    brightness = [view[t][lit[t]].mean() for t in range(4)]
    assert brightness == sorted(brightness, reverse=True)  # one scale for all: the change fades
    assert not (gif[0] == gif[1]).all()
    if "frames.mp4" in written:
        assert (tmp_path / "frames.mp4").stat().st_size > 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_worker_drops_its_renderer_after_the_film(tmp_path):
    """The worker keeps its renderer between pictures, and the renderer grows with every frame it
    draws: after the film's last frame the worker drops it and hands its memory back, instead of
    holding it while this process encodes the GIF and the MP4 (and, in ``wdiff watch``, until the
    next update)."""
    from wdiff import worker

    worker.shared().kill()  # a fresh worker: its peak is this film's
    worker.warm()  # Open3D loaded, no renderer yet
    pid = worker.shared().submit(os.getpid).result()
    loaded = _rss_kib(pid)
    _synthetic_film(tmp_path)
    after = _rss_kib(pid)
    # KiB: a renderer kept after these 4 frames holds about 170 MiB; what stays once it is dropped
    # (pages of the libraries it used, Mesa's compiled shaders) about 80 MiB
    assert after - loaded < 128 * 1024


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_compose_puts_the_render_in_unchanged_and_stays_within_its_memory(tmp_path):
    """The render goes into the picture pixel for pixel, below the title; and matplotlib is handed
    opaque RGBA, which it resamples in float32, not RGB, which it resamples in float64 (85 MiB at
    the default size)."""
    import tracemalloc

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (738, 1110, 3), dtype=np.uint8)
    cs = colorize_scene(build_scene(_save(tmp_path / "a.safetensors", {"w": (8, 8)})), "log").scale
    render.compose(image, cs, size=(1280, 800), top=40, title="t", footer="f")  # matplotlib's caches
    tracemalloc.start()
    try:
        picture = render.compose(image, cs, size=(1280, 800), top=40, title="a title", footer="a footer")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(picture[40 : 40 + 738, :1110], image)
    assert peak < 64 * 2**20


# --- end to end on the sample run ----------------------------------------------------------------


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_pool_kind_reaches_compute_scene_and_frames(tmp_path, pool):
    """``--pool mean`` is pooled on the way by compute (pooled.safetensors, frames.safetensors) and
    equals pooling the results file with numpy; the point budget holds for every output."""
    import plyfile
    from factories import random_sequence, trainer_run

    shapes = {"model.layers.0.w": (30, 41), "model.layers.0.b": (41,), "model.layers.1.w": (17, 9)}
    seq = random_sequence(shapes, 4, seed=3)
    run = trainer_run(tmp_path / "run", seq, steps=[1, 2, 3, 4])
    options = SceneOptions(
        max_points=120,
        pool=pool,
        frames=True,
        mesh=True,
        render=False,
        html_points=50,
        size=(400, 300),
        frame_points=60,
    )
    res = wdiff.run(run, tmp_path / "out", scene=options)
    out = tmp_path / "out"
    s = res.summary["scene"]["pool_factor"]
    assert s > 1 and res.summary["scene"]["points"] <= 120
    scene = build_scene(out / "accumulated.safetensors", res.names, max_points=120, pool=pool)
    reduce = np.max if pool == "max" else np.mean
    for k, name in enumerate(res.names):
        grid = res.accumulated(name).reshape(1 if len(shapes[name]) == 1 else shapes[name][0], -1)
        block = (1, s) if grid.shape[0] == 1 else (s, s)
        expected = np.array(
            [
                [reduce(grid[i : i + block[0], j : j + block[1]]) for j in range(0, grid.shape[1], block[1])]
                for i in range(0, grid.shape[0], block[0])
            ]
        )
        np.testing.assert_allclose(scene.cells(k), expected, rtol=1e-5)
        frames = res.frames(name)
        assert frames.shape[0] == 3
        diff = np.abs(seq[1][name].astype(np.float64) - seq[0][name]).reshape(grid.shape)
        fs = res.frame_info()["blocks"][name][1]
        first = reduce(diff[: (1 if grid.shape[0] == 1 else fs), :fs])
        np.testing.assert_allclose(frames[0, 0, 0], first, rtol=1e-4)
    assert plyfile.PlyData.read(str(out / "mesh.ply"))["vertex"].count <= 120
    assert res.frame_info()["pool"] == pool
    assert sum(res.frames(n)[0].size for n in res.names) <= 60  # the film's own budget


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "out"
    options = SceneOptions(
        size=(640, 400),
        views=("oblique", "back"),
        mesh=True,
        frames=True,
        max_points=20_000,
        html_points=5_000,
    )
    return wdiff.run(SAMPLES / "digits-gpt2", out, scene=options), out


def test_sample_run_writes_every_output_within_its_budget(gpt2):
    import imageio.v3 as iio
    import matplotlib.image
    import plyfile

    res, out = gpt2
    scene = res.summary["scene"]
    video = ["frames.mp4"] if (out / "frames.mp4").exists() else []
    assert scene["files"] == [
        "points.ply",
        "render.png",
        "render-back.png",
        "mesh.ply",
        "frames.gif",
        *video,
        "scene.html",
    ]
    assert all((out / name).is_file() for name in scene["files"])
    assert scene["blocks"][0] == "transformer.wpe + transformer.wte"
    assert scene["blocks"][-1] == "transformer.ln_f"
    assert [b.split(".")[-1] for b in scene["blocks"][1:-1]] == ["0", "1", "2", "3"]
    points = plyfile.PlyData.read(str(out / "points.ply"))["vertex"].count
    mesh = plyfile.PlyData.read(str(out / "mesh.ply"))
    assert points == scene["points"] <= 20_000 and mesh["vertex"].count <= 20_000
    for name in ("render.png", "render-back.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[:2] == (400, 640)
        assert np.std(image[40:-22, :-170, :3]) > 0.05  # not blank
    gif = iio.imread(out / "frames.gif", index=None)
    assert len(gif) == 7  # 8 checkpoints, 7 intervals


def test_the_worker_draws_the_pictures_this_process_would(gpt2, tmp_path):
    """Open3D renders in the picture worker, the rest of the picture is drawn here: each view equals,
    pixel for pixel, the picture drawn wholly in this process (a renderer of its own, not kept)."""
    import matplotlib.image

    from wdiff.scene.outputs import write_outputs
    from wdiff.scene.picture import Picture

    res, out = gpt2
    folder = tmp_path / "again"
    folder.mkdir()
    shutil.copy(out / "accumulated.safetensors", folder)
    names = list(res.summary["tensors"])
    options = SceneOptions(size=(640, 400), views=("oblique", "back"), max_points=20_000, html=False)
    info = write_outputs(folder, names, "a title", options)
    assert info["files"] == ["points.ply", "render.png", "render-back.png"]
    scene = build_scene(folder / "accumulated.safetensors", names, max_points=20_000)
    cs = colorize_scene(scene, "log", "global").scale
    for view, name in (("oblique", "render.png"), ("back", "render-back.png")):
        picture = Picture.plan(scene, (640, 400), "a title", view)
        with render.Offscreen(picture.view_size) as renderer:
            here = picture.draw(renderer, scene, cs)
        drawn = (matplotlib.image.imread(folder / name)[:, :, :3] * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(drawn, here)


@pytest.mark.parametrize("view", ["oblique", "back"])
def test_every_block_of_the_sample_is_labelled_inside_the_picture(gpt2, view):
    from wdiff.scene.picture import Picture
    from wdiff.scene.viewer import load

    _, out = gpt2
    scene, _, _ = load(out)
    picture = Picture.plan(scene, (1280, 800), "title", view)
    assert [label.text for label in picture.labels] == ["wpe + wte", "h.0", "h.1", "h.2", "h.3", "ln_f"]
    width, height = picture.view_size
    for label in picture.labels:
        assert 0 <= label.x <= width and picture.top <= label.y <= picture.top + height


def test_sample_film_fades_as_the_learning_rate_decays(gpt2):
    """digits-gpt2 uses a cosine schedule that reaches zero at step 400: the last interval's frame
    is darker than the first on the film's common colour scale."""
    import imageio.v3 as iio

    res, out = gpt2
    lr = [e["learning_rate"] for e in res.summary["trainer_state"]["log_history"] if "learning_rate" in e]
    assert lr[-1] < 0.05 * max(lr)
    gif = iio.imread(out / "frames.gif", index=None)[:, 40:-22, :-170].astype(int)
    assert colormap_position(gif[-1]) < colormap_position(gif[0]) - 0.15


def colormap_position(picture: np.ndarray) -> float:
    """Mean position (0..1) on viridis of the pixels that show data (nearest table colour; frames,
    labels and background are too far from every table colour to count)."""
    table = lookup_table().astype(int)
    pixels = picture.reshape(-1, 3)[::7]
    distance = np.abs(pixels[:, None, :] - table[None, :, :]).sum(axis=2)
    nearest = distance.argmin(axis=1)
    data = distance[np.arange(len(pixels)), nearest] < 24
    return float(nearest[data].mean() / (len(table) - 1))


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium and chromium-driver")
def test_scene_html_loads_rotates_and_hovers_in_headless_chromium(gpt2):
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains

    _, out = gpt2
    page = (out / "scene.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # no network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--window-size=1000,700",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get((out / "scene.html").as_uri())
        for _ in range(50):
            if driver.execute_script("return document.body.dataset.status") == "drawn":
                break
            time.sleep(0.1)
        assert driver.execute_script("return document.body.dataset.status") == "drawn"
        assert driver.execute_script("return window.wdiffViewer.points") <= 5_000
        shot = driver.get_screenshot_as_png()
        import io

        import matplotlib.image

        pixels = matplotlib.image.imread(io.BytesIO(shot))[:, :, :3]
        assert np.std(pixels) > 0.03 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
        hit = driver.execute_script(
            "const v = window.wdiffViewer, c = document.getElementById('view');"
            "for (let y = 60; y < c.clientHeight; y += 6) for (let x = 60; x < c.clientWidth; x += 6)"
            "{ const h = v.pick(x, y); if (h) return [x, y, h]; } return null;"
        )
        assert hit is not None
        x, y, info = hit
        canvas = driver.find_element("id", "view")
        size = canvas.size
        ActionChains(driver).move_to_element_with_offset(
            canvas, x - size["width"] // 2, y - size["height"] // 2
        ).perform()
        time.sleep(0.3)
        tip = driver.find_element("id", "tip")
        assert tip.is_displayed() and info["tensor"] in tip.text and "|ΔW|" in tip.text
        drag = ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(150, 20)
        drag.release().perform()
        time.sleep(0.3)
        assert driver.get_screenshot_as_png() != shot  # it rotated
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


# --- command line --------------------------------------------------------------------------------


def _wdiff(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_view_without_a_display_says_so_in_one_line(gpt2):
    _, out = gpt2
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    p = _wdiff("view", str(out), env=env)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "no display" in p.stderr and "scene.html" in p.stderr
    p = _wdiff("view", str(out.parent / "nothing"), env=env)
    assert p.returncode == 2 and "no wdiff results" in p.stderr


def test_view_picks_name_the_weights(gpt2):
    from wdiff.scene.viewer import describe, load, nearest

    _, out = gpt2
    scene, rgb, _ = load(out)
    assert len(rgb) == len(scene)
    k = scene.names.index("transformer.h.1.attn.c_attn.weight")
    p = scene.placements[k]
    point = p.start + 5
    text = describe(scene, nearest(scene, scene.xyz[point] + 0.1))
    name, rows, cols = scene.locate(point)
    assert text.startswith(f"{name} (32x96)") and f"{scene.value[point]:.4g}" in text


PICK_PROBE = """
import json, os, sys, threading, time
import numpy as np
from wdiff.scene.viewer import Window, describe, load

scene, rgb, title = load(sys.argv[1])
window = Window(scene, rgb, title, (800, 600))

def probe():
    time.sleep(2)

    def go():
        camera = window.widget.scene.camera
        w, h = window.widget.frame.width, window.widget.frame.height
        p = scene.placements[scene.names.index(sys.argv[2])]
        point = p.start + p.grid[1] * (p.grid[0] // 2) + p.grid[1] // 2
        m = np.asarray(camera.get_projection_matrix()) @ np.asarray(camera.get_view_matrix())
        c = m @ np.r_[scene.xyz[point].astype(float), 1.0]
        x, y = round((c[0] / c[3] + 1) / 2 * w), round((1 - c[1] / c[3]) / 2 * h)

        def done(text):
            print(json.dumps({"expected": describe(scene, point), "got": text}), flush=True)
            os._exit(0)

        window.pick(x, y, done)

    window.app.post_to_main_thread(window.window, go)

threading.Thread(target=probe, daemon=True).start()
threading.Thread(target=lambda: (time.sleep(40), os._exit(3)), daemon=True).start()
window.run()
"""


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs Debian xvfb for a virtual display")
def test_view_window_picks_a_point_under_a_virtual_display(gpt2, tmp_path):
    """The real Open3D window on Xvfb: picking the pixel of a known point names that point."""
    import json

    _, out = gpt2
    probe = tmp_path / "probe.py"
    probe.write_text(PICK_PROBE)
    p = subprocess.run(
        [
            "xvfb-run",
            "-a",
            "-s",
            "-screen 0 1280x1024x24",
            sys.executable,
            str(probe),
            str(out),
            "transformer.h.0.attn.c_attn.weight",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["got"] == result["expected"] and result["got"].startswith("transformer.h.0.attn.c_attn")


def test_unproject_inverts_the_projection():
    from wdiff.scene.viewer import unproject

    camera = render.fit_camera(np.array([[-40.0, 5, 0], [40, 5, 0], [-40, -30, -90], [40, -30, -90]]), 1.5)
    forward, right, up = camera._basis()
    view = np.eye(4)
    view[:3, :3] = np.stack([right, up, -forward])
    view[:3, 3] = -view[:3, :3] @ camera.eye
    t = 1 / math.tan(math.radians(camera.fov_deg) / 2)
    projection = np.diag([t / 1.5, t, 1.0, 1.0])
    point = np.array([12.0, -7.0, -33.0])
    x, y = camera.project(point[None], 150, 100)[0]
    depth = float(-(view @ np.r_[point, 1.0])[2])
    np.testing.assert_allclose(unproject(view, projection, (x, y), depth, (150, 100)), point, atol=1e-6)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--size", "big"], "--size must look like 1280x800"),
        (["--size", "100x100"], "--size 100x100"),
        (["--views", "oblique,nope"], "--views must be one of"),
        (["--pool", "median"], "--pool must be one of"),
        (["--normalize", "row"], "--normalize must be one of"),
        (["--color-scale", "sqrt"], "--color-scale must be one of"),
    ],
)
def test_bad_scene_options_exit_2_before_any_work(tmp_path, args, needle):
    p = _wdiff("run", str(SAMPLES / "digits-gpt2"), "-o", str(tmp_path / "o"), *args)
    assert p.returncode == 2 and needle in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_options_validate_in_python_too():
    with pytest.raises(WdiffError, match="^views names a view twice"):
        SceneOptions(views=("top", "top"))
    with pytest.raises(WdiffError, match="^html_points must be at least 1"):
        SceneOptions(html_points=0)


@pytest.mark.parametrize(
    "options, parameter, args, flag",
    [
        ({"pool": "median"}, "pool", ["--pool", "median"], "--pool"),
        ({"color_scale": "sqrt"}, "color_scale", ["--color-scale", "sqrt"], "--color-scale"),
        ({"views": ("top", "top")}, "views", ["--views", "top,top"], "--views"),
        ({"size": (100, 100)}, "size", ["--size", "100x100"], "--size"),
    ],
)
def test_a_scene_option_error_names_the_parameter_the_cli_the_flag(tmp_path, options, parameter, args, flag):
    """The library speaks a notebook's words (``color_scale``), the CLI its own (``--color-scale``),
    for the same mistake and the same rest of the line."""
    from wdiff.checks import OptionError

    with pytest.raises(OptionError) as caught:
        SceneOptions(**options)
    assert caught.value.parameter == parameter
    assert str(caught.value) == f"{parameter} {caught.value.detail}"
    assert "--" not in str(caught.value)
    p = _wdiff("run", str(SAMPLES / "digits-gpt2"), "-o", str(tmp_path / "o"), *args)
    assert p.returncode == 2
    assert p.stderr == f"wdiff: error: {flag} {caught.value.detail}\n"
