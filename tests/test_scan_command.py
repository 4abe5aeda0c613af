"""``wdiff scan``: what a run would read, listed without computing, against the files on disk (read
with the safetensors library) and against ``wdiff.scan``, the API it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, save, trainer_run
from safetensors import safe_open

import wdiff
from wdiff.select import Selection, scan_document

REPO = Path(__file__).resolve().parent.parent
SHAPES: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (30, 8)}
for _i in range(2):
    for _p in ("q", "k", "v"):
        SHAPES[f"model.layers.{_i}.self_attn.{_p}_proj.weight"] = (8, 8)
    SHAPES[f"model.layers.{_i}.mlp.up_proj.weight"] = (16, 8)
SHAPES["model.norm.weight"] = (8,)
STEPS = [100, 200, 300, 400, 500]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An HF Trainer run of five checkpoints (fp16, tied embeddings, an int64 buffer) and a sixth
    still being written (no trainer_state.json yet)."""
    root = tmp_path_factory.mktemp("scan") / "run"
    seq = random_sequence(SHAPES, len(STEPS) + 1, "F16", seed=2)
    for tensors in seq:
        tensors["model.position_ids"] = np.arange(8, dtype=np.int64)
    trainer_run(root, seq[:-1], STEPS)
    for step in STEPS:
        (root / f"checkpoint-{step}" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    save(root / "checkpoint-600" / "model.safetensors", seq[-1])
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "wdiff", "scan", *args], capture_output=True, text=True, timeout=120, env=env
    )


def _on_disk(folder: Path) -> dict[str, tuple[list[int], str, int]]:
    """name -> (shape, dtype, bytes) of every tensor of a checkpoint, as safetensors reads it."""
    found = {}
    with safe_open(folder / "model.safetensors", "np") as st:
        for name in st.keys():
            a = st.get_tensor(name)
            found[name] = (list(a.shape), {"float16": "F16", "int64": "I64"}[str(a.dtype)], a.nbytes)
    return found


def test_json_lists_what_is_on_disk(run_dir):
    p = _cli(str(run_dir), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema"] == 1 and doc["source"] == str(run_dir)
    assert [(c["step"], c["path"]) for c in doc["checkpoints"]] == [
        (s, str(run_dir / f"checkpoint-{s}")) for s in STEPS
    ]  # checkpoint-600 is incomplete: left out, with the reason
    ((left,),) = [[e for e in doc["left_out"] if e["path"].endswith("checkpoint-600")]]
    assert "trainer_state.json" in left["reason"]
    disk = _on_disk(run_dir / "checkpoint-100")
    floats = {n: v for n, v in disk.items() if v[1] == "F16"}
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(SHAPES)
    assert [t["name"] for t in doc["tensors"]] == [t.name for t in wdiff.scan(run_dir).tensors]
    for t in doc["tensors"]:
        shape, dtype, nbytes = floats[t["name"]]
        assert (t["shape"], t["dtype"], t["source"]) == (shape, [dtype], "bytes")
        assert t["bytes"] == nbytes * len(STEPS)
    assert doc["tensors"][0]["aliases"] == ["lm_head.weight"]
    for c in doc["checkpoints"]:
        assert c["bytes"] == sum(v[2] for v in _on_disk(Path(c["path"])).values() if v[1] == "F16")
    assert doc["bytes_per_pass"] == sum(c["bytes"] for c in doc["checkpoints"])
    assert doc["skipped"] == [
        {"name": "model.position_ids", "reason": "dtype I64 is not a float: not computed"}
    ]
    assert doc["selection"] == {
        "include": [], "exclude": [], "steps": None, "every": 1,
        "of": {"checkpoints": len(STEPS) + 1, "tensors": len(SHAPES)},
    }  # fmt: skip
    assert doc["warnings"] == [] and doc["matching"] is None
    assert doc == scan_document(wdiff.scan(run_dir))  # the API prints the same


def test_json_with_a_selection(run_dir):
    args = ["--include", "*.self_attn.*", "--include", "lm_head.*", "--exclude", "*.v_proj.*"]
    p = _cli(str(run_dir), *args, "--steps", "200:", "--every", "2", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    # 200, 400, 600 on the stride; 600 is still being written: left out, with the reason
    assert [c["step"] for c in doc["checkpoints"]] == [200, 400]
    assert [e["path"] for e in doc["left_out"]] == [str(run_dir / "checkpoint-600")]
    want = ["model.embed_tokens.weight"] + [
        n for n in SHAPES if ".self_attn." in n and ".v_proj." not in n
    ]  # the tied embedding by its other name
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(want)
    disk = _on_disk(run_dir / "checkpoint-200")
    assert doc["bytes_per_pass"] == 2 * sum(disk[n][2] for n in want)
    assert doc["skipped"] == []  # position_ids is not selected: not reported either
    assert doc["selection"] == {
        "include": ["*.self_attn.*", "lm_head.*"], "exclude": ["*.v_proj.*"],
        "steps": [200, None], "every": 2,
        "of": {"checkpoints": len(STEPS) + 1, "tensors": len(SHAPES)},
    }  # fmt: skip
    selection = Selection(("*.self_attn.*", "lm_head.*"), ("*.v_proj.*",), "200:", 2)
    assert doc == scan_document(wdiff.scan(run_dir, select=selection))


def test_text_groups_by_layer_and_lists_each_with_tensors(run_dir):
    p = _cli(str(run_dir), "--steps", ":300")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"{run_dir}: 3 checkpoints, {len(SHAPES)} tensors, 5.3 KB per pass"  # 1,776 B each
    assert lines[1] == "selection: steps :300 (kept 3 of 6 checkpoints, 10 of 10 tensors)"
    for step in (100, 200, 300):
        assert any(
            line.split() == [str(step), "1.8", "KB", str(run_dir / f"checkpoint-{step}")] for line in lines
        )
    grouped = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.startswith("  model.") and not line.endswith("(tied)")
    }
    assert grouped["model.layers.*.self_attn.q_proj.weight"][:3] == ["x2", "[8,", "8]"]
    assert grouped["model.embed_tokens.weight"][:4] == ["x1", "[30,", "8]", "F16"]
    assert "model.layers.0.self_attn.q_proj.weight" not in grouped
    assert "  model.embed_tokens.weight is also named lm_head.weight (tied)" in lines
    assert "skipped tensors (1):" in lines
    assert "  model.position_ids: dtype I64 is not a float: not computed" in lines
    full = _cli(str(run_dir), "--tensors").stdout.splitlines()
    start = full.index("tensors (name, shape, dtype, bytes per pass):") + 1
    listed = [
        line.split()[0] for line in full[start:] if line.startswith("  model.") and "(tied)" not in line
    ]
    listed = listed[: len(SHAPES)]  # then the skipped ones, under their own heading
    assert full[start + len(SHAPES) + 1] == "skipped tensors (1):"
    assert listed == [t.name for t in wdiff.scan(run_dir).tensors]
    # the grouped pattern is a glob --include takes: it selects that group
    p = _cli(str(run_dir), "--include", "model.layers.*.self_attn.q_proj.weight", "--json")
    assert [t["name"] for t in json.loads(p.stdout)["tensors"]] == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)
    ]


def test_errors_are_one_line_and_nothing_is_written(run_dir, tmp_path):
    for args, says in (
        (["--steps", "x"], "wdiff: error: --steps must look like A:B"),
        (["--every", "6"], "wdiff: error: --every 6 keeps 1 of 6 checkpoints (step 100)"),
        (["--include", "nothing"], "wdiff: error: --include 'nothing' matches none of the 10 tensors"),
    ):
        p = _cli(str(run_dir), *args)
        assert p.returncode == 2 and p.stderr.startswith(says) and p.stderr.count("\n") == 1, p.stderr
        assert p.stdout == ""
    p = _cli(str(tmp_path / "missing"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    p = _cli(str(run_dir / "checkpoint-100"), str(run_dir / "checkpoint-300"), "--json")
    assert p.returncode == 0 and [c["step"] for c in json.loads(p.stdout)["checkpoints"]] == [100, 300]
