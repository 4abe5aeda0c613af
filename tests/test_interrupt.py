"""Killing ``wdiff run`` at any moment leaves the previous results intact, and the next run completes.

A real ``python -m wdiff run`` process is killed (SIGKILL, and SIGINT as Ctrl-C sends it) at random
moments spread over a whole run: importing, scanning, computing, writing the scene, swapping the
results in. After every kill OUT holds either the previous results, byte for byte, or the complete
new ones; the checkpoints are never modified.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from factories import random_sequence, reference, trainer_run
from test_corpus import tree_hash

from wdiff import api
from wdiff.results import Results

SHAPES = {"layers.0.w": (512, 1024), "layers.1.w": (1024, 256), "layers.1.b": (256,)}


def _start(run: Path, out: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "wdiff", "run", str(run), "-o", str(out), "--no-render", "-q"]
    args += ["--chunk-mb", "0.25", "--max-points", "4096"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _is_complete_new(out: Path, seq: list[dict]) -> bool:
    res = Results.load(out)
    if len(res.summary["checkpoints"]) != len(seq):
        return False
    for name in SHAPES:
        ref = reference(seq, name)
        np.testing.assert_allclose(res.accumulated(name), ref["accumulated"], rtol=1e-5, atol=1e-6)
    return True


def test_sigkill_and_sigint_at_random_moments_never_break_out(tmp_path):
    seq = random_sequence(SHAPES, 4, seed=11)
    run = trainer_run(tmp_path / "run", seq[:3], steps=[100, 200, 300])
    out = tmp_path / "out"
    api.run(run, out, render=False, max_points=4096)  # the previous results: 3 checkpoints
    old = tree_hash(out)
    trainer_run(tmp_path / "run", seq, steps=[100, 200, 300, 400])  # training saved one more
    inputs = tree_hash(run)

    t0 = time.perf_counter()
    probe = _start(run, tmp_path / "probe")  # how long a whole run takes here, to spread the kills
    assert probe.wait(timeout=300) == 0, probe.stderr.read()
    duration = time.perf_counter() - t0

    rng = random.Random(7)
    # most of a short run is interpreter start-up: crowd the moments into its second half
    moments = sorted([rng.uniform(0.05, 0.5) * duration for _ in range(2)] +
                     [rng.uniform(0.5, 1.4) * duration for _ in range(8)])  # fmt: skip
    outcomes = []
    for i, moment in enumerate(moments):
        sig = signal.SIGINT if i % 4 == 3 else signal.SIGKILL
        proc = _start(run, out)
        time.sleep(moment)
        proc.send_signal(sig)
        code = proc.wait(timeout=300)
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr, stderr
        if sig == signal.SIGINT:
            assert code in (0, 130), stderr
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert all(".wdiff-" in p for p in leftovers)  # a SIGKILLed run may leave its temp folder
        mid = " mid-write" if any("-tmp-" in p for p in leftovers) else ""
        if tree_hash(out) == old:
            outcomes.append(f"{sig.name} at {moment:.2f}s{mid}: previous results kept")
        else:
            assert _is_complete_new(out, seq), f"{sig.name} at {moment:.2f}s left OUT broken"
            outcomes.append(f"{sig.name} at {moment:.2f}s{mid}: new results complete")
            old = tree_hash(out)  # later kills must keep these
    print(f"run {duration:.2f}s;", "; ".join(outcomes))

    proc = _start(run, out)  # the next run completes and clears what the killed ones left
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert _is_complete_new(out, seq)
    assert json.loads((out / "summary.json").read_text())["checkpoints"][-1]["step"] == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "probe", "run"]
    assert tree_hash(run) == inputs, "a checkpoint was modified"


def test_checkpoints_are_opened_read_only(tmp_path):
    """Even a checkpoint wdiff cannot write to is read as usual (and never changed)."""
    seq = random_sequence({"w": (64, 32)}, 3, seed=2)
    run = trainer_run(tmp_path / "run", seq, steps=[1, 2, 3])
    files = [p for p in run.rglob("*") if p.is_file()]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    for p in files:
        p.chmod(0o444)
    os.chmod(run, 0o555)
    try:
        api.run(run, tmp_path / "out", render=False, max_points=256)
    finally:
        os.chmod(run, 0o755)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == stamps
