"""``Results.metrics_frame()`` (pandas) and ``Results.metrics_dataset()`` (xarray): every value against
a float64 numpy computation from the checkpoints themselves, and against ``metrics.csv``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from factories import random_sequence, reference, save, trainer_run

import wdiff
from wdiff.timeline import INTERVAL_COLUMNS

SHAPES = {"embed.weight": (6, 4), "h.0.w": (4, 4), "h.0.b": (4,), "h.1.w": (5, 3)}
STEPS = [0, 5, 20, 21]  # uneven gaps: per-step values differ from per-interval ones
ORDER = ["embed.weight", "h.0.b", "h.0.w", "h.1.w"]  # res.names: blocks in network order, A-Z in one


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    checkpoints = random_sequence(SHAPES, len(STEPS), seed=3)
    checkpoints[3]["h.1.w"][2, 1] = np.nan  # a NaN in the last checkpoint: nonfinite, and NaN change
    checkpoints[3]["h.1.w"][4, 0] = np.inf
    root = trainer_run(tmp_path_factory.mktemp("frame") / "run", checkpoints, STEPS)
    return checkpoints, wdiff.run(root, root.parent / "out", render=False)


def _norm(x: np.ndarray) -> float:
    """‖x‖ over its finite elements: wdiff leaves NaN/Inf out of the norms (docs/metrics.md)."""
    return float(np.linalg.norm(x[np.isfinite(x)]))


def _expected(checkpoints) -> pd.DataFrame:
    """The table computed with numpy from the checkpoints (and the log ``trainer_run`` wrote)."""
    rows = []
    for name in ORDER:
        w = [np.asarray(c[name], np.float64).ravel() for c in checkpoints]
        for i in range(len(STEPS) - 1):
            gap = STEPS[i + 1] - STEPS[i]
            d = w[i + 1] - w[i]
            l1, l2 = float(np.abs(d[np.isfinite(d)]).sum()), _norm(d)
            a, b = _norm(w[i + 1]), _norm(w[0])
            if np.isfinite(w[i + 1]).all():
                rotation = 1 - np.dot(w[i + 1], w[0]) / (a * b)
            else:  # 1 - cos by the law of cosines, each norm over what is finite (wdiff.compute)
                rotation = (_norm(w[i + 1] - w[0]) ** 2 - (a - b) ** 2) / (2 * a * b)
            rows.append(
                {
                    "tensor": name,
                    "block": name.rsplit(".", 1)[0],
                    "interval": i,
                    "step_start": STEPS[i],
                    "step_end": STEPS[i + 1],
                    "step_gap": gap,
                    "l1": l1,
                    "l2": l2,
                    "l1_per_step": l1 / gap,
                    "l2_per_step": l2 / gap,
                    "update_ratio": l2 / _norm(w[i]),
                    "weight_l2": _norm(w[i + 1]),
                    "rotation": rotation,
                    "nonfinite": int(np.count_nonzero(~np.isfinite(w[i + 1]))),
                    "loss": 2.0 / (1 + STEPS[i + 1]),  # logged at each checkpoint's step
                    "learning_rate": 1e-3,
                    "grad_norm": np.nan,  # the log holds NaN: null in summary.json
                    "eval_loss": np.nan,  # never logged
                }
            )
    return pd.DataFrame(rows)


def test_metrics_frame_against_numpy_from_the_checkpoints(run):
    checkpoints, res = run
    frame = res.metrics_frame()
    assert tuple(frame.columns) == INTERVAL_COLUMNS
    assert len(frame) == len(SHAPES) * (len(STEPS) - 1)
    for column in ("interval", "step_start", "step_end", "step_gap", "nonfinite"):
        assert frame[column].dtype == np.int64, column
    want = _expected(checkpoints)
    assert res.names == ORDER
    assert list(frame["tensor"]) == list(want["tensor"]) and list(frame["block"]) == list(want["block"])
    for column in INTERVAL_COLUMNS[2:]:
        np.testing.assert_allclose(frame[column], want[column].astype(float), rtol=1e-5, err_msg=column)
    assert frame["nonfinite"].sum() == 2  # the NaN and the Inf of h.1.w in the last checkpoint
    assert frame.loc[(frame.tensor == "h.1.w") & (frame.interval == 2), "nonfinite"].item() == 2


def test_metrics_frame_is_metrics_csv(run):
    _, res = run
    stored = pd.read_csv(res.path / "metrics.csv")
    pd.testing.assert_frame_equal(res.metrics_frame(), stored, check_dtype=False, rtol=0, atol=0)


def test_metrics_dataset_has_the_frame_values_on_tensor_by_interval(run):
    _, res = run
    ds = res.metrics_dataset()
    frame = res.metrics_frame()
    intervals = len(STEPS) - 1
    assert dict(ds.sizes) == {"tensor": len(SHAPES), "interval": intervals}
    assert list(ds["tensor"].values) == ORDER
    assert list(ds["block"].values) == ["embed", "h.0", "h.0", "h.1"]
    assert list(ds["step_start"].values) == STEPS[:-1] and list(ds["step_end"].values) == STEPS[1:]
    assert list(ds["step_gap"].values) == [5, 15, 1]
    for name in (
        "l1",
        "l2",
        "l1_per_step",
        "l2_per_step",
        "update_ratio",
        "weight_l2",
        "rotation",
        "nonfinite",
    ):
        assert ds[name].dims == ("tensor", "interval")
        for tensor in SHAPES:
            got = ds[name].sel(tensor=tensor).values
            np.testing.assert_array_equal(got, frame[frame.tensor == tensor][name].to_numpy(), err_msg=name)
    for name in ("loss", "learning_rate", "grad_norm", "eval_loss"):
        assert ds[name].dims == ("interval",)
        np.testing.assert_array_equal(ds[name].values, frame[name].to_numpy()[:intervals])
    # the update ratio per step of one tensor, by label: ||dW|| / ||W(t)|| / gap
    got = float(ds["update_ratio"].sel(tensor="h.0.w", interval=1) / ds["step_gap"].sel(interval=1))
    assert got == pytest.approx(frame.update_ratio[(frame.tensor == "h.0.w")].iloc[1] / 15)


def test_checkpoints_without_steps_give_nan_steps(tmp_path):
    seq = random_sequence({"w": (3, 4)}, 3, seed=1)
    paths = [save(tmp_path / "run" / f"{n}.safetensors", c) for n, c in zip(("base", "tuned", "final"), seq)]
    res = wdiff.run(paths, tmp_path / "out", render=False)
    frame = res.metrics_frame()
    for column in ("step_start", "step_end", "step_gap", "l1_per_step", "l2_per_step", "loss"):
        assert frame[column].dtype == np.float64 and frame[column].isna().all(), column
    np.testing.assert_allclose(frame["l1"], reference(seq, "w")["interval_l1"], rtol=1e-6)
    assert res.metrics_dataset()["step_end"].isnull().all()


@pytest.mark.parametrize("package, method", [("pandas", "metrics_frame"), ("xarray", "metrics_dataset")])
def test_a_missing_package_is_one_line_naming_the_extra(run, package, method):
    _, res = run
    script = (
        f"import sys; sys.modules[{package!r}] = None  # what Python does for a package not installed\n"
        "import wdiff\n"
        f"try:\n    wdiff.Results.load({str(res.path)!r}).{method}()\n"
        "except wdiff.WdiffError as e:\n    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.stdout == f"Results.{method} needs {package}: pip install 'wdiff[notebook]'\n", p.stderr


def test_what_the_user_guide_says_about_the_gpt2_update_ratio(tmp_path):
    """user-guide.md, under its metrics_frame plot: per block, the median update ratio per step falls 59x
    (h.1) to 250x (ln_f) from the first interval to the last; ln_f is the lowest in every interval."""
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "digits-gpt2"
    frame = wdiff.run(sample, tmp_path / "out", render=False).metrics_frame()
    frame["ratio_per_step"] = frame.update_ratio / frame.step_gap
    per_block = frame.pivot_table(
        index="step_end", columns="block", values="ratio_per_step", aggfunc="median"
    )
    fall = per_block.iloc[0] / per_block.iloc[-1]
    assert fall.idxmin() == "transformer.h.1" and round(fall.min()) == 59
    assert fall.idxmax() == "transformer.ln_f" and round(fall.max(), -1) == 250
    assert set(per_block.idxmin(axis=1)) == {"transformer.ln_f"}
    # the learning rate the plot draws beside it: the trainer's log, decaying to 0 at step 400
    lr = frame.groupby("step_end").learning_rate.first()
    assert list(lr.index) == list(range(100, 401, 50)) and lr.is_monotonic_decreasing and lr.iloc[-1] < 1e-5
