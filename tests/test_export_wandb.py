"""wdiff.export.wandb in W&B's offline mode (no network, no login): what the run wrote is read back from
its ``.wandb`` transaction log (W&B's Record protos, framed as a LevelDB log) and its media files, and
checked against summary.json, tensors.csv, findings.json and frames.gif."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from factories import trainer_run
from test_export_tensorboard import SMALL, STEPS, _expected, _sequence

from wdiff import api
from wdiff.errors import WdiffError
from wdiff.export.wandb import WandbRun, export

STEP_KEY = "train/global_step"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """Results of one run at 3 checkpoints and, grown, at 5 (the same checkpoint files)."""
    root = tmp_path_factory.mktemp("wandb")
    run = trainer_run(root / "run", _sequence(), STEPS)
    later = root / "later"
    later.mkdir()
    for step in STEPS[3:]:
        (run / f"checkpoint-{step}").rename(later / f"checkpoint-{step}")
    api.run(run, root / "out", scene=SMALL)
    shutil.copytree(root / "out", root / "out3")
    for step in STEPS[3:]:
        (later / f"checkpoint-{step}").rename(run / f"checkpoint-{step}")
    res = api.run(run, root / "out", scene=SMALL)
    yield {"out3": root / "out3", "out": root / "out", "summary": res.summary, "run": run}
    import wandb

    wandb.teardown()  # the wandb-core service this process started


# --- reading an offline run back ----------------------------------------------------------------

BLOCK = 32768  # a LevelDB log: records in 32 KiB blocks, each chunk behind a 7-byte header


def records(run_dir: Path) -> list:
    """Every Record of an offline run's ``run-<id>.wandb``, each chunk's CRC-32 checked."""
    from wandb.proto import wandb_internal_pb2 as pb

    from wdiff.export.wandb import flush

    flush()  # run.finish() returns before the log is all written: wait for W&B's service

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)  # W&B's file header
    found, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def history(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every ``wandb.log``; media as their JSON fields ("render/render.png/path")."""
    rows = []
    for r in records(run_dir):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.append((r.history.step.num, items))
    return rows


def metrics(run_dir: Path) -> dict[str, str]:
    return {
        r.metric.glob_name or r.metric.name: r.metric.step_metric
        for r in records(run_dir)
        if r.WhichOneof("record_type") == "metric"
    }


def scalars(rows: list[tuple[int, dict]]) -> dict[str, dict[int, float]]:
    got: dict[str, dict[int, float]] = {}
    for _, items in rows:
        for key, value in items.items():
            if key.startswith(("model/", "block.", "tensor.")):
                got.setdefault(key, {})[items[STEP_KEY]] = value
    return got


# --- the tests -----------------------------------------------------------------------------------


def test_the_series_media_and_tables_of_a_run(outs):
    import imageio.v3 as iio

    out = outs["out"]
    logged = export(out, project="wdiff-tests", name="grown")
    assert logged.steps == STEPS and logged.checkpoints == 5 and logged.tables == 3
    rows = history(logged.run_dir)
    assert [step for step, _ in rows] == STEPS  # wandb.log(step=training step), once each
    assert all(items[STEP_KEY] == step for step, items in rows)
    want = _expected(outs["summary"])
    got = scalars(rows)
    assert sorted(got) == sorted(want)
    for tag, series in want.items():  # W&B keeps float64: the very numbers of summary.json
        assert list(got[tag]) == list(series), tag
        np.testing.assert_allclose(list(got[tag].values()), list(series.values()), rtol=1e-12, err_msg=tag)
    defined = metrics(logged.run_dir)
    assert defined[STEP_KEY] == "" and all(defined[g] == STEP_KEY for g in ("model/*", "block.*", "tensor.*"))

    files = logged.run_dir / "files"
    film = iio.imread(out / "frames.gif", index=None)[..., :3]
    frames = [(s, items) for s, items in rows if "frames/change_per_interval/path" in items]
    assert [s for s, _ in frames] == STEPS[1:]  # each interval's frame at the step that ends it
    for (_, items), picture in zip(frames, film):
        assert items["frames/change_per_interval/_type"] == "image-file"
        np.testing.assert_array_equal(iio.imread(files / items["frames/change_per_interval/path"]), picture)
    last = rows[-1][1]
    assert (files / last["render/render.png/path"]).read_bytes() == (out / "render.png").read_bytes()
    assert last["frames/film/_type"] == "video-file"
    assert (files / last["frames/film/path"]).read_bytes() == (out / "frames.gif").read_bytes()

    table = json.loads((files / last["wdiff/tensors/path"]).read_text())
    with open(out / "tensors.csv", newline="") as f:
        tensors = list(csv.reader(f))
    assert table["columns"] == tensors[0] and len(table["data"]) == len(tensors) - 1 == 5
    for row, line in zip(table["data"], tensors[1:]):
        for value, text in zip(row, line):
            if isinstance(value, float):
                assert value == pytest.approx(float(text), rel=1e-15)
            else:
                assert ("" if value is None else str(value)) == text
    findings = json.loads((out / "findings.json").read_text())["findings"]
    table = json.loads((files / last["wdiff/findings/path"]).read_text())
    assert [(r[1], r[2], r[5]) for r in table["data"]] == [
        (f["kind"], f["tensor"], f["message"]) for f in findings
    ]
    assert any(r[1] == "frozen" for r in table["data"])
    advice = json.loads((files / last["wdiff/what_to_change/path"]).read_text())
    assert advice["data"][0][0].startswith("what to change") and "frozen.weight" in advice["data"][1][0]


def test_one_run_fed_as_the_results_grow_logs_each_checkpoint_once(outs):
    with WandbRun(project="wdiff-tests") as run:
        first = run.update(outs["out3"])
        second = run.update(outs["out"])
        again = run.update(outs["out"])
        with pytest.raises(WdiffError, match="not the run this W&B run holds"):
            run.update(outs["out3"])  # fewer checkpoints than logged: not this run grown
    assert first.steps == STEPS[:3] and second.steps == STEPS[3:] and again.steps == []
    assert first.run_id == second.run_id == again.run_id
    rows = history(second.run_dir)
    assert [step for step, _ in rows] == STEPS
    got = scalars(rows)
    want = _expected(outs["summary"])
    for tag, series in want.items():  # the first three points are those of the 3-checkpoint results
        np.testing.assert_allclose(list(got[tag].values()), list(series.values()), rtol=1e-12, err_msg=tag)
    renders = [s for s, items in rows if "render/render.png/path" in items]
    assert renders == [30, 50]


def test_into_an_active_run_against_its_own_steps(outs):
    """A training's own run (what a callback passes): wdiff's keys use train/global_step as their x
    axis, the run's own step goes on counting, and the run is left open."""
    import wandb

    training = wandb.init(project="wdiff-tests", reinit="create_new")
    for i in range(3):
        training.log({"train/loss": 1.0 / (i + 1)})
    logged = export(outs["out"], run=training)
    training.log({"train/loss": 0.125})  # still open
    training.finish()
    rows = history(logged.run_dir)
    assert [step for step, _ in rows] == list(range(3 + 5 + 1))
    assert [items[STEP_KEY] for _, items in rows if STEP_KEY in items] == STEPS
    assert rows[-1][1]["train/loss"] == 0.125
    assert metrics(logged.run_dir)["tensor.*"] == STEP_KEY
    assert "train/loss" not in metrics(logged.run_dir)  # the training's keys keep their own x axis


def _wdiff(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_command_and_run_option(outs, tmp_path):
    env = {**os.environ}
    p = _wdiff("wandb", str(outs["out"]), "--project", "wdiff-tests", "--name", "cli", env=env)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    count = sum(map(len, _expected(outs["summary"]).values()))
    assert line.startswith("W&B run ") and line.endswith(
        f"5 new checkpoints (steps 10 .. 50): {count} scalars, 6 images, 3 tables"
    )
    p = _wdiff(
        "run", str(outs["run"]), "-o", str(tmp_path / "out"), "--no-render", "--wandb", "wdiff-tests", env=env
    )
    assert p.returncode == 0, p.stderr
    assert ": 5 new checkpoints (steps 10 .. 50): " in p.stderr
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert [step for step, _ in history(runs[-1])] == STEPS
    p = _wdiff("run", str(outs["run"]), "-o", str(tmp_path / "out2"), "--wandb", " ", env=env)
    assert p.returncode == 2 and p.stderr.strip() == "wdiff: error: the W&B project name is empty"
    assert not (tmp_path / "out2").exists()


def test_watch_exports_each_update_once(tmp_path):
    """``wdiff watch --tensorboard --wandb`` on a live run: after each update what is new, into one
    event file per update and one W&B run for the whole watch."""
    import signal
    import time

    from test_export_tensorboard import _accumulator

    steps = [100, 200, 300, 400]
    root, out, logdir = tmp_path / "run", tmp_path / "out", tmp_path / "tb"
    root.mkdir()
    watch = subprocess.Popen(
        [sys.executable, "-m", "wdiff", "watch", str(root), "-o", str(out), "--poll", "0.2", "--no-render",
         "--max-points", "512", "--tensorboard", str(logdir), "--wandb", "wdiff-tests"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "live_writer.py"), str(root),
         "--steps", *map(str, steps), "--limit", "2", "--pause", "1.5", "--seed", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert writer.returncode == 0, writer.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the last checkpoint is exported
        if any(p.name.endswith(f".wdiff-{len(steps):08d}") for p in logdir.glob("events.out.tfevents.*")):
            break
        time.sleep(0.2)
    watch.send_signal(signal.SIGINT)
    _, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 0, stderr
    updates = stderr.count(" new checkpoint")
    assert updates >= 4 and stderr.count(f"{logdir}: ") == updates // 2  # one line each per update
    assert len(list(logdir.glob("events.out.tfevents.*"))) == updates // 2
    acc = _accumulator(logdir)
    assert [e.step for e in acc.Scalars("tensor.weight_l2/layers.0.w")] == steps
    assert [e.step for e in acc.Scalars("block.update_ratio_per_step/layers.1")] == steps[1:]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")  # one W&B run for the whole watch
    rows = history(run_dir)
    assert [step for step, _ in rows] == steps
    summary = json.loads((out / "summary.json").read_text())
    got = scalars(rows)
    blocks = {"layers.0": ["layers.0.w", "layers.0.b"], "layers.1": ["layers.1.w"]}
    want = _expected(summary, blocks)
    assert sorted(got) == sorted(want)
    for tag, series in want.items():
        np.testing.assert_allclose(list(got[tag].values()), list(series.values()), rtol=1e-12, err_msg=tag)
