"""The corpus: every malformed or odd input the tests can make, through the real ``wdiff run`` command.

Bad input: exit code 2, exactly one line on stderr naming the file and the problem, no traceback, the
earlier results in OUT byte for byte as they were and nothing left beside them. Valid oddities: exit
code 0, warnings where something is left out, results equal to a numpy reference.

The command runs in this process through its own error boundary (``cli.main``) to keep the corpus
fast; ``test_cli.py`` and ``test_interrupt.py`` run it as a real process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from factories import MALFORMED, random_sequence, reference, save, trainer_run

from wdiff import api, cli
from wdiff.results import Results

SHAPES = {"layers.0.w": (4, 3), "layers.1.b": (3,)}
SHARD = "model-00001-of-00002.safetensors"


class _Exited(Exception):
    def __init__(self, code: object) -> None:
        self.code = code


def wdiff_run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``wdiff run ARGS`` through ``cli.main`` in this process: (exit code, stdout, stderr)."""

    def exit_now(code: object) -> None:
        raise _Exited(code)

    monkeypatch.setattr(cli, "_exit_now", exit_now)
    monkeypatch.setattr("sys.argv", ["wdiff", "run", *args])
    capsys.readouterr()
    try:
        cli.main()
        code: object = 0
    except (_Exited, SystemExit) as e:
        code = e.code
    captured = capsys.readouterr()
    return (0 if code is None else code), captured.out, captured.err  # type: ignore[return-value]


def tree_hash(path: Path) -> str:
    """Names, kinds and bytes of everything under ``path`` (or of the one file it is)."""
    digest = hashlib.sha256()
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode() + b"\0")
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def _good(tmp: Path, name: str = "good.safetensors", seed: int = 1) -> Path:
    return save(tmp / name, random_sequence(SHAPES, 1, seed=seed)[0])


def _hf(tmp: Path, count: int = 3, shards: int = 1) -> Path:
    return trainer_run(tmp / "run", random_sequence(SHAPES, count), steps=list(range(10, 10 * count + 1, 10)),
                       shards=shards)  # fmt: skip


def _malformed(case: str) -> Callable[[Path], tuple[list[Path], Path]]:
    def build(tmp: Path) -> tuple[list[Path], Path]:
        bad = tmp / "bad.safetensors"
        bad.write_bytes(MALFORMED[case])
        return [_good(tmp), bad], bad

    return build


def _index(
    edit: Callable[[Path, dict], dict | None], named: str = "model.safetensors.index.json"
) -> Callable[[Path], tuple[list[Path], Path]]:
    """An HF run, sharded, whose middle checkpoint's index is edited (an older one: an error);
    ``named``: the file the error line must name."""

    def build(tmp: Path) -> tuple[list[Path], Path]:
        run = _hf(tmp, shards=2)
        index = run / "checkpoint-20" / "model.safetensors.index.json"
        result = edit(index.parent, json.loads(index.read_text()))
        if result is not None:
            index.write_text(json.dumps(result))
        return [run], index.parent / named

    return build


def _index_not_json(tmp: Path) -> tuple[list[Path], Path]:
    run = _hf(tmp, shards=2)
    index = run / "checkpoint-20" / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"layers.0.w": "model-0')
    return [run], index


def _shard_to(target: str) -> Callable[[Path, dict], dict]:
    def edit(folder: Path, index: dict) -> dict:
        index["weight_map"] = {k: target for k in index["weight_map"]}
        return index

    return edit


def _missing_shard(folder: Path, index: dict) -> None:
    (folder / SHARD).unlink()


def _shard_symlink(target: str) -> Callable[[Path, dict], None]:
    def edit(folder: Path, index: dict) -> None:
        shard = folder / SHARD
        shard.unlink()
        shard.symlink_to(target)

    return edit


def _tensor_not_in_shard(folder: Path, index: dict) -> dict:
    index["weight_map"]["layers.9.extra"] = SHARD
    return index


def _no_weights(tmp: Path) -> tuple[list[Path], Path]:
    for name in ("a", "b"):
        (tmp / "runs" / name).mkdir(parents=True)
        (tmp / "runs" / name / "config.json").write_text("{}")
    return [tmp / "runs"], tmp / "runs"


def _empty_folder(tmp: Path) -> tuple[list[Path], Path]:
    (tmp / "empty").mkdir()
    return [tmp / "empty"], tmp / "empty"


def _one_checkpoint(tmp: Path) -> tuple[list[Path], Path]:
    run = _hf(tmp, count=1)
    return [run], run / "checkpoint-10"


def _pickle_named_safetensors(tmp: Path) -> tuple[list[Path], Path]:
    bad = tmp / "model.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\0" * 60)  # a pickle's protocol header
    return [_good(tmp), bad], bad


def _pickle_folder(tmp: Path) -> tuple[list[Path], Path]:
    good = tmp / "step-1"
    _good(good, "model.safetensors")
    (tmp / "step-2").mkdir()
    (tmp / "step-2" / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # a zip, no torch records
    return [good, tmp / "step-2"], tmp / "step-2" / "pytorch_model.bin"


def _symlink_loop(tmp: Path) -> tuple[list[Path], Path]:
    loop = tmp / "loop.safetensors"
    loop.symlink_to(tmp / "loop2.safetensors")
    (tmp / "loop2.safetensors").symlink_to(loop)
    return [_good(tmp), loop], loop


def _fifo(tmp: Path) -> tuple[list[Path], Path]:
    fifo = tmp / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    return [_good(tmp), fifo], fifo


def _unreadable(tmp: Path) -> tuple[list[Path], Path]:
    bad = _good(tmp, "locked.safetensors", seed=2)
    bad.chmod(0)
    return [_good(tmp), bad], bad


def _middle_without_trainer_state(tmp: Path) -> tuple[list[Path], Path]:
    run = _hf(tmp)
    (run / "checkpoint-20" / "trainer_state.json").unlink()
    return [run], run / "checkpoint-20"


def _middle_truncated(tmp: Path) -> tuple[list[Path], Path]:
    run = _hf(tmp)
    weights = run / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # an older checkpoint damaged after the fact
    return [run], weights


def _no_float_tensors(tmp: Path) -> tuple[list[Path], Path]:
    a = save(tmp / "a_1.safetensors", {"ids": np.arange(4)})
    b = save(tmp / "a_2.safetensors", {"ids": np.arange(4) + 1})
    return [a, b], a


def _nonexistent(tmp: Path) -> tuple[list[Path], Path]:
    return [_good(tmp), tmp / "nope.safetensors"], tmp / "nope.safetensors"


ERRORS: dict[str, tuple[Callable[[Path], tuple[list[Path], Path]], str]] = {
    **{f"safetensors: {case}": (_malformed(case), "") for case in MALFORMED},
    "index: not JSON": (_index_not_json, "shard index is not valid JSON"),
    "index: no weight_map": (_index(lambda folder, index: {"metadata": {}}), 'no "weight_map"'),
    "index: missing shard": (_index(_missing_shard), "does not exist"),
    "index: shard path leaves the folder": (_index(_shard_to("../../good.safetensors")), "leaves the"),
    "index: absolute shard path": (_index(_shard_to("/etc/passwd")), "leaves the checkpoint folder"),
    "index: shard symlinked outside": (_index(_shard_symlink("/etc/hostname")), "leaves the"),
    "index: shard is a symlink loop": (_index(_shard_symlink(SHARD)), "symlink loop"),
    "index: tensor not in its shard": (_index(_tensor_not_in_shard, SHARD), "is not in this shard"),
    "folder with no weights": (_no_weights, "no checkpoints found"),
    "empty folder": (_empty_folder, "no checkpoints found"),
    "one checkpoint": (_one_checkpoint, "found 1 checkpoint(s)"),
    "pickle named .safetensors": (_pickle_named_safetensors, "never unpickles"),
    "folder holding a zip that is not a torch file": (_pickle_folder, "not a torch.save file"),
    "symlink loop": (_symlink_loop, "symlink loop"),
    "named pipe": (_fifo, "not a regular file"),
    "unreadable file (chmod 000)": (_unreadable, "Permission denied"),
    "older checkpoint without trainer_state.json": (_middle_without_trainer_state, "no trainer_state.json"),
    "older checkpoint truncated": (_middle_truncated, "file is truncated"),
    "no float tensor in common": (_no_float_tensors, "no floating-point tensor"),
    "input does not exist": (_nonexistent, "no such file or folder"),
}


def _check_refused(monkeypatch, capsys, tmp: Path, out: Path, args: list[str], named: Path, needle: str):
    before = tree_hash(out)
    beside = sorted(p.name for p in tmp.iterdir())
    code, stdout, stderr = wdiff_run(monkeypatch, capsys, *args)
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"wdiff: error: {named}"), lines[0]
    assert needle in lines[0], lines[0]
    assert stdout == ""
    assert tree_hash(out) == before, "OUT changed"
    assert sorted(p.name for p in tmp.iterdir()) == beside, "something was left beside OUT"


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_refused_in_one_line_and_out_is_untouched(tmp_path, monkeypatch, capsys, earlier_results,
                                                              case):  # fmt: skip
    build, needle = ERRORS[case]
    if case.startswith("unreadable") and os.geteuid() == 0:
        pytest.skip("root reads chmod-000 files; the pipe and symlink cases cover unopenable files")
    inputs, named = build(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(earlier_results, out)
    args = [*map(str, inputs), "-o", str(out), "--no-render", "--max-points", "64"]
    _check_refused(monkeypatch, capsys, tmp_path, out, args, named, needle)


@pytest.mark.parametrize(
    "case", ["pickle named .safetensors", "safetensors: truncated", "index: shard path leaves the folder"]
)
def test_a_real_process_prints_exactly_one_line(tmp_path, earlier_results, case):
    """The same through ``python -m wdiff``: nothing else reaches stderr (no progress bar, no blank line)."""
    build, needle = ERRORS[case]
    inputs, named = build(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(earlier_results, out)
    before = tree_hash(out)
    p = subprocess.run(
        [sys.executable, "-m", "wdiff", "run", *map(str, inputs), "-o", str(out), "--no-render"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.endswith("\n") and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"wdiff: error: {named}") and needle in p.stderr
    assert tree_hash(out) == before


def test_out_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    run = _hf(tmp_path)
    out = tmp_path / "out"
    out.write_text("my notes")
    args = [str(run), "-o", str(out), "--no-render"]
    _check_refused(monkeypatch, capsys, tmp_path, out, args, out, "exists and is not a folder")


def test_out_being_written_by_another_wdiff_is_refused(tmp_path, monkeypatch, capsys, earlier_results):
    run = _hf(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(earlier_results, out)
    lock = tmp_path / ".out.wdiff-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running wdiff holds
    try:
        args = [str(run), "-o", str(out), "--no-render", "--max-points", "64"]
        _check_refused(monkeypatch, capsys, tmp_path, out, args, out, "another wdiff process is writing")
    finally:
        os.close(fd)


# --- valid oddities: accepted, with warnings where something is left out ---------------------------


def _accepted(monkeypatch, capsys, tmp: Path, inputs: list[Path]) -> tuple[Results, str]:
    out = tmp / "out"
    code, stdout, stderr = wdiff_run(
        monkeypatch, capsys, *map(str, inputs), "-o", str(out), "--no-render", "--max-points", "64"
    )
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 1 and "Traceback" not in stderr
    return Results.load(out), stderr


def _assert_matches(res: Results, seq: list[dict], name: str) -> None:
    ref = reference(seq, name)
    np.testing.assert_allclose(res.accumulated(name), ref["accumulated"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.summary["tensors"][name]["net_l2"], ref["net_l2"], rtol=1e-5)


def test_nan_and_inf_values_are_reported_not_fatal(tmp_path, monkeypatch, capsys):
    seq = random_sequence(SHAPES, 3)
    seq[2]["layers.0.w"][1, 1] = np.nan
    seq[2]["layers.0.w"][0, 2] = -np.inf
    res, _ = _accepted(monkeypatch, capsys, tmp_path, [trainer_run(tmp_path / "run", seq, [1, 2, 3])])
    assert res.summary["tensors"]["layers.0.w"]["nonfinite"] == [0, 0, 2]
    assert res.summary["tensors"]["layers.1.b"]["nonfinite"] == [0, 0, 0]
    acc = res.accumulated("layers.0.w")
    assert np.isnan(acc[1, 1]) and np.isinf(acc[0, 2])
    _assert_matches(res, seq, "layers.1.b")


def test_zero_size_and_scalar_tensors(tmp_path, monkeypatch, capsys):
    seq = random_sequence({"layers.0.w": (3, 2), "scale": (), "empty": (0, 3)}, 3)
    res, _ = _accepted(monkeypatch, capsys, tmp_path, [trainer_run(tmp_path / "run", seq, [1, 2, 3])])
    assert res.accumulated("empty").shape == (0, 3)
    assert res.summary["tensors"]["empty"]["numel"] == 0
    for name in ("scale", "layers.0.w"):
        _assert_matches(res, seq, name)


def test_dtype_changing_between_checkpoints(tmp_path, monkeypatch, capsys):
    seq = random_sequence(SHAPES, 3)
    kinds = [np.float32, ml_dtypes.bfloat16, np.float16]
    seq = [{k: v.astype(t) for k, v in c.items()} for c, t in zip(seq, kinds)]
    res, _ = _accepted(monkeypatch, capsys, tmp_path, [trainer_run(tmp_path / "run", seq, [1, 2, 3])])
    assert res.summary["tensors"]["layers.0.w"]["dtype"] == ["BF16", "F16", "F32"]
    _assert_matches(res, seq, "layers.0.w")


def test_tensors_appearing_or_changing_shape_are_left_out_with_a_warning(tmp_path, monkeypatch, capsys):
    seq = random_sequence({**SHAPES, "grows": (2,), "late": (3,)}, 3)
    seq[0].pop("late")
    seq[2]["grows"] = np.zeros(5, np.float32)
    res, stderr = _accepted(monkeypatch, capsys, tmp_path, [trainer_run(tmp_path / "run", seq, [1, 2, 3])])
    assert set(res.names) == set(SHAPES)
    assert "warning: late: missing from 1 checkpoint(s)" in stderr
    assert "warning: grows: changes shape across checkpoints: [2], [5]" in stderr
    _assert_matches(res, seq, "layers.0.w")


def test_bare_nan_and_infinity_in_trainer_state(tmp_path, monkeypatch, capsys):
    run = _hf(tmp_path)
    state = run / "checkpoint-30" / "trainer_state.json"
    state.write_text('{"global_step": 30, "log_history": [{"loss": NaN, "grad_norm": Infinity, "step": 30}]}')
    res, _ = _accepted(monkeypatch, capsys, tmp_path, [run])
    assert res.summary["trainer_state"]["log_history"] == [{"loss": None, "grad_norm": None, "step": 30}]


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("no trainer_state.json yet", "no trainer_state.json yet"),
        ("shard missing", "named in weight_map does not exist"),
        ("shard truncated", "file is truncated"),
        ("no index yet", "several weight files and no model.safetensors(.index.json)"),
        ("one shard so far", "shard 1 of 2 and no index yet: incomplete"),
    ],
)
def test_newest_checkpoint_still_being_written_is_left_out_with_a_warning(tmp_path, monkeypatch, capsys,
                                                                          damage, reason):  # fmt: skip
    seq = random_sequence(SHAPES, 4)
    run = trainer_run(tmp_path / "run", seq, [10, 20, 30, 40], shards=2)
    newest = run / "checkpoint-40"
    if damage == "no trainer_state.json yet":
        (newest / "trainer_state.json").unlink()
    elif damage == "shard missing":
        (newest / SHARD).unlink()
    elif damage in ("no index yet", "one shard so far"):  # the index is written after the shards
        (newest / "model.safetensors.index.json").unlink()
        if damage == "one shard so far":
            (newest / "model-00002-of-00002.safetensors").unlink()
    else:
        (newest / SHARD).write_bytes((newest / SHARD).read_bytes()[:-4])
    res, stderr = _accepted(monkeypatch, capsys, tmp_path, [run])
    assert [c["step"] for c in res.summary["checkpoints"]] == [10, 20, 30]
    assert f"warning: {newest}: newest checkpoint left out (still being written?)" in stderr
    (left_out,) = res.summary["left_out"]
    assert left_out["path"] == str(newest) and reason in left_out["reason"]
    _assert_matches(res, seq[:3], "layers.0.w")


def test_leftovers_of_killed_runs_are_cleaned_up_and_never_taken_for_results(tmp_path, monkeypatch, capsys,
                                                                             earlier_results):  # fmt: skip
    seq = random_sequence(SHAPES, 3)
    run = trainer_run(tmp_path / "run", seq, [1, 2, 3])
    out = tmp_path / "out"
    shutil.copytree(earlier_results, out)
    stale = tmp_path / ".out.wdiff-tmp-k1ll3d"
    shutil.copytree(earlier_results, stale)  # looks complete, is not the results
    (stale / "accumulated.safetensors").write_bytes(b"half")
    (tmp_path / ".out.wdiff-lock").write_text("")  # the lock file of a SIGKILLed run, nobody holds it
    res, _ = _accepted(monkeypatch, capsys, tmp_path, [run])
    _assert_matches(res, seq, "layers.0.w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_results_put_aside_by_a_killed_two_rename_swap_are_restored(tmp_path, earlier_results):
    """Where the filesystem cannot swap folders atomically, a run killed between its two renames
    leaves the previous results under the -old- name; the next writer puts them back first."""
    from wdiff.outdir import Staging

    shutil.copytree(earlier_results, tmp_path / ".out.wdiff-old-4242")
    before = tree_hash(tmp_path / ".out.wdiff-old-4242")
    with Staging(tmp_path / "out") as staging:
        assert staging.folder is not None and staging.folder.name.startswith(".out.wdiff-tmp-")
    assert tree_hash(tmp_path / "out") == before == tree_hash(earlier_results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_filesystems_without_atomic_exchange_swap_in_two_renames(tmp_path, monkeypatch, earlier_results):
    from wdiff import outdir

    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    shutil.copytree(earlier_results, out)
    seq = random_sequence(SHAPES, 3)
    res = api.run(trainer_run(tmp_path / "run", seq, [1, 2, 3]), out, render=False, max_points=64)
    _assert_matches(res, seq, "layers.0.w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_a_checkpoint_deleted_after_the_scan_is_a_clean_error(tmp_path, earlier_results):
    """save_total_limit may delete a checkpoint between the scan and the compute."""
    from wdiff.checkpoints import scan
    from wdiff.errors import WdiffError

    run = _hf(tmp_path)
    scanned = scan(run)
    out = tmp_path / "out"
    shutil.copytree(earlier_results, out)
    before = tree_hash(out)
    shutil.rmtree(run / "checkpoint-10")
    with pytest.raises(WdiffError, match="checkpoint-10/model.safetensors: cannot read: No such file"):
        api.run(scanned, out, render=False, max_points=64)
    assert tree_hash(out) == before
