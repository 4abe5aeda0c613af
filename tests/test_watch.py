"""``wdiff watch``: following a live training run, against a batch run over the same checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import assert_same_results, random_sequence, save, trainer_run
from live_writer import SHAPES

from wdiff import api
from wdiff.errors import WdiffError
from wdiff.results import Results
from wdiff.watcher import KEPT_FIRST, KEPT_LAST, Watcher

OPTIONS = {"render": False, "max_points": 512, "chunk_elements": 1000}


def _batch(tmp: Path, seq: list[dict], steps: list[int], **options) -> Results:
    run = trainer_run(tmp / "batch-run", seq, steps)
    return api.run(run, tmp / "batch-out", **{**OPTIONS, **options})


def _save_checkpoint(root: Path, step: int, tensors: dict, state: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    save(folder / "model.safetensors", tensors)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def _polls(watcher: Watcher, n: int) -> list[Results]:
    return [r for _ in range(n) for r in watcher.poll()]


def test_watch_survives_save_total_limit_1_and_equals_a_batch_run(tmp_path):
    """Every step deterministic: each checkpoint deletes all older ones the moment it is complete."""
    steps = [10, 20, 30, 40, 50]
    seq = random_sequence(SHAPES, len(steps), seed=5)
    root, out = tmp_path / "run", tmp_path / "out"
    root.mkdir()
    watcher = Watcher(root, out, settle=1, **OPTIONS)
    _save_checkpoint(root, 10, seq[0])
    assert _polls(watcher, 3) == []  # one checkpoint: nothing to compute yet
    for step, tensors in zip(steps[1:], seq[1:]):
        folder = _save_checkpoint(root, step, tensors, state=False)
        assert _polls(watcher, 2) == []  # no trainer_state.json yet: incomplete
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        updates = _polls(watcher, 2)
        assert len(updates) == 1 and updates[0].summary["checkpoints"][-1]["step"] == step
        expected = "full" if step == 20 else f"incremental from {steps.index(step)}"
        assert updates[0].summary["update"] == expected
        for older in root.iterdir():  # save_total_limit=1
            if older != folder:
                for f in older.iterdir():
                    f.unlink()
                older.rmdir()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-50"]
    assert (out / KEPT_FIRST).is_file() and (out / KEPT_LAST).is_file()
    assert_same_results(Results.load(out), _batch(tmp_path, seq, steps))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-out", "batch-run", "out", "run"]


def test_growing_file_waits_and_a_broken_older_checkpoint_is_an_error(tmp_path):
    seq = random_sequence(SHAPES, 4, seed=6)
    root, out = tmp_path / "run", tmp_path / "out"
    for step, tensors in zip([1, 2], seq):
        _save_checkpoint(root, step, tensors)
    watcher = Watcher(root, out, settle=2, **OPTIONS)
    assert len(_polls(watcher, 3)) == 1
    third = _save_checkpoint(root, 3, seq[2])
    weights = (third / "model.safetensors").read_bytes()
    (third / "model.safetensors").write_bytes(weights[:100])  # still being written: the file grows
    assert _polls(watcher, 4) == []
    (third / "model.safetensors").write_bytes(weights)
    assert _polls(watcher, 2) == [] and len(_polls(watcher, 1)) == 1  # unchanged over two polls
    # checkpoint 4 is complete while a stalled checkpoint 4 ... an older one stays broken: an error
    fourth = _save_checkpoint(root, 4, seq[3])
    _save_checkpoint(root, 5, seq[3])
    (fourth / "model.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(WdiffError, match="checkpoint-4: is broken while a newer checkpoint is complete"):
        _polls(watcher, 4)
    assert Results.load(out).summary["checkpoints"][-1]["step"] == 3  # OUT kept the last good update


def test_watch_command_follows_a_live_writer_to_the_end_and_stops_on_ctrl_c(tmp_path):
    steps = [100, 200, 300, 400, 500]
    root, out = tmp_path / "run", tmp_path / "out"
    root.mkdir()
    watch = subprocess.Popen(
        [sys.executable, "-m", "wdiff", "watch", str(root), "-o", str(out), "--poll", "0.2",
         "--no-render", "--max-points", "512", "--chunk-mb", "0.004"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "live_writer.py"), str(root),
         "--steps", *map(str, steps), "--limit", "2", "--pause", "1.5", "--seed", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert writer.returncode == 0, writer.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the watch has added the last checkpoint
        summary = out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text())["checkpoints"][-1]["step"] == steps[-1]:
            break
        time.sleep(0.2)
    watch.send_signal(signal.SIGINT)
    stdout, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"results cover 5 checkpoints, steps {steps[0]} .. {steps[-1]}" in stdout
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-400", "checkpoint-500"]  # limit 2
    seq = random_sequence(SHAPES, len(steps), seed=4)
    chunk = int(0.004 * (1 << 20) / 4)  # what --chunk-mb 0.004 gives: the same sums in the same order
    assert_same_results(Results.load(out), _batch(tmp_path, seq, steps, chunk_elements=chunk))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-out", "batch-run", "out", "run"]


def test_a_restarted_watch_continues_from_out(tmp_path):
    steps = [1, 2, 3, 4]
    seq = random_sequence(SHAPES, len(steps), seed=8)
    root, out = tmp_path / "run", tmp_path / "out"
    for step, tensors in zip(steps[:3], seq):
        _save_checkpoint(root, step, tensors)
    assert len(_polls(Watcher(root, out, settle=1, **OPTIONS), 2)) == 2  # start from 2, then one more
    for old in ("checkpoint-1", "checkpoint-2"):  # deleted while no watch was running
        for f in (root / old).iterdir():
            f.unlink()
        (root / old).rmdir()
    _save_checkpoint(root, 4, seq[3])
    updates = _polls(Watcher(root, out, settle=1, **OPTIONS), 2)  # a new process, the same OUT
    assert [u.summary["update"] for u in updates] == ["incremental from 3"]
    assert_same_results(updates[0], _batch(tmp_path, seq, steps))


def test_watch_has_every_run_option():
    import inspect
    from typing import get_args

    from wdiff import cli

    run = inspect.signature(cli.run_command, eval_str=True).parameters
    watch = inspect.signature(cli.watch_command).parameters
    # inputs, and what only a sequence in a remote store needs (watch follows a local folder); --json and
    # --fail-on sum up and gate one finished run (a watch prints a line per update and ends on Ctrl-C)
    own = ("inputs", "revisions", "commit_every", "json_output", "fail_on")
    # how a watch ends: --until-file, --parent-pid (what wdiff.integrations starts it with)
    watch_only = ("folder", "poll", "until_file", "parent_pid")
    assert [n for n in watch if n not in watch_only] == [n for n in run if n not in own]
    for name in (n for n in run if n not in own):
        (kind, option), (same_kind, same_option) = (get_args(x[name].annotation) for x in (watch, run))
        assert kind == same_kind and watch[name].default == run[name].default
        assert (option.param_decls, option.help) == (same_option.param_decls, same_option.help)
    p = subprocess.run([sys.executable, "-m", "wdiff", "watch", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--poll" in p.stdout and "--chunk-mb" in p.stdout
