"""Remote inputs end to end against real local servers (tests/servers.py): a moto S3 server, an HTTP
server with Range support (and one that fails requests, one that ignores Range), an emulated Hub.

Every remote run is compared bit for bit with the same run read from local disk: the accumulated map,
the row sums and every metric of summary.json. The request logs of the HTTP and Hub servers show
what was read: no byte of a checkpoint twice in one run, and after an interrupted run only what the
first one had not committed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factories import assert_same_entries, random_sequence, trainer_run
from servers import hub_commit_sha, upload_folder

from wdiff import api
from wdiff.errors import WdiffError
from wdiff.results import Results

pytest.importorskip("s3fs")
pytest.importorskip("huggingface_hub")

REPO = Path(__file__).resolve().parent.parent
# 214 KB per checkpoint in bf16: more than one header read (64 KiB), so tensor bytes are range reads
SHAPES = {
    "embed.weight": (256, 128),
    "layers.0.w": (128, 512),
    "layers.0.b": (512,),
    "head.weight": (64, 128),
}
STEPS = [0, 1000, 2000, 3000, 4000, 5000]
CHUNK = 1 << 13  # elements per chunk: several chunks per tensor, so each reads ranges of every checkpoint


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """An HF Trainer output dir of six bf16 checkpoints."""
    root = tmp_path_factory.mktemp("local")
    return trainer_run(root / "run", random_sequence(SHAPES, len(STEPS), "BF16", seed=4), STEPS)


@pytest.fixture(scope="module")
def local_results(local_run, tmp_path_factory) -> Results:
    # without update spectra, as a remote run by default (they would download W(0) and W(T) again)
    out = tmp_path_factory.mktemp("ref") / "out"
    return api.run(local_run, out, render=False, chunk_elements=CHUNK, spectrum=False)


def assert_same(remote: Results, local: Results) -> None:
    """The same numbers, bit for bit: the accumulated map, the row sums, every metric."""
    assert_same_entries(remote.summary["tensors"], local.summary["tensors"])
    for name in local.summary["tensors"]:
        assert np.array_equal(remote.accumulated(name), local.accumulated(name), equal_nan=True), name
    assert [c["step"] for c in remote.summary["checkpoints"]] == [
        c["step"] for c in local.summary["checkpoints"]
    ]
    names = list(local.summary["tensors"])
    for a, b in zip(remote.neuron_change_of(names).values(), local.neuron_change_of(names).values()):
        assert np.array_equal(a, b, equal_nan=True)


def wdiff_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def tensor_reads(log: list[dict], name_part: str = "model.safetensors") -> list[tuple[str, int, int]]:
    """(path, first, last byte) of every ranged GET of a weights file that got an answer."""
    out = []
    for rec in log:
        if (
            rec["method"] == "GET"
            and rec["range"]
            and name_part in rec["path"]
            and rec["status"] in (200, 206)
        ):
            first, _, last = rec["range"].removeprefix("bytes=").partition("-")
            out.append((rec["path"], int(first), int(last)))
    return out


def overlapping(reads: list[tuple[str, int, int]]) -> list[tuple]:
    """Pairs of reads of one file whose byte ranges overlap."""
    found = []
    by_path: dict[str, list[tuple[int, int]]] = {}
    for path, a, b in reads:
        by_path.setdefault(path, []).append((a, b))
    for path, spans in by_path.items():
        spans.sort()
        found += [(path, x, y) for x, y in zip(spans, spans[1:]) if y[0] <= x[1]]
    return found


# --- S3 ---------------------------------------------------------------------------------------------------


def test_s3_run_folder_equals_local_and_says_what_was_read(s3_env, local_run, local_results, tmp_path):
    upload_folder(s3_env, local_run, "s3://runs/finetune")
    p = wdiff_cli("run", "s3://runs/finetune", "-o", str(tmp_path / "out"), "--no-render",
                  "--chunk-mb", str(CHUNK * 4 / (1 << 20)))  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = Results.load(tmp_path / "out")
    assert_same(res, local_results)
    first = res.summary["checkpoints"][0]
    assert first["path"] == "s3://runs/finetune/checkpoint-0"
    ((url, obj),) = first["objects"].items()
    assert url == "s3://runs/finetune/checkpoint-0/model.safetensors"
    assert obj["size"] == (local_run / "checkpoint-0" / "model.safetensors").stat().st_size
    assert len(obj["tag"]) == 32  # the object's ETag (an MD5 for a single-part upload)
    assert res.summary["trainer_state"]["global_step"] == STEPS[-1]  # side files read from the store


def test_s3_pytorch_files_equal_local(s3_env, tmp_path):
    """HF ``pytorch_model.bin`` shards behind their index, read through the restricted unpickler by
    range reads of the zip archives."""
    local = REPO / "tests" / "data" / "torch" / "hf-sharded"
    upload_folder(s3_env, local, "s3://runs/hf-sharded")
    remote = api.run("s3://runs/hf-sharded", tmp_path / "remote", render=False)
    assert_same(remote, api.run(local, tmp_path / "local", render=False, spectrum=False))


def test_s3_dask_workers_read_the_store_themselves(s3_env, local_run, local_results, tmp_path):
    """With a dask.distributed cluster the tasks carry URLs: each worker process reads the ranges
    from S3 itself (nothing of the inputs is on a shared disk)."""
    upload_folder(s3_env, local_run, "s3://runs/dask")
    res = api.run("s3://runs/dask", tmp_path / "out", render=False, chunk_elements=CHUNK, scheduler="local:2")
    assert_same(res, local_results)


def test_s3_missing_bucket_or_prefix_is_one_line(s3_env, tmp_path):
    p = wdiff_cli("run", "s3://no-such-bucket/run", "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("wdiff: error: s3://no-such-bucket/run") and not (tmp_path / "out").exists()


# --- HTTP -------------------------------------------------------------------------------------------------


def test_https_run_folder_reads_each_byte_once(http_server, local_run, local_results, tmp_path):
    base = http_server(local_run.parent)
    res = api.run(f"{base}/run/", tmp_path / "out", render=False, chunk_elements=CHUNK, commit_every=0)
    assert_same(res, local_results)
    reads = tensor_reads(base.log())
    assert reads and overlapping(reads) == []  # nothing downloaded twice (headers, sniffing included)
    got = sum(b - a + 1 for _, a, b in reads)
    on_disk = sum(f.stat().st_size for f in local_run.glob("*/model.safetensors"))
    assert got <= on_disk


def test_https_explicit_file_list(http_server, local_run, local_results, tmp_path):
    base = http_server(local_run.parent)
    files = [f"{base}/run/checkpoint-{s}/model.safetensors" for s in STEPS]
    res = api.run(files, tmp_path / "out", render=False, chunk_elements=CHUNK)
    assert_same(res, local_results)
    assert res.summary["checkpoints"][2]["step"] == 2000  # from the folder name in the URL


def test_https_transient_failures_are_retried(http_server, local_run, local_results, tmp_path):
    """Every 4th request fails (503, a body cut in half, a connection closed before the headers):
    retried with back-off, the numbers unchanged."""
    base = http_server(local_run.parent, fail_every=4, fail_kinds=("503", "drop", "close"), max_failures=30)
    res = api.run(f"{base}/run/", tmp_path / "out", render=False, chunk_elements=CHUNK)
    assert_same(res, local_results)
    faults = [r["fault"] for r in base.log() if r["fault"]]
    assert {"503", "drop"} <= set(faults), faults


def test_https_server_that_ignores_range_is_refused_in_one_line(http_server, tmp_path):
    """A file smaller than one header read is read whole anyway, and right; a bigger one needs a range:
    a server that answers the whole file instead is refused in one line, never read at a wrong
    offset."""
    seq = random_sequence({"w": (256, 512)}, 3, "BF16", seed=1)  # 256 KiB per checkpoint
    run = trainer_run(tmp_path / "run", seq, [1, 2, 3])
    base = http_server(tmp_path, ignore_range=True)
    p = wdiff_cli("run", f"{base}/run/", "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "ignores HTTP Range" in p.stderr and not (tmp_path / "out").exists()
    assert run.is_dir()


def test_https_404_is_one_line(http_server, local_run, tmp_path):
    base = http_server(local_run.parent)
    files = [f"{base}/run/checkpoint-0/model.safetensors", f"{base}/run/checkpoint-7/model.safetensors"]
    with pytest.raises(WdiffError, match=r"checkpoint-7/model.safetensors: (not found|no such)"):
        api.run(files, tmp_path / "out", render=False)


# --- resuming ---------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_an_interrupted_remote_run_goes_on_from_its_last_commit(
    http_server, local_run, local_results, tmp_path
):
    """Committed every 2 checkpoints; stopped after the first commit (3 checkpoints); run again: the
    second run reads only the checkpoints not done, plus W(0) (for the net change) and the last one
    committed (the base of the next difference), and ends with the numbers of a full run."""
    base = http_server(local_run.parent)
    out = tmp_path / "out"

    def stop_after_first_commit(phase: str, done: int, total: int) -> None:
        if phase == "checkpoints":
            raise Stop

    with pytest.raises(Stop):
        api.run(f"{base}/run/", out, render=False, chunk_elements=CHUNK, commit_every=2,
                progress=stop_after_first_commit)  # fmt: skip
    assert len(Results.load(out).summary["checkpoints"]) == 3
    base.reset()
    res = api.run(f"{base}/run/", out, render=False, chunk_elements=CHUNK, commit_every=2)
    assert_same(res, local_results)
    assert res.summary["update"] == "incremental from 5"  # the last part extended the one before
    header = 1 << 16  # a header read: the first 64 KiB (the scan lists every checkpoint's tensors)
    data = {path.split("/")[-2] for path, a, b in tensor_reads(base.log()) if b >= header}
    assert data == {
        "checkpoint-0",
        "checkpoint-2000",
        "checkpoint-3000",
        "checkpoint-4000",
        "checkpoint-5000",
    }


def test_killed_remote_run_restarts_from_its_commit(http_server, local_run, local_results, tmp_path):
    """The CLI killed (SIGKILL) once its first commit is on disk: the next run extends it."""
    base = http_server(local_run.parent, delay=0.02)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wdiff", "run", f"{base}/run/", "-o", str(out), "--no-render",
            "--commit-every", "1", "--chunk-mb", str(CHUNK * 4 / (1 << 20))]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = len(Results.load(out).summary["checkpoints"])
    res = api.run(f"{base}/run/", out, render=False, chunk_elements=CHUNK, commit_every=1)
    assert_same(res, local_results)
    if done < len(STEPS):  # the kill landed before the end (it normally does, with the server's delay)
        assert res.summary["update"] == f"incremental from {len(STEPS) - 1}"


# --- the Hub ----------------------------------------------------------------------------------------------


@pytest.fixture
def hub(hub_server, hf_env, local_run, tmp_path):
    """An emulated Hub holding one revision per checkpoint: branches step0 ... step5000 (plus main)."""
    folders = {}
    for step in STEPS:
        folder = tmp_path / "revisions" / f"step{step}"
        folder.mkdir(parents=True)
        shutil.copy(local_run / f"checkpoint-{step}" / "model.safetensors", folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
        folders[f"step{step}"] = folder
    endpoint = hub_server({"org/suite": folders})
    hf_env(endpoint)
    return endpoint


def test_hub_revisions_equal_local(hub, local_results, tmp_path):
    revisions = ",".join(f"step{s}" for s in STEPS)
    chunk_mb = str(CHUNK * 4 / (1 << 20))
    p = wdiff_cli("run", "hf://org/suite", "--revisions", revisions, "-o", str(tmp_path / "out"),
                  "--no-render", "--chunk-mb", chunk_mb, env={"HF_ENDPOINT": hub})  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = Results.load(tmp_path / "out")
    assert_same(res, local_results)
    c = res.summary["checkpoints"][1]
    assert c["url"] == "hf://org/suite@step1000" and c["revision"] == "step1000"
    assert c["commit"] == hub_commit_sha(hub, "org/suite", "step1000")
    assert c["path"] == f"hf://org/suite@{c['commit']}"  # read at the commit, never at a moving branch
    (obj,) = c["objects"].values()
    assert obj["tag"].startswith("sha256:") and len(obj["tag"]) == 7 + 64  # the LFS file's sha256


@pytest.mark.parametrize("spec", ["step{0..5000..1000}", "step*", "step?000,step0"])
def test_hub_revision_ranges_and_patterns(hub, local_results, tmp_path, spec):
    """A range expands in order; a pattern (alone or in a list) is ordered by the steps in the names."""
    res = api.run("hf://org/suite", tmp_path / "out", revisions=spec, render=False, chunk_elements=CHUNK)
    assert_same(res, local_results)


def test_hub_revision_list_keeps_its_order(hub, tmp_path):
    res = api.run("hf://org/suite", tmp_path / "out", revisions="step1000,step0,step2000", render=False)
    assert [c["step"] for c in res.summary["checkpoints"]] == [1000, 0, 2000]
    assert "kept in the order given" in res.summary["warnings"][0]["reason"]


def test_hub_missing_revision_is_one_line(hub, tmp_path):
    p = wdiff_cli("run", "hf://org/suite", "--revisions", "step0,step999", "-o", str(tmp_path / "out"),
                  env={"HF_ENDPOINT": hub})  # fmt: skip
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("wdiff: error: hf://org/suite@step999: no such revision")


def test_hub_missing_repository_is_one_line(hub, tmp_path):
    with pytest.raises(WdiffError, match=r"^hf://org/nothing: repository not found"):
        api.run("hf://org/nothing", tmp_path / "out", revisions="step0,step1000", render=False)
