"""``benchmarks/measure.py``: the benchmarks' launcher sees the memory of the command's whole process
tree, the children it leaves running (as wdiff leaves its picture worker) included.

A real command: a parent that starts a child, waits until the child has written 200 MiB, writes
100 MiB itself, holds both for a while and ends with ``os._exit`` while the child still runs (it
exits when its stdin closes, as the picture worker does). The memory each touched is the reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MEASURE = Path(__file__).resolve().parent.parent / "benchmarks" / "measure.py"
MIB = 1024  # KiB

PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = bytearray(200 << 20); b[::4096] = b'x' * (200 << 8);"
         "print('ready', flush=True); sys.stdin.read(); time.sleep(0.3)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    child.stdout.readline()
    a = bytearray(100 << 20)
    a[::4096] = b"y" * (len(a) // 4096)
    time.sleep(0.5)  # both hold their memory: many samples see the sum
    os._exit(0)  # the child is not waited for: it ends when its stdin closes
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_CHILD_SUBREAPER")
def test_the_peak_of_the_tree_counts_the_child_the_command_left_running(tmp_path):
    result = tmp_path / "measure.json"
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(MEASURE), str(result), "--", sys.executable, "-c", PARENT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(result.read_text())
    assert r["returncode"] == 0 and r["lingered"] == []
    parent, child = r["processes"]  # in the order first seen
    assert child["ppid"] == parent["pid"]
    # each process's own peak: what it touched, plus an interpreter (under 40 MiB)
    assert 100 * MIB < parent["maxrss_kib"] < 140 * MIB
    assert r["maxrss_kib"] == parent["maxrss_kib"]  # what measure.py reported before: the command only
    assert child["maxrss_kib"] is not None  # the orphan was reaped by measure.py
    assert 200 * MIB < child["maxrss_kib"] < 240 * MIB
    assert r["tree_maxrss_kib"] == child["maxrss_kib"]  # the largest one process
    for p in (parent, child):
        assert p["peak_rss_kib"] >= p["peak_pss_kib"] > p["maxrss_kib"] - 40 * MIB
    # the tree: both at once
    assert 300 * MIB < r["tree_peak_pss_kib"] <= r["tree_peak_rss_kib"] < 380 * MIB
    assert r["samples"] > 10 and r["pss_reads"] > 0


def test_a_command_that_fails_reports_its_exit_code(tmp_path):
    result = tmp_path / "measure.json"
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(MEASURE),
            str(result),
            "--",
            sys.executable,
            "-c",
            "raise SystemExit(3)",
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert json.loads(result.read_text())["returncode"] == 3
