"""The command line: exit codes, one-line errors, stdout summary, ``python -m wdiff``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from factories import random_sequence, reference, trainer_run


def wdiff(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_on_every_command():
    for args in (["--help"], ["run", "--help"]):
        p = wdiff(*args)
        assert p.returncode == 0 and "Usage" in p.stdout
    assert wdiff("--version").stdout.startswith("wdiff ")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "/nonexistent/run", "-o", "OUT"], "/nonexistent/run: no such file or folder"),
        (["run", "{bad}", "{bad}", "-o", "OUT"], "{bad}: safetensors header is not valid JSON"),
        (["run", "{bad}", "-o", "OUT"], "{bad}: found 1 checkpoint(s); at least two"),
        (["run", "{bad}", "{bad}", "-o", "OUT", "--max-points", "0"], "--max-points"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    args = [a.replace("{bad}", str(bad)).replace("OUT", str(tmp_path / "out")) for a in args]
    needle = needle.replace("{bad}", str(bad))
    p = wdiff(*args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_usage_error_exits_2():
    p = wdiff("run")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_refuses_to_replace_a_folder_that_is_not_wdiff_output(tmp_path):
    run = trainer_run(tmp_path / "run", random_sequence({"w": (3, 3)}, 2), steps=[1, 2])
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    p = wdiff("run", str(run), "-o", str(precious), "--no-render")
    assert p.returncode == 2 and "holds no wdiff results" in p.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_run_writes_results_and_prints_one_line(tmp_path):
    seq = random_sequence({"layers.0.w": (20, 30), "layers.1.b": (30,)}, 3)
    run = trainer_run(tmp_path / "run", seq, steps=[5, 10, 15])
    out = tmp_path / "out"
    p = wdiff("run", str(run), "-o", str(out), "--no-render", "--quiet", "--chunk-mb", "0.001")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1 and "2 tensors over 3 checkpoints" in p.stdout
    assert p.stderr == ""
    summary = json.loads((out / "summary.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [5, 10, 15]
    ref = reference(seq, "layers.0.w")
    np.testing.assert_allclose(summary["tensors"]["layers.0.w"]["net_l2"], ref["net_l2"], rtol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == [
        ".wdiff-results",  # the marker: what makes OUT results (wdiff.marker)
        "accumulated.safetensors",
        "findings.json",
        "metrics.csv",
        "points.ply",
        "pooled.safetensors",
        "report.html",
        "rows.safetensors",
        "scene.html",  # every run writes the HTML viewer; render.png not with --no-render
        "summary.json",
        "tensors.csv",
    ]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert modes == {name: oct(0o666 & ~umask) for name in modes}  # ordinary files, none private
    # a second run replaces the results in place, leaving no temporary folders behind
    p = wdiff("run", str(run), "-o", str(out), "--no-render", "-q")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "run"]
