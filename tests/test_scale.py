"""Scale-out schedulers give the same bits; incremental runs equal full runs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from factories import assert_same_entries, random_sequence, save, trainer_run

import wdiff

SHAPES = {"layers.0.w": (70, 50), "layers.0.b": (50,), "layers.1.w": (33, 41), "layers.1.s": ()}


def _files(out) -> dict[str, bytes]:
    return {
        name: (out / name).read_bytes()
        for name in ("accumulated.safetensors", "rows.safetensors", "points.ply")
    }


def _same_results(a: wdiff.Results, b: wdiff.Results) -> None:
    assert_same_entries(a.summary["tensors"], b.summary["tensors"])
    assert _files(a.path) == _files(b.path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    return trainer_run(root / "run", random_sequence(SHAPES, 4, dtype="BF16", seed=3), steps=[1, 2, 3, 4])


def test_every_scheduler_gives_the_same_bits(run_dir, tmp_path):
    kw = dict(render=False, chunk_elements=1000)
    threads = wdiff.run(run_dir, tmp_path / "threads", scheduler="threads", **kw)
    for scheduler in ("sync", "processes", "local:2"):
        other = wdiff.run(run_dir, tmp_path / scheduler.replace(":", "_"), scheduler=scheduler, **kw)
        _same_results(threads, other)
        assert other.summary["timing"]["scheduler"] == scheduler


def test_unknown_scheduler_is_a_usage_error(run_dir, tmp_path):
    with pytest.raises(wdiff.WdiffError, match="unknown scheduler"):
        wdiff.run(run_dir, tmp_path / "o", scheduler="gpu-cluster", render=False)
    with pytest.raises(wdiff.WdiffError, match="positive integer"):
        wdiff.run(run_dir, tmp_path / "o", scheduler="local:zero", render=False)
    assert not (tmp_path / "o").exists()


def _growing_run(tmp_path, count):
    seq = random_sequence(SHAPES, 6, seed=11)
    paths = [save(tmp_path / "ckpts" / f"step_{100 * (i + 1)}.safetensors", c) for i, c in enumerate(seq)]
    return paths[:count], paths


def test_incremental_run_equals_full_run(tmp_path):
    first, every = _growing_run(tmp_path, 3)
    out = tmp_path / "out"
    kw = dict(render=False, chunk_elements=777)
    early = wdiff.run(first, out, **kw)
    assert early.summary["update"] == "full"
    grown = wdiff.run(every, out, **kw)
    assert grown.summary["update"] == "incremental from 3"
    full = wdiff.run(every, tmp_path / "full", incremental=False, **kw)
    assert full.summary["update"] == "full"
    _same_results(grown, full)
    # the incremental run read W(0) and W(2)..W(5): 5 of the 6 checkpoints (4 to 6 here) ...
    per_checkpoint = full.summary["timing"]["read_bytes"] / 6
    assert grown.summary["timing"]["read_bytes"] == pytest.approx(5 * per_checkpoint)
    # ... and growing by one more costs W(0), W(K-1), W(K): three checkpoints whatever the history
    again = wdiff.run(every[:5], tmp_path / "five", **kw)
    again = wdiff.run(every, tmp_path / "five", **kw)
    assert again.summary["update"] == "incremental from 5"
    assert again.summary["timing"]["read_bytes"] == pytest.approx(3 * per_checkpoint)
    _same_results(again, full)


def test_nothing_new_is_up_to_date(tmp_path):
    _, every = _growing_run(tmp_path, 6)
    out = tmp_path / "out"
    a = wdiff.run(every, out, render=False)
    before = _files(out)
    b = wdiff.run(every, out, render=False, max_points=500)
    assert b.summary["update"] == "up to date" and b.summary["timing"]["read_bytes"] == 0
    assert b.summary["tensors"] == a.summary["tensors"]
    assert (out / "accumulated.safetensors").read_bytes() == before["accumulated.safetensors"]
    assert b.summary["scene"]["points"] <= 500


@pytest.mark.parametrize("change", ["rewritten", "removed", "reordered", "other chunking"])
def test_changed_history_means_full_recompute(tmp_path, change):
    first, every = _growing_run(tmp_path, 4)
    out = tmp_path / "out"
    wdiff.run(first, out, render=False, chunk_elements=500)
    chunk = 500
    if change == "rewritten":
        seq = random_sequence(SHAPES, 2, seed=99)
        save(every[1], seq[1])
        os.utime(every[1], ns=(1, 1))  # a different modification time, like any rewrite
    elif change == "removed":
        every = [every[0], *every[2:]]
    elif change == "reordered":
        every = [every[1], every[0], *every[2:]]
    else:
        chunk = 300
    res = wdiff.run(every, out, render=False, chunk_elements=chunk)
    assert res.summary["update"] == "full"
    full = wdiff.run(every, tmp_path / "reference", render=False, chunk_elements=chunk, incremental=False)
    _same_results(res, full)
    shutil.rmtree(tmp_path / "reference")


def test_incremental_run_extends_rows_and_frames_like_a_full_run(tmp_path):
    """Rows and frames of a run grown by two checkpoints equal those of a full run over all five."""
    shapes = {"model.layers.0.w": (40, 9), "model.layers.0.b": (9,)}
    checkpoints = random_sequence(shapes, count=5, seed=3)
    root = trainer_run(tmp_path / "run", checkpoints, steps=[10, 20, 30, 40, 50])
    source = [root / f"checkpoint-{s}" for s in (10, 20, 30, 40, 50)]
    wdiff.run(source[:3], tmp_path / "inc", render=False, frames=True, frame_points=50)
    grown = wdiff.run(source, tmp_path / "inc", render=False, frames=True, frame_points=50)
    assert grown.summary["update"] == "incremental from 3"
    full = wdiff.run(source, tmp_path / "full", render=False, frames=True, frame_points=50)
    for name in shapes:
        assert grown.frames(name).shape[0] == 4
        np.testing.assert_array_equal(grown.frames(name), full.frames(name))
        np.testing.assert_array_equal(grown.neuron_change(name), full.neuron_change(name))
        assert grown.summary["tensors"][name]["interval_l1"] == full.summary["tensors"][name]["interval_l1"]
    again = wdiff.run(source, tmp_path / "inc", render=False, frames=True, frame_points=50)
    assert again.summary["update"] == "up to date"
    np.testing.assert_array_equal(again.frames(name), full.frames(name))
    wider = wdiff.run(source, tmp_path / "inc", render=False, frames=True, frame_points=200)
    assert wider.summary["update"] == "full"  # other frame grids: the old frames cannot be extended


def test_frame_budget_bounds_the_frames_of_long_runs():
    from wdiff.detail import FRAME_VALUES, frame_budget_for

    assert frame_budget_for(200_000, 7, 50) == 200_000  # a usual run keeps the budget asked for
    assert frame_budget_for(200_000, 100, 50) == 200_000  # 20 million cells: still within
    for intervals in (101, 1000, 10_000):
        budget = frame_budget_for(200_000, intervals, 50)
        assert budget * intervals <= FRAME_VALUES and budget * intervals > FRAME_VALUES // 2
    assert frame_budget_for(200_000, 150, 50) == frame_budget_for(200_000, 199, 50)  # steps, not a slope
    assert frame_budget_for(200_000, 10**9, 50) == 50  # never below one point per tensor
