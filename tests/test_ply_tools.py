"""``points.ply`` and ``mesh.ply`` opened in the 3D tools users named: MeshLab (pymeshlab) and Blender
(bpy, Blender as a Python module), checked against the files read with plyfile in this process.

Each tool runs in its own process (tests/tools3d/*.py) with the Python of the ``.venv-3d`` that
``make setup`` creates in the repository root (bpy pins numpy 1.26; bpy and pymeshlab bundle libraries
that clash in one process); ``WDIFF_TOOLS3D_PYTHON`` names another one. The scripts write what the tool
read as JSON. The files come from a real run on the shipped GPT-2 sample, and from a small run with a
NaN and an Inf cell. CloudCompare is not installed here: its convention (``scalar_*`` properties become
scalar fields) is checked on the header with the guess its PLY filter makes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import wdiff
from wdiff.scene import SceneOptions
from wdiff.scene.ply import meshlab_quality

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "tools3d"
SAMPLE = ROOT / "sample_checkpoints" / "digits-gpt2"
PROPERTIES = [
    ("x", "float"),
    ("y", "float"),
    ("z", "float"),
    ("red", "uchar"),
    ("green", "uchar"),
    ("blue", "uchar"),
    ("quality", "float"),
    ("scalar_accumulated", "float"),
]


def tools_python() -> tuple[Path | None, str]:
    """The Python of ``$WDIFF_TOOLS3D_PYTHON`` when set (a deliberate choice), else of ``.venv-3d`` in
    the repository root (``make setup``); None and why when it does not exist."""
    named = os.environ.get("WDIFF_TOOLS3D_PYTHON")
    path = Path(named) if named else ROOT / ".venv-3d" / "bin" / "python"
    if path.exists():
        return path, ""
    if named:
        return None, f"WDIFF_TOOLS3D_PYTHON={named} does not exist"
    return None, f"no Blender/MeshLab Python: {ROOT / '.venv-3d'} missing (make setup creates it)"


PYTHON, MISSING = tools_python()
needs_tools = pytest.mark.skipif(PYTHON is None, reason=MISSING)


def read_ply(path: Path) -> dict:
    import plyfile

    data = plyfile.PlyData.read(str(path))
    v = data["vertex"]
    faces = np.stack(data["face"]["vertex_indices"]) if "face" in data else np.zeros((0, 3), np.int64)
    return {
        "path": str(path),
        "ply": data,
        "xyz": np.c_[v["x"], v["y"], v["z"]],
        "rgb": np.c_[v["red"], v["green"], v["blue"]],
        "quality": np.asarray(v["quality"]),
        "scalar_accumulated": np.asarray(v["scalar_accumulated"]),
        "faces": faces,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``points.ply`` and ``mesh.ply`` of the sample run, and of a run whose last checkpoint has a NaN
    in one tensor and an Inf in another (``bad_points``, ``bad_mesh``), read back with plyfile."""
    from factories import random_sequence, trainer_run

    root = tmp_path_factory.mktemp("plytools")
    options = SceneOptions(mesh=True, render=False, html=False, max_points=20_000)
    res = wdiff.run(SAMPLE, root / "out", scene=options)
    assert res.summary["scene"]["files"] == ["points.ply", "mesh.ply"]
    seq = random_sequence({"model.layers.0.w": (12, 16), "model.layers.1.w": (16, 8)}, 3, seed=2)
    seq[2]["model.layers.0.w"][3, 4] = np.nan
    seq[2]["model.layers.1.w"][5, 6] = np.inf
    wdiff.run(trainer_run(root / "bad", seq, [1, 2, 3]), root / "bad-out", scene=options)
    return {
        "points": read_ply(root / "out" / "points.ply"),
        "mesh": read_ply(root / "out" / "mesh.ply"),
        "bad_points": read_ply(root / "bad-out" / "points.ply"),
        "bad_mesh": read_ply(root / "bad-out" / "mesh.ply"),
    }


def read_with(script: str, run: dict, tmp_path_factory) -> dict:
    """Run ``tests/tools3d/<script>`` on every file of ``run`` in one process; what the tool read, per
    file, and the tool's version under ``"_"``."""
    target = tmp_path_factory.mktemp(script.removesuffix(".py")) / "read.json"
    paths = [f["path"] for f in run.values()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        [str(PYTHON), str(SCRIPTS / script), str(target), *paths],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    result = json.loads(target.read_text())  # NaN and Infinity included
    return {name: result["files"][f["path"]] for name, f in run.items()} | {"_": result}


@pytest.fixture(scope="module")
def meshlab(run, tmp_path_factory):
    return read_with("meshlab_read.py", run, tmp_path_factory)


@pytest.fixture(scope="module")
def blender(run, tmp_path_factory):
    return read_with("blender_read.py", run, tmp_path_factory)


# --- the files ------------------------------------------------------------------------------------


def test_points_and_mesh_list_the_same_vertex_properties(run):
    for name in ("points", "mesh", "bad_points", "bad_mesh"):
        data = run[name]["ply"]
        assert data.text is False and data.byte_order == "<"  # binary little-endian
        vertex = data["vertex"]
        assert [(p.name, p.val_dtype) for p in vertex.properties] == [
            (n, {"float": "f4", "uchar": "u1"}[t]) for n, t in PROPERTIES
        ]
        assert np.isfinite(run[name]["quality"]).all()
        if not name.startswith("bad"):
            np.testing.assert_array_equal(run[name]["quality"], run[name]["scalar_accumulated"])
            assert run[name]["quality"].min() > 0
    assert [e.name for e in run["points"]["ply"].elements] == ["vertex"]
    assert [e.name for e in run["mesh"]["ply"].elements] == ["vertex", "face"]
    # the same value: the mesh (not pooled further at this budget) carries the points' cells
    assert len(run["mesh"]["quality"]) <= 20_000
    np.testing.assert_array_equal(np.unique(run["mesh"]["quality"]), np.unique(run["points"]["quality"]))


def test_nan_and_inf_stay_in_scalar_accumulated_and_quality_pins_them_to_the_top(run):
    from wdiff.scene.color import FLAG_RGB

    for name in ("bad_points", "bad_mesh"):
        value, quality, rgb = run[name]["scalar_accumulated"], run[name]["quality"], run[name]["rgb"]
        assert np.isnan(value).sum() == 1 and np.isposinf(value).sum() == 1
        bad = ~np.isfinite(value)
        np.testing.assert_array_equal(rgb[bad], [FLAG_RGB, FLAG_RGB])
        np.testing.assert_array_equal(quality[~bad], value[~bad])
        np.testing.assert_array_equal(quality[bad], value[~bad].max())
    assert meshlab_quality(np.array([np.nan, np.inf, -np.inf], np.float32)).tolist() == [0, 0, 0]


def cloudcompare_guess(names: list[str]) -> dict:
    """What CloudCompare's PLY filter assigns to the vertex properties ``names`` before its dialog
    opens (transcribed from CloudCompare libs/qCC_io/src/PlyFilter.cpp, ``loadFile``: first match
    wins, in property order). Scalar fields are named without the ``scalar_`` prefix."""
    found: dict = {"scalar_fields": []}

    def free(key: str) -> bool:
        return key not in found

    for name in names:
        p = name.upper()
        if free("nx") and "NX" in p or free("nx") and "NORM" in p and p.endswith("X"):
            found["nx"] = name
        elif free("ny") and "NY" in p or free("ny") and "NORM" in p and p.endswith("Y"):
            found["ny"] = name
        elif free("nz") and "NZ" in p or free("nz") and "NORM" in p and p.endswith("Z"):
            found["nz"] = name
        elif free("r") and "RED" in p:
            found["r"] = name
        elif free("g") and "GREEN" in p:
            found["g"] = name
        elif free("b") and "BLUE" in p:
            found["b"] = name
        elif "INTENSITY" in p or "GRAY" in p or "GREY" in p:
            found["scalar_fields"].append(name)
        elif "SCAL" in p:  # element "vertex"
            sf = name[7:].replace("_", " ") if name.startswith("scalar_") and len(name) > 7 else name
            found["scalar_fields"].append(sf)
        elif free("x") and p.endswith("X"):
            found["x"] = name
        elif free("y") and p.endswith("Y"):
            found["y"] = name
        elif free("z") and p.endswith("Z"):
            found["z"] = name
    return found


def test_cloudcompare_finds_coordinates_colours_and_the_scalar_field(run):
    for name in ("points", "mesh", "bad_points"):
        names = [p.name for p in run[name]["ply"]["vertex"].properties]
        guess = cloudcompare_guess(names)
        assert guess == {
            "x": "x",
            "y": "y",
            "z": "z",
            "r": "red",
            "g": "green",
            "b": "blue",
            "scalar_fields": ["accumulated"],
        }
    # why ``quality`` must follow ``y``: ahead of it, CloudCompare would take it for the y coordinate
    assert cloudcompare_guess(["x", "quality", "y", "z"])["y"] == "quality"


# --- MeshLab --------------------------------------------------------------------------------------


@needs_tools
@pytest.mark.parametrize("name", ["points", "mesh", "bad_points", "bad_mesh"])
def test_meshlab_reads_positions_colours_quality_and_faces(meshlab, run, name):
    got, want = meshlab[name], run[name]
    n = len(want["quality"])
    assert got["vertices"] == n and got["faces"] == len(want["faces"])
    assert got["has_color"] and got["has_quality"]
    np.testing.assert_array_equal(np.asarray(got["xyz"], np.float32), want["xyz"])
    rgba = np.asarray(got["rgba"])
    np.testing.assert_array_equal(rgba[:, 3], 1.0)
    np.testing.assert_allclose(rgba[:, :3] * 255, want["rgb"], rtol=0, atol=1e-9)  # byte / 255 exactly
    quality = np.asarray(got["quality"])
    np.testing.assert_array_equal(quality.astype(np.float32), want["quality"])  # float32 exact
    np.testing.assert_array_equal(np.asarray(got["face_indices"], np.int64).reshape(-1, 3), want["faces"])
    # MeshLab's own statistics of the quality ("Per Vertex Quality Stat")
    stats, q = got["statistics"], want["quality"].astype(np.float64)
    assert stats["min"] == q.min() and stats["max"] == q.max()
    assert stats["avg"] == pytest.approx(q.mean(), rel=1e-9)
    assert stats["stddev"] == pytest.approx(q.std(), rel=1e-6)


@needs_tools
@pytest.mark.parametrize("name", ["points", "mesh", "bad_points", "bad_mesh"])
def test_meshlab_filters_work_on_the_quality(meshlab, run, name):
    got, q = meshlab[name], run[name]["quality"].astype(np.float64)
    # Filters > Selection > Select by Vertex Quality: the weights that moved most
    t = got["threshold"]
    assert q.min() < t < q.max()
    above = np.flatnonzero(q > t)
    assert got["selected"] == len(above) == len(got["selection"]) > 0
    np.testing.assert_array_equal(got["selection"], above)
    # Filters > Color Creation and Processing > Colorize by vertex Quality: red (least) to blue (most)
    rgba = np.asarray(got["quality_rgba"])
    np.testing.assert_array_equal(rgba[np.argmin(q)], [1, 0, 0, 1])
    np.testing.assert_array_equal(rgba[np.argmax(q)], [0, 0, 1, 1])
    _, first, inverse = np.unique(q, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(rgba, rgba[first][inverse])  # the colour is a function of the value
    # spread over the ramp: an Inf quality would leave every other vertex red, a NaN one crashes MeshLab
    assert len(np.unique(rgba, axis=0)) > 50


# --- Blender --------------------------------------------------------------------------------------


@needs_tools
@pytest.mark.parametrize("name", ["points", "mesh", "bad_points", "bad_mesh"])
def test_blender_imports_colours_and_both_values_as_attributes(blender, run, name):
    got, want = blender[name], run[name]
    n = len(want["quality"])
    assert got["status"] == ["FINISHED"] and got["objects"] == [name.split("_")[-1]] and got["type"] == "MESH"
    assert got["vertices"] == n and got["faces"] == len(want["faces"])
    attributes = got["attributes"]
    per_vertex = {a: (i["data_type"], i["length"]) for a, i in attributes.items() if i["domain"] == "POINT"}
    assert per_vertex == {
        "position": ("FLOAT_VECTOR", n),
        "Col": ("FLOAT_COLOR", n),
        "quality": ("FLOAT", n),
        "scalar_accumulated": ("FLOAT", n),
    }
    assert got["color_attributes"] == ["Col"]
    np.testing.assert_array_equal(np.asarray(attributes["position"]["values"], np.float32), want["xyz"])
    np.testing.assert_array_equal(np.asarray(attributes["quality"]["values"], np.float32), want["quality"])
    value = np.asarray(attributes["scalar_accumulated"]["values"], np.float32)
    finite = np.isfinite(want["scalar_accumulated"])
    np.testing.assert_array_equal(value[finite], want["scalar_accumulated"][finite])
    # Blender 5.0's importer turns NaN and Inf into 0 (seen): the guide points Blender users to quality
    np.testing.assert_array_equal(value[~finite], 0.0)
    assert finite.all() != name.startswith("bad")
    srgb = np.asarray(attributes["Col"]["values"])  # stored linear; sRGB back is the byte within 0.03
    np.testing.assert_array_equal(srgb[:, 3], 1.0)
    assert np.abs(srgb[:, :3] * 255 - want["rgb"]).max() < 0.05
    np.testing.assert_array_equal(np.rint(srgb[:, :3] * 255), want["rgb"])


@needs_tools
def test_blender_keeps_the_mesh_triangles_in_file_order(blender, run):
    got, want = blender["mesh"], run["mesh"]
    assert got["face_sizes"] == [3] and got["face_starts_in_order"]
    np.testing.assert_array_equal(np.asarray(got["face_indices"]), want["faces"])
    assert blender["points"]["faces"] == 0 and blender["points"]["face_indices"] == []
    assert blender["_"]["blender"].startswith("5.")


@needs_tools
def test_blender_renders_the_points_in_their_own_colours(tmp_path):
    """The recipe of docs/user-guide.md (Mesh to Points, an Attribute node reading ``Col`` into an
    Emission shader, view transform Standard) renders every point in the file's colour: on a run of one
    6 x 8 tensor each point is a disc of many pixels, and nearly every pixel of one shows a file colour
    exactly (AgX, Blender's default view transform, leaves 5% of them so)."""
    import plyfile
    from factories import random_sequence, trainer_run
    from PIL import Image

    from wdiff.scene.render import BACKGROUND

    run = trainer_run(tmp_path / "run", random_sequence({"model.layers.0.w": (6, 8)}, 3, seed=1), [1, 2, 3])
    wdiff.run(run, tmp_path / "out", scene=SceneOptions(render=False, html=False))
    points = tmp_path / "out" / "points.ply"
    picture = tmp_path / "blender.png"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    command = [str(PYTHON), str(SCRIPTS / "blender_render.py"), str(points), str(picture)]
    done = subprocess.run(
        [*command, "--size", "320x240", "--samples", "16"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, f"blender_render.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    image = np.asarray(Image.open(picture).convert("RGB")).reshape(-1, 3).astype(np.float64)
    background = np.rint(np.array(BACKGROUND) * 255)
    np.testing.assert_array_equal(image[0], background)  # a corner: the world colour, as wdiff draws it
    v = plyfile.PlyData.read(str(points))["vertex"]
    colours = np.unique(np.c_[v["red"], v["green"], v["blue"]], axis=0).astype(np.float64)
    drawn = image[np.linalg.norm(image - background, axis=1) > 40]
    assert len(drawn) > 0.3 * len(image)
    distance = np.linalg.norm(drawn[:, None, :] - colours[None], axis=2)
    assert (distance.min(axis=1) <= 3).mean() > 0.8  # the rest: discs' anti-aliased edges
    assert (distance.min(axis=0) <= 2).all()  # every colour of the file is on the picture
