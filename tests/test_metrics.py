"""Derived metrics against an independent float64 numpy reference computed from the checkpoints."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from factories import sgd_run, trainer_run

import wdiff
from wdiff import metrics

STEPS = (10, 20, 40, 50, 80, 85)  # unequal gaps: per-step values divide by 10, 20, 10, 30, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    checkpoints, steps = sgd_run(blocks=3, steps=STEPS, unused_rows={"embed.weight": [5]}, seed=3)
    root = trainer_run(tmp_path_factory.mktemp("metrics") / "run", checkpoints, steps)
    res = wdiff.run(root, root.parent / "out", render=False)
    return res, checkpoints


def _w(checkpoints, name):
    return [c[name].astype(np.float64) for c in checkpoints]


def test_tensor_metrics_match_numpy(run):
    res, checkpoints = run
    m = metrics.analyse(res)
    for t in m.tensors:
        w = _w(checkpoints, t["tensor"])
        d = [b - a for a, b in zip(w, w[1:])]
        path_l2 = sum(np.linalg.norm(x) for x in d)
        net = np.linalg.norm(w[-1] - w[0])
        mean_l2 = np.mean([np.linalg.norm(x) for x in w])
        cos = np.sum(w[-1] * w[0]) / (np.linalg.norm(w[-1]) * np.linalg.norm(w[0]))
        np.testing.assert_allclose(t["path_l1"], sum(np.abs(x).sum() for x in d), rtol=1e-5)
        np.testing.assert_allclose(t["path_l2"], path_l2, rtol=1e-5)
        np.testing.assert_allclose(t["net_l2"], net, rtol=1e-5)
        np.testing.assert_allclose(t["straightness"], net / path_l2, rtol=1e-5)
        np.testing.assert_allclose(t["relative_path"], path_l2 / mean_l2, rtol=1e-5)
        np.testing.assert_allclose(t["rotation"], 1 - cos, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(t["mean_change"], sum(np.abs(x).sum() for x in d) / w[0].size, rtol=1e-5)
        assert t["block"] == ("embed" if t["tensor"] == "embed.weight" else t["tensor"].rsplit(".", 2)[0])


def test_rows_match_numpy_row_sums(run):
    res, checkpoints = run
    m = metrics.analyse(res)
    for name, rows in m.neuron_change.items():
        w = _w(checkpoints, name)
        acc = sum(np.abs(b - a) for a, b in zip(w, w[1:]))
        expected = acc.reshape(acc.shape[0], -1).sum(axis=1)
        np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6 * expected.max())
    assert m.by_name["embed.weight"]["rows_unchanged"] == 1 and m.neuron_change["embed.weight"][5] == 0


def test_the_old_rows_names_still_work_and_say_they_are_deprecated(run):
    """``Results.rows`` and ``RunMetrics.rows`` (documented before the per-neuron change had its name)
    give the same arrays, with a DeprecationWarning naming the new name."""
    res, _ = run
    m = metrics.analyse(res)
    with pytest.warns(DeprecationWarning, match="use RunMetrics.neuron_change"):
        assert m.rows is m.neuron_change
    for name in res.names[:3]:
        with pytest.warns(DeprecationWarning, match="use Results.neuron_change"):
            old = res.rows(name)
        assert old.dtype == np.float64 and np.array_equal(old, res.neuron_change(name))
        np.testing.assert_array_equal(old, m.neuron_change[name])


def test_interval_metrics_and_training_log_join(run):
    res, checkpoints = run
    m = metrics.analyse(res)
    assert len(m.intervals) == len(res.names) * (len(STEPS) - 1)
    for row in m.intervals:
        w = _w(checkpoints, row["tensor"])
        i = row["interval"]
        d = w[i + 1] - w[i]
        gap = STEPS[i + 1] - STEPS[i]
        assert (row["step_start"], row["step_end"], row["step_gap"]) == (STEPS[i], STEPS[i + 1], gap)
        np.testing.assert_allclose(row["l2"], np.linalg.norm(d), rtol=1e-5)
        np.testing.assert_allclose(row["l2_per_step"], np.linalg.norm(d) / gap, rtol=1e-5)
        np.testing.assert_allclose(row["update_ratio"], np.linalg.norm(d) / np.linalg.norm(w[i]), rtol=1e-5)
        np.testing.assert_allclose(row["weight_l2"], np.linalg.norm(w[i + 1]), rtol=1e-5)
        if row["l1"] is not None:  # interval_l1 from compute, when the results have it
            np.testing.assert_allclose(row["l1"], np.abs(d).sum(), rtol=1e-5)
            np.testing.assert_allclose(row["l1_per_step"], np.abs(d).sum() / gap, rtol=1e-5)
        # factories.trainer_run logs loss 2 / (1 + step) at every checkpoint's step
        assert row["loss"] == pytest.approx(2.0 / (1 + STEPS[i + 1]))
        assert row["learning_rate"] == pytest.approx(1e-3)
        assert row["grad_norm"] is None or np.isnan(row["grad_norm"])


def test_block_heatmap_values_match_numpy(run):
    res, checkpoints = run
    m = metrics.analyse(res)
    for b, block in enumerate(m.blocks):
        names = [n for n in res.names if m.by_name[n]["block"] == block]
        for i in range(len(STEPS) - 1):
            dw = sum(np.sum((c2[n].astype(np.float64) - c1[n]) ** 2) for n in names for c1, c2 in
                     [(checkpoints[i], checkpoints[i + 1])])  # fmt: skip
            ww = sum(np.sum(checkpoints[i][n].astype(np.float64) ** 2) for n in names)
            expected = np.sqrt(dw) / np.sqrt(ww) / (STEPS[i + 1] - STEPS[i])
            np.testing.assert_allclose(m.block_update[b, i], expected, rtol=1e-5)


def test_metrics_csv_has_one_row_per_tensor_per_interval(run):
    res, _ = run
    with open(res.path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res.names) * (len(STEPS) - 1)
    for column in (
        "tensor",
        "interval",
        "step_start",
        "step_end",
        "l1",
        "l2",
        "update_ratio",
        "loss",
        "learning_rate",
    ):
        assert column in rows[0]
    assert {(r["tensor"], int(r["interval"])) for r in rows} == {
        (n, i) for n in res.names for i in range(len(STEPS) - 1)
    }
    with open(res.path / "tensors.csv", newline="") as f:
        assert [r["tensor"] for r in csv.DictReader(f)] == res.names


def test_group_and_ranges():
    assert metrics.group_of("model.layers.7.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
    assert metrics.group_of("transformer.h.0.attn.c_attn.bias") == "transformer.h.*.attn.c_attn.bias"
    assert metrics.group_of("transformer.wte.weight") is None
    assert metrics.ranges(np.array([0, 1, 2, 7, 9, 10])) == [[0, 2], [7, 7], [9, 10]]
    assert metrics.ranges(np.array([], dtype=int)) == []
