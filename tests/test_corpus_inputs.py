"""The corpus, continued: inputs that change or misbehave while wdiff reads them (issue 17).

- A checkpoint replaced or rewritten between the scan and the read: refused in one line naming the
  file, OUT untouched. Caught before compute (``scan.recheck``: identity and safetensors header) and
  inside every chunk task (identity on the very descriptor it reads from), for each source kind.
- A pipe wherever a file should be (checkpoints, shards, indexes, side files, ONNX external data, a
  checkpoint swapped for a pipe after the scan): refused without blocking. These and the catastrophic
  ``rank_pattern`` run as real ``python -m wdiff`` processes under a timeout, so a regression fails
  instead of hanging the suite.
- Side files over their size limits, odd but parseable values (``-0``, lone surrogates, a training
  log of the wrong types): refused like the reference reader refuses them, or read without a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, reference, safetensors_bytes, save, trainer_run
from kinds import adapter_checkpoint, onnx_model
from test_corpus import tree_hash, wdiff_run

from wdiff import api
from wdiff.checkpoints import fingerprint, recheck, scan
from wdiff.errors import WdiffError
from wdiff.readers.base import CONFIG_LIMIT, STATE_LIMIT, InputFiles, PiecesRef, identity_of
from wdiff.results import Results

SHAPES = {"layers.0.w": (4, 3), "layers.1.b": (3,)}
PREFIX = "base_model.model."
ROOT = Path(__file__).parent.parent
PROCESS_SECONDS = 60  # a real process that has not answered by then is hanging


def _hf(tmp: Path, count: int = 3, shards: int = 1, seed: int = 0) -> Path:
    steps = list(range(10, 10 * count + 1, 10))
    return trainer_run(tmp / "run", random_sequence(SHAPES, count, seed=seed), steps=steps, shards=shards)


def _out(tmp: Path, earlier: Path) -> Path:
    out = tmp / "out"
    shutil.copytree(earlier, out)
    return out


# --- a checkpoint replaced between the scan and the read -----------------------------------------


def _other_layout(path: Path) -> bytes:
    """A file of the same size as the safetensors file at ``path`` whose tensors lie elsewhere: the
    bias first, then the weight (the writer puts the weight first), the header padded to the same
    length. Read at the old offsets it would mix the bias into the weight."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    header = {
        "layers.1.b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "layers.0.w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [12, 60]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    data = safetensors_bytes(raw, b.tobytes() + w.tobytes())
    assert len(data) == path.stat().st_size
    return data


def _replace(path: Path, data: bytes) -> None:
    """What a writer that renames a temporary file into place does (safetensors >= 0.8)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """An older writer truncating and rewriting the same inode, its mtime put back (``cp -p``,
    ``rsync -t``): device, inode, size and mtime all as scanned; only the status-change time (which
    no one can set back) and the header tell."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = identity_of(path)
    assert (now.device, now.inode, now.size, now.mtime_ns) == (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # fmt: skip


@pytest.mark.parametrize(
    "how, needle",
    [
        ("replaced", "changed since it was scanned (replaced by another file)"),
        ("rewritten in place, mtime put back", "changed since it was scanned (modified in place, or its"),
        ("grew", "changed since it was scanned (size"),
        ("deleted", "cannot read: No such file"),
        ("a pipe", "not a regular file"),
    ],
)
def test_a_checkpoint_changed_after_the_scan_is_refused_before_anything_is_written(
    tmp_path, earlier_results, how, needle
):
    run = _hf(tmp_path)
    scanned = scan(run)
    weights = run / "checkpoint-20" / "model.safetensors"
    if how == "replaced":
        _replace(weights, _other_layout(weights))
    elif how.startswith("rewritten"):
        _rewrite_in_place(weights, _other_layout(weights))
    elif how == "grew":
        with open(weights, "ab") as f:
            f.write(b"\0" * 8)
    elif how == "deleted":
        weights.unlink()
    else:
        weights.unlink()
        os.mkfifo(weights)
    out = _out(tmp_path, earlier_results)
    before = tree_hash(out)
    with pytest.raises(WdiffError) as e:
        api.run(scanned, out, render=False, max_points=64)
    assert str(e.value).startswith(f"{weights}: ") and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def _lora_run(tmp: Path, count: int = 3, config: dict | None = None) -> Path:
    rng = np.random.default_rng(3)
    for t in range(count):
        tensors = {
            f"{PREFIX}model.layers.0.q_proj.lora_A.weight": rng.standard_normal((2, 5)).astype(np.float32),
            f"{PREFIX}model.layers.0.q_proj.lora_B.weight": rng.standard_normal((6, 2)).astype(np.float32),
        }
        config = config or {"r": 2, "lora_alpha": 4}
        adapter_checkpoint(tmp / "lora" / f"checkpoint-{t + 1}", tensors, config, t + 1)
    return tmp / "lora"


def _pieces_run(tmp: Path):
    """A run whose one tensor is read in two pieces per checkpoint (as DCP shards are)."""
    from wdiff.readers.base import Piece
    from wdiff.readers.safetensors import read_header
    from wdiff.sequence import AlignedTensor, Checkpoint, Run, scanned_files

    checkpoints = []
    for t, tensors in enumerate(random_sequence({"w": (4, 4)}, 3, seed=4)):
        path = save(tmp / f"p{t}.safetensors", tensors)
        one = read_header(path)[0]["w"]
        pieces = (Piece(0, 8, one.path, one.offset), Piece(8, 8, one.path, one.offset + one.nbytes // 2))
        ref = PiecesRef("w", one.dtype, one.shape, one.path, one.offset, one.nbytes, pieces)
        checkpoints.append(Checkpoint(str(path), t, {"w": ref}, files={one.path: identity_of(one.path)}))
    refs = [c.tensors["w"] for c in checkpoints]
    tensor = AlignedTensor("w", (4, 4), tuple(refs), scanned_files(refs, checkpoints))
    return Run(str(tmp), tuple(checkpoints), (tensor,), ())


@pytest.mark.parametrize("kind", ["bytes", "pieces", "product"])
def test_a_file_replaced_while_compute_runs_is_refused_by_the_chunk_task(tmp_path, earlier_results, kind):
    """The swap lands after ``recheck`` (in ``on_scan``, just before the chunk tasks start): the chunk
    task of every source kind checks the descriptor it reads from against the scanned identity."""
    if kind == "bytes":
        scanned = scan(_hf(tmp_path))
    elif kind == "pieces":
        scanned = _pieces_run(tmp_path)
    else:
        scanned = scan(_lora_run(tmp_path))
    tensor = next(t for t in scanned.tensors if t.source == kind)
    victim = Path(tensor.refs[1].files()[0])
    data = victim.read_bytes()

    def swap(_run) -> None:
        _replace(victim, data[:-4] + bytes(4 * [0x40]))  # same size, other values: only identity tells

    out = _out(tmp_path, earlier_results)
    before = tree_hash(out)
    with pytest.raises(WdiffError) as e:
        api.run(scanned, out, render=False, max_points=64, on_scan=swap)
    assert str(e.value).startswith(f"{victim}: changed since it was scanned (replaced by another file)")
    assert tree_hash(out) == before


def test_the_header_is_checked_again_where_identities_cannot_tell(tmp_path):
    """A file system that updates neither mtime nor ctime (some network and FUSE mounts): the identity
    matches, the safetensors header re-read before compute does not."""
    from dataclasses import replace

    run = _hf(tmp_path)
    scanned = scan(run)
    weights = run / "checkpoint-20" / "model.safetensors"
    _rewrite_in_place(weights, _other_layout(weights))
    blind = replace(scanned.checkpoints[1], files={str(weights): identity_of(weights)})
    scanned = replace(scanned, checkpoints=(scanned.checkpoints[0], blind, scanned.checkpoints[2]))
    with pytest.raises(WdiffError) as e:
        recheck(scanned)
    assert str(e.value) == f"{weights}: changed since it was scanned (its header describes other tensors)"


def test_a_file_rewritten_in_place_during_a_read_is_caught_after_it(tmp_path):
    path = save(tmp_path / "a.safetensors", {"w": np.zeros(8, np.float32)})
    with InputFiles({str(path): identity_of(path)}) as files:
        files.fd(str(path))
        with open(path, "r+b") as f:  # the writer's truncate-and-write, while the task reads
            f.truncate(0)
            f.write(b"\0" * 100)
        with pytest.raises(WdiffError, match=r"changed since it was scanned \(size 96 -> 100 bytes\)"):
            files.verify()


def test_an_unchanged_run_computes_and_fingerprint_is_the_scanned_identity(tmp_path):
    seq = random_sequence(SHAPES, 3)
    scanned = scan(trainer_run(tmp_path / "run", seq, [1, 2, 3]))
    c = scanned.checkpoints[0]
    ((path, identity),) = c.files.items()
    st = os.stat(path)
    assert (identity.device, identity.inode, identity.size, identity.mtime_ns) == (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # fmt: skip
    first = fingerprint(c)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched after the scan
    assert fingerprint(c) == first  # the identity of what was scanned, which compute checks
    with pytest.raises(WdiffError, match="changed since it was scanned \\(modified in place\\)"):
        recheck(scanned)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: its ctime still tells
    with pytest.raises(WdiffError, match="changed since it was scanned \\(modified in place, or its"):
        recheck(scanned)
    scanned = scan(tmp_path / "run")
    res = api.run(scanned, tmp_path / "out", render=False, max_points=64)
    ref = reference(seq, "layers.0.w")
    np.testing.assert_allclose(res.accumulated("layers.0.w"), ref["accumulated"], rtol=1e-5, atol=1e-6)
    assert [c["fingerprint"] for c in res.summary["checkpoints"]][0] == first


def test_watch_refuses_to_keep_a_checkpoint_replaced_after_it_was_read(tmp_path):
    from wdiff.checkpoints import read_one
    from wdiff.kept import keep

    run = _hf(tmp_path)
    live = read_one(10, run / "checkpoint-10")
    weights = run / "checkpoint-10" / "model.safetensors"
    _replace(weights, _other_layout(weights))
    with pytest.raises(WdiffError, match="changed since it was scanned"):
        keep(live, tmp_path / "kept.safetensors")


# --- pipes and hangs: real processes under a timeout ---------------------------------------------


def _process(*args: str, timeout: float = PROCESS_SECONDS) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"wdiff did not answer within {timeout} s: it hangs")


def _onnx_pair(tmp: Path) -> tuple[list[Path], Path]:
    rng = np.random.default_rng(0)
    models = []
    for name in ("a", "b"):
        weights = {"w": (rng.standard_normal((3, 4)).astype(np.float32), "F32")}
        models.append(onnx_model(tmp / name / "model.onnx", weights, external="w.bin"))
    data = tmp / "b" / "w.bin"
    data.unlink()
    os.mkfifo(data)  # onnx external data: opening it for reading would block forever
    return models, models[1]


def _pipe_at(relative: str, shards: int = 1) -> callable:
    def build(tmp: Path) -> tuple[list[Path], Path]:
        run = _hf(tmp, shards=shards)
        target = run / "checkpoint-20" / relative
        target.unlink(missing_ok=True)
        os.mkfifo(target)
        return [run], target

    return build


def _adapter_config_pipe(tmp: Path) -> tuple[list[Path], Path]:
    run = _lora_run(tmp)
    target = run / "checkpoint-2" / "adapter_config.json"
    target.unlink()
    os.mkfifo(target)
    return [run], target


def _torch_pipe(tmp: Path) -> tuple[list[Path], Path]:
    (tmp / "s1").mkdir()
    save(tmp / "s1" / "model.safetensors", random_sequence(SHAPES, 1)[0])
    (tmp / "s2").mkdir()
    os.mkfifo(tmp / "s2" / "pytorch_model.bin")
    return [tmp / "s1", tmp / "s2"], tmp / "s2" / "pytorch_model.bin"


def _catastrophic_rank_pattern(tmp: Path) -> tuple[list[Path], Path]:
    """peft matches ``re.match(rf"(.*\\.)?({key})$", module)``: ``(a+)+b`` against a module named
    ``aaa...a`` backtracks for ever in Python's re."""
    module = "a" * 40
    rng = np.random.default_rng(1)
    config = {"r": 2, "lora_alpha": 4, "rank_pattern": {"(a+)+b": 2}}
    for t in range(2):
        tensors = {
            f"{PREFIX}{module}.lora_A.weight": rng.standard_normal((2, 3)).astype(np.float32),
            f"{PREFIX}{module}.lora_B.weight": rng.standard_normal((3, 2)).astype(np.float32),
        }
        adapter_checkpoint(tmp / "lora" / f"checkpoint-{t + 1}", tensors, config, t + 1)
    return [tmp / "lora"], tmp / "lora" / "checkpoint-1" / "adapter_config.json"


HANGS = {
    "onnx external data is a pipe": (_onnx_pair, "external data location 'w.bin': cannot open: a pipe"),
    "shard is a pipe": (_pipe_at("model-00001-of-00002.safetensors", shards=2), "not a regular file"),
    "shard index is a pipe": (_pipe_at("model.safetensors.index.json", shards=2), "not a regular file"),
    "model.safetensors is a pipe": (_pipe_at("model.safetensors"), "not a regular file"),
    "trainer_state.json is a pipe": (_pipe_at("trainer_state.json"), "not a regular file"),
    "adapter_config.json is a pipe": (_adapter_config_pipe, "not a regular file"),
    "pytorch_model.bin is a pipe": (_torch_pipe, "not a regular file"),
    "rank_pattern (a+)+b": (_catastrophic_rank_pattern, "rank_pattern key '(a+)+b' did not finish matching"),
}


@pytest.mark.parametrize("case", sorted(HANGS))
def test_inputs_that_would_block_are_refused_by_a_real_process(tmp_path, earlier_results, case):
    build, needle = HANGS[case]
    inputs, named = build(tmp_path)
    out = _out(tmp_path, earlier_results)
    before = tree_hash(out)
    p = _process("-m", "wdiff", "run", *map(str, inputs), "-o", str(out), "--no-render", "--max-points", "64")
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"wdiff: error: {named}: "), p.stderr
    assert needle in p.stderr, p.stderr
    assert tree_hash(out) == before


def test_a_config_json_that_is_a_pipe_is_passed_over_without_blocking(tmp_path):
    """config.json only says whether lm_head.weight is tied: a pipe (or an oversized or broken file)
    there is not opened for reading and says nothing."""
    run = _hf(tmp_path)
    os.mkfifo(run / "checkpoint-20" / "config.json")
    os.mkfifo(run / "checkpoint-30" / "config.json")
    p = _process("-m", "wdiff", "run", str(run), "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("when", ["before the run", "after the recheck"])
def test_a_checkpoint_swapped_for_a_pipe_after_the_scan_is_refused_by_a_real_process(tmp_path, when):
    run = _hf(tmp_path)
    weights = run / "checkpoint-20" / "model.safetensors"
    script = textwrap.dedent(f"""
        import os, sys
        from wdiff import api
        from wdiff.errors import WdiffError
        from wdiff.checkpoints import scan

        scanned = scan({str(run)!r})
        def swap(_run=None):
            os.unlink({str(weights)!r})
            os.mkfifo({str(weights)!r})
        if {when == "before the run"!r}:
            swap()
        try:
            api.run(scanned, {str(tmp_path / "out")!r}, render=False, max_points=64, on_scan=swap
                    if {when != "before the run"!r} else None)
        except WdiffError as e:
            print(e)
            sys.exit(2)
    """)
    p = _process("-c", script)
    assert p.returncode == 2, p.stderr
    assert p.stdout == f"{weights}: cannot read: a pipe, socket or device, not a regular file\n"
    assert not (tmp_path / "out").exists()


# --- side files: size limits ---------------------------------------------------------------------


def _sparse(path: Path, size: int, start: bytes = b"{") -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(start)
        f.truncate(size)  # no disk blocks behind it


def _peak(fn):
    tracemalloc.start()
    try:
        try:
            outcome = fn()
        except WdiffError as e:
            outcome = e
        return tracemalloc.get_traced_memory()[1], outcome
    finally:
        tracemalloc.stop()


def test_a_huge_config_json_is_not_read(tmp_path, monkeypatch, capsys):
    run = _hf(tmp_path)
    _sparse(run / "checkpoint-30" / "config.json", 1_500_000_000)
    peak, found = _peak(lambda: scan(run))
    assert not isinstance(found, WdiffError), found
    assert peak < 16 << 20


SIDE_LIMITS = [
    ("adapter_config.json", CONFIG_LIMIT, "adapter config"),
    ("trainer_state.json", STATE_LIMIT, "trainer state"),
]


@pytest.mark.parametrize("name, limit, what", SIDE_LIMITS)
def test_side_files_over_their_limit_are_refused_unread(tmp_path, monkeypatch, capsys, earlier_results, name,
                                                        limit, what):  # fmt: skip
    run = _lora_run(tmp_path)
    inputs = sorted(run.iterdir())  # named one by one: every trainer_state.json gives a step
    target = inputs[1] / name
    _sparse(target, limit + 1)
    peak, found = _peak(lambda: scan(inputs))
    assert isinstance(found, WdiffError), found
    assert str(found) == f"{target}: {what} of {limit + 1} bytes is over the {limit >> 20} MiB limit"
    assert peak < 1 << 20
    out = _out(tmp_path, earlier_results)
    before = tree_hash(out)
    code, stdout, stderr = wdiff_run(monkeypatch, capsys, *map(str, inputs), "-o", str(out), "--no-render")
    assert code == 2 and stderr == f"wdiff: error: {found}\n" and tree_hash(out) == before


# --- odd values --------------------------------------------------------------------------------------


def _library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - the library's error types vary
        return False


ODD_HEADERS = {
    "-0 data offset": (b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', "data_offsets [-0.0, 8]"),
    "-0 in a shape": (b'{"x":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', "shape [-0.0]"),
    "lone surrogate in a name": (
        b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        "is not valid JSON: lone surrogate '\\ud800'",
    ),
    "lone low surrogate in metadata": (
        b'{"__metadata__":{"a":"x\\udc00"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        "lone surrogate '\\udc00'",
    ),
}


@pytest.mark.parametrize("case", sorted(ODD_HEADERS))
def test_odd_headers_are_refused_like_the_reference_reader(tmp_path, monkeypatch, capsys, earlier_results,
                                                           case):  # fmt: skip
    header, needle = ODD_HEADERS[case]
    data = np.ones(2, np.float32).tobytes() if b"[0,8]" in header else b""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(safetensors_bytes(header, data))
    assert not _library_accepts(bad)
    good = save(tmp_path / "good.safetensors", {"x": np.zeros(2, np.float32)})
    out = _out(tmp_path, earlier_results)
    before = tree_hash(out)
    code, stdout, stderr = wdiff_run(monkeypatch, capsys, str(good), str(bad), "-o", str(out), "--no-render")
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"wdiff: error: {bad}: ") and needle in stderr, stderr
    assert tree_hash(out) == before


def test_surrogate_pairs_and_a_plus_zero_are_accepted_like_the_reference_reader(tmp_path):
    header = b'{"\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"extra":-0}'
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes(header.replace(b',"extra":-0', b""), np.ones(2, np.float32).tobytes()))
    assert _library_accepts(path)
    from wdiff.readers.safetensors import read_header

    assert list(read_header(path)[0]) == ["\U0001f600"]


def test_a_pickled_name_with_a_lone_surrogate_is_left_out_with_a_warning(tmp_path, monkeypatch, capsys):
    """torch.load accepts such a key (pickle decodes with surrogatepass); no UTF-8 file can hold it."""
    torch = pytest.importorskip("torch")
    for t in range(2):
        torch.save({"w\ud800": torch.ones(3) * t, "ok": torch.arange(4.0) * t}, tmp_path / f"step_{t + 1}.pt")
    code, stdout, stderr = wdiff_run(
        monkeypatch, capsys, str(tmp_path / "step_1.pt"), str(tmp_path / "step_2.pt"),
        "-o", str(tmp_path / "out"), "--no-render", "--max-points", "64",
    )  # fmt: skip
    assert code == 0, stderr
    assert "w\\ud800: its name holds a lone UTF-16 surrogate" in stderr
    res = Results.load(tmp_path / "out")
    assert res.names == ["ok"]
    assert any(s["name"] == "w\\ud800" for s in res.summary["skipped"])


def test_a_training_log_of_the_wrong_types_is_ignored_not_fatal(tmp_path, monkeypatch, capsys):
    run = _hf(tmp_path)
    history = [
        "loss went down", 5, None, [1, 2], {"step": "20"}, {"step": 20, "loss": "low"},
        {"step": 20, "loss": 10**400}, {"step": True, "loss": 1.0},
        {"step": 30, "loss": 0.5, "grad_norm": []},
        {"step": float("nan"), "loss": 9.0},
    ]  # fmt: skip
    state = {"global_step": 30, "log_history": history}
    (run / "checkpoint-30" / "trainer_state.json").write_text(json.dumps(state))
    code, stdout, stderr = wdiff_run(
        monkeypatch, capsys, str(run), "-o", str(tmp_path / "out"), "--no-render", "--max-points", "64"
    )
    assert code == 0, stderr
    from wdiff import metrics

    res = Results.load(tmp_path / "out")
    log = metrics.analyse(res).log
    assert log[1]["loss"] == 0.5 and log[1]["grad_norm"] is None  # interval (20, 30]
    assert all(isinstance(e, dict) for e in res.summary["trainer_state"]["log_history"])
    assert metrics.log_series({"log_history": history}, "loss") == ([30.0], [0.5])
    assert metrics.log_series({"log_history": "not a list"}, "loss") == ([], [])


def test_a_log_history_that_is_not_a_list_is_dropped(tmp_path):
    run = _hf(tmp_path)
    (run / "checkpoint-30" / "trainer_state.json").write_text('{"global_step": 30, "log_history": "x"}')
    assert scan(run).trainer_state["log_history"] == []


# --- LoRA patterns: peft's semantics, bounded --------------------------------------------------------


def test_rank_and_alpha_patterns_keep_peft_semantics(tmp_path):
    """Literal keys are matched here, the others in the bounded child: both as peft matches them
    (the first key in file order for which re.match(rf"(.*\\.)?({key})$", module) matches)."""
    import re

    modules = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.10.v_proj", "lm_head"]
    rank_pattern = {"layers\\.1\\d*\\..*": 4, "q_proj": 8, "(": 3}  # "(" is no regex: a literal suffix
    alpha_pattern = {"layers.0.q_proj": 16, ".*v_proj": 32, "lm_(?!x)head": 64}
    rng = np.random.default_rng(2)
    for t in range(2):
        tensors = {}
        for m in modules:
            keys = list(rank_pattern.items())[:2]
            expected_r = next((v for k, v in keys if re.match(rf"(.*\.)?({k})$", m)), 2)
            tensors[f"{PREFIX}{m}.lora_A.weight"] = rng.standard_normal((expected_r, 3)).astype(np.float32)
            tensors[f"{PREFIX}{m}.lora_B.weight"] = rng.standard_normal((5, expected_r)).astype(np.float32)
        config = {"r": 2, "lora_alpha": 2, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
        adapter_checkpoint(tmp_path / f"checkpoint-{t + 1}", tensors, config, t + 1)
    run = scan(tmp_path)
    scales = {t.name.removesuffix(".weight"): t.refs[0].scale for t in run.tensors if t.source == "product"}
    assert run.skipped == () or all("LoRA" not in s.reason for s in run.skipped), run.skipped
    assert scales == {
        "model.layers.0.q_proj": 16 / 8,  # rank: "q_proj"; alpha: the literal key
        "model.layers.1.q_proj": 2 / 4,  # rank: the first key wins over "q_proj"
        "model.layers.10.v_proj": 32 / 4,
        "lm_head": 64 / 2,
    }
