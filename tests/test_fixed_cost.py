"""What a whole ``wdiff run`` process loads: a run that draws no picture never imports matplotlib
(its import and the report's charts were the largest fixed cost of a --no-render run), nor onnx
when no checkpoint is ONNX, nor rich under --quiet. Checked in a real CLI process, at its exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from factories import random_sequence, reference, trainer_run

# Runs the real CLI; at its exit (cli._exit_now ends the process with os._exit) prints which of the
# heavy packages are loaded and which side threads were started, as JSON on stderr's last line.
_PROBE = """
import json, os, sys, threading
from wdiff import _warm, cli
_real_exit = os._exit
def _exit(code):
    heavy = ("matplotlib", "open3d", "onnx", "dask", "numba", "rich")
    seen = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
    threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("wdiff-warm"))
    started = {"kernels": _warm._kernels is not None, "plotting": _warm._plotting is not None}
    worker = "wdiff.worker" in sys.modules and sys.modules["wdiff.worker"].started()
    said = {"modules": seen, "threads": threads, "started": started, "worker": worker}
    sys.stderr.write("\\n" + json.dumps(said) + "\\n")
    sys.stderr.flush()
    _real_exit(code)
os._exit = _exit
sys.argv = ["wdiff", *sys.argv[1:]]
cli.main()
"""


def _probe(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300)
    return p, json.loads(p.stderr.strip().splitlines()[-1])


def test_no_render_run_never_imports_matplotlib(tmp_path):
    checkpoints = random_sequence({"embed.weight": (64, 32), "h.0.w": (32, 32), "h.0.b": (32,)}, 3)
    run = trainer_run(tmp_path / "run", checkpoints, steps=[10, 20, 30])
    out = tmp_path / "out"
    p, seen = _probe("run", str(run), "-o", str(out), "--no-render", "--quiet")
    assert p.returncode == 0, p.stderr
    assert seen["modules"] == ["dask", "numba"], seen  # no matplotlib, open3d, onnx, nor rich (--quiet)
    assert seen["started"] == {"kernels": True, "plotting": False}
    assert not seen["worker"], "no picture worker for a run without pictures"
    # ... and the run did its work: results, PLY coloured from the shipped table, scene.html, report
    from wdiff.results import Results

    res = Results.load(out)
    for name in ("embed.weight", "h.0.w"):
        np.testing.assert_allclose(
            res.accumulated(name), reference(checkpoints, name)["accumulated"], rtol=1e-6
        )
    for name in ("points.ply", "scene.html", "findings.json", "metrics.csv", "tensors.csv", "report.html"):
        assert (out / name).is_file(), name
    assert "Charts skipped (--no-render)" in (out / "report.html").read_text()


def test_a_run_with_pictures_loads_matplotlib_early(tmp_path):
    """The counterpart: a rendering run starts the matplotlib thread (and uses it); Open3D renders
    in the picture worker (``wdiff.worker``), so this process never imports it."""
    checkpoints = random_sequence({"h.0.w": (16, 16)}, 2)
    run = trainer_run(tmp_path / "run", checkpoints, steps=[1, 2])
    out = tmp_path / "out"
    p, seen = _probe("run", str(run), "-o", str(out), "--quiet", "--html-points", "0")
    assert p.returncode == 0, p.stderr
    assert seen["started"] == {"kernels": True, "plotting": True}
    assert "matplotlib" in seen["modules"] and (out / "render.png").is_file()
    assert "open3d" not in seen["modules"] and seen["worker"]
