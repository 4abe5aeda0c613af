"""``map_dtype="none"`` (``--map-dtype none``): a run that stores no accumulated map.

What is checked: such a run writes no ``accumulated.safetensors`` and every other output is the same
as the float32 run's (row sums, the scene's cells, the PLY and the HTML viewer, findings, metrics, the
summary's tensors), for stored tensors, NaN/Inf included, and for computed LoRA products; the results
load, and what needs the per-weight values is one ``WdiffError`` line naming the file; the scene is
drawn again (``wdiff view``) at the run's own budget and refused at another; ``compare`` takes such
results; the run is "up to date" when run again, recomputed (never extended) when it grows, and float32
results are extended into results without a map with the batch run's sums; a run committed in parts
keeps float32 maps until the last part; ``watch`` refuses it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, trainer_run, wdiff_cli
from kinds import adapter_checkpoint, assert_same_but_the_map, reference

import wdiff
from wdiff.checks import OptionError
from wdiff.errors import WdiffError
from wdiff.results import Results
from wdiff.scene.options import SceneOptions

SAMPLE = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "digits-bert-bf16-sharded"
SHAPES = {"emb": (97, 33), "attn.w": (40, 40), "norm": (33,), "conv": (6, 3, 3, 3)}
OPTIONS = {"render": False, "max_points": 600, "chunk_elements": 500, "spectrum": False}


def _nan_run(root: Path) -> Path:
    seq = random_sequence(SHAPES, 4, seed=3)
    seq[2]["attn.w"][3, 4] = np.nan
    seq[3]["norm"][5] = np.inf
    return trainer_run(root, seq, [10, 20, 30, 40])


def _lora_run(root: Path) -> Path:
    rng = np.random.default_rng(8)
    prefix = "base_model.model."
    state = {
        f"{prefix}q.lora_A.weight": rng.standard_normal((2, 30)),
        f"{prefix}q.lora_B.weight": rng.standard_normal((20, 2)),
    }
    for step in range(1, 5):
        state = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
        adapter_checkpoint(root / f"checkpoint-{step}", {k: v.astype(np.float32) for k, v in state.items()},
                           {"r": 2, "lora_alpha": 4}, step=step)  # fmt: skip
    return root


def assert_no_map_and_the_rest_the_same(with_map: Results, without: Results) -> None:
    assert not (without.path / "accumulated.safetensors").exists()
    assert without.summary["map_dtype"] == "none" and with_map.summary["map_dtype"] != "none"
    assert_same_but_the_map(with_map, without)


@pytest.mark.parametrize("which", ["bf16 sample", "float32 run with NaN and Inf", "LoRA products"])
def test_a_run_without_a_map_writes_everything_else_the_same(tmp_path, which):
    inputs = {
        "bf16 sample": lambda: SAMPLE,
        "float32 run with NaN and Inf": lambda: _nan_run(tmp_path / "run"),
        "LoRA products": lambda: _lora_run(tmp_path / "run"),
    }[which]()
    f32 = wdiff.run(inputs, tmp_path / "f32", **OPTIONS)
    none = wdiff.run(inputs, tmp_path / "none", map_dtype="none", **OPTIONS)
    assert_no_map_and_the_rest_the_same(f32, none)
    again = Results.load(none.path)  # loads: the summary says no map was stored
    name = again.names[0]
    assert again.map_dtype(name) == "none"
    np.testing.assert_array_equal(again.neuron_change(name), f32.neuron_change(name))
    with pytest.raises(WdiffError, match="not stored: the run wrote no map") as e:
        again.accumulated(name)
    assert "accumulated.safetensors" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WdiffError, match="--map-dtype none"):
        again.accumulated_of(again.names)


def test_a_missing_map_is_still_an_error_when_the_summary_says_one_was_stored(tmp_path):
    res = wdiff.run(_nan_run(tmp_path / "run"), tmp_path / "out", **OPTIONS)
    (res.path / "accumulated.safetensors").unlink()
    with pytest.raises(WdiffError, match="missing, or not a regular file: these results are incomplete"):
        Results.load(res.path)
    summary = json.loads((res.path / "summary.json").read_text())
    summary["map_dtype"] = "float16"
    (res.path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(WdiffError, match="map_dtype"):
        Results.load(res.path)


def test_the_scene_of_results_without_a_map_is_drawn_at_its_own_budget_only(tmp_path):
    from wdiff.scene import build_scene
    from wdiff.scene.viewer import load

    root = _nan_run(tmp_path / "run")
    f32 = wdiff.run(root, tmp_path / "f32", **OPTIONS)
    none = wdiff.run(root, tmp_path / "none", map_dtype="none", **OPTIONS)
    a, rgb_a, _ = load(f32.path)  # what `wdiff view` shows
    b, rgb_b, _ = load(none.path)
    assert a.pool_factor == b.pool_factor and len(b) > 0
    np.testing.assert_array_equal(a.xyz, b.xyz)
    np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    shapes = {n: t["shape"] for n, t in none.summary["tensors"].items()}
    with pytest.raises(WdiffError, match="only the scene of the run's own --max-points and --pool") as e:
        build_scene(none.path / "accumulated.safetensors", none.names, max_points=60, shapes=shapes)
    assert "\n" not in str(e.value)
    with pytest.raises(WdiffError, match="own --max-points and --pool"):
        build_scene(
            none.path / "accumulated.safetensors", none.names, max_points=600, pool="mean", shapes=shapes
        )


def test_compare_takes_results_without_a_map(tmp_path):
    seq = random_sequence(SHAPES, 3, seed=11)
    a = wdiff.run(trainer_run(tmp_path / "a", seq, [1, 2, 3]), tmp_path / "ra", map_dtype="none", **OPTIONS)
    b = wdiff.run(trainer_run(tmp_path / "b", seq[::-1], [1, 2, 3]), tmp_path / "rb", **OPTIONS)
    out = tmp_path / "cmp"
    wdiff.compare(a.path, b.path, out, render=False)
    data = json.loads((out / "compare.json").read_text())
    assert {t["tensor"] for t in data["tensors"]} == set(SHAPES)
    for t in data["tensors"]:  # the same path lengths: the reversed run walks the same steps back
        assert t["path_l1_ratio"] == pytest.approx(1.0, rel=1e-5)


def test_results_without_a_map_are_up_to_date_when_run_again_and_recomputed_when_the_run_grows(tmp_path):
    seq = random_sequence(SHAPES, 5, dtype="BF16", seed=5)
    root = trainer_run(tmp_path / "run", seq, [1, 2, 3, 4, 5])
    later = tmp_path / "later"  # checkpoints 4 and 5, moved in as training "writes" them
    later.mkdir()
    for step in (4, 5):
        (root / f"checkpoint-{step}").rename(later / f"checkpoint-{step}")
    out = tmp_path / "out"
    assert wdiff.run(root, out, map_dtype="none", **OPTIONS).summary["update"] == "full"
    assert wdiff.run(root, out, map_dtype="none", **OPTIONS).summary["update"] == "up to date"
    assert not (out / "accumulated.safetensors").exists()
    other = {**OPTIONS, "max_points": 300}  # another scene: no map to pool again, so computed again
    assert wdiff.run(root, out, map_dtype="none", **other).summary["update"] == "full"
    assert wdiff.run(root, out, map_dtype="none", **other).summary["update"] == "up to date"
    mean = SceneOptions(max_points=600, render=False, pool="mean")
    assert wdiff.run(root, out, map_dtype="none", **OPTIONS, scene=mean).summary["update"] == "full"
    with_map = wdiff.run(root, out, **OPTIONS)  # float32 asked: there is none to keep
    assert with_map.summary["update"] == "full" and with_map.map_dtype("emb") == "F32"
    shutil.copytree(out, tmp_path / "copy")
    (later / "checkpoint-4").rename(root / "checkpoint-4")
    grown = wdiff.run(root, out, map_dtype="none", **OPTIONS)  # from float32 results: extended
    assert grown.summary["update"] == "incremental from 3"
    assert_no_map_and_the_rest_the_same(wdiff.run(root, tmp_path / "copy", **OPTIONS), grown)
    batch = wdiff.run(root, tmp_path / "batch", **OPTIONS)  # the exact sums of a batch run
    for name in batch.names:
        for key in ("accumulated_l1", "interval_l1", "accumulated_max", "net_l2"):
            assert grown.summary["tensors"][name][key] == batch.summary["tensors"][name][key], (name, key)
        np.testing.assert_array_equal(grown.neuron_change(name), batch.neuron_change(name))
    (later / "checkpoint-5").rename(root / "checkpoint-5")
    again = wdiff.run(root, out, map_dtype="none", **OPTIONS)
    assert again.summary["update"] == "full"  # nothing to sum on
    for name in again.names:  # against the float64 numpy reference
        ref = reference([{"w": c[name]} for c in seq], "w")
        entry = again.summary["tensors"][name]
        np.testing.assert_allclose(entry["accumulated_l1"], ref["accumulated"].sum(), rtol=1e-5)
        rows = ref["accumulated"].reshape(ref["accumulated"].shape[0], -1).sum(axis=1)
        np.testing.assert_allclose(again.neuron_change(name), rows, rtol=1e-5, atol=1e-6)


def test_a_run_committed_in_parts_keeps_float32_until_the_last_part(tmp_path):
    seq = random_sequence(SHAPES, 5, seed=6)
    root = trainer_run(tmp_path / "run", seq, [1, 2, 3, 4, 5])
    parts = wdiff.run(root, tmp_path / "parts", map_dtype="none", commit_every=2, **OPTIONS)
    in_float32 = wdiff.run(root, tmp_path / "f32", commit_every=2, **OPTIONS)
    assert parts.summary["update"].startswith("incremental from")
    assert_no_map_and_the_rest_the_same(in_float32, parts)


def test_the_cli_runs_without_a_map_and_watch_refuses_it(tmp_path):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 2), [1, 2])
    with pytest.raises(OptionError, match="only a float32 map is"):
        wdiff.watch(root, tmp_path / "w", map_dtype="none", poll=0.1, until=lambda: True)
    p = wdiff_cli("run", str(root), "-o", str(tmp_path / "out"), "--map-dtype", "none", "--no-render", "-q")
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "out" / "accumulated.safetensors").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["map_dtype"] == "none"
    assert "KB in float32: --map-dtype float32 stores it)" in (tmp_path / "out" / "report.html").read_text()
    p = wdiff_cli("report", str(tmp_path / "out"))  # the report is written again from the results
    assert p.returncode == 0, p.stderr
