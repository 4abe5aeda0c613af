"""Choosing what a run reads (``wdiff.select``): ``--include/--exclude/--steps/--every`` and
``Selection`` against full runs over the same files.

What is checked: the selected tensors' results are those of a full run, bit for bit (the accumulated
maps, the row sums, every summary entry); only their bytes are read (``timing.read_bytes`` equals
their stored sizes, read with the safetensors library, times the checkpoints selected); the
selection is recorded and decides whether earlier results extend; ``watch`` picks what a batch run
over the final folder picks; bad values are one line naming the parameter or flag.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import assert_same_entries, random_sequence, save, trainer_run
from kinds import adapter_checkpoint
from safetensors import safe_open

import wdiff
from wdiff import api
from wdiff.checks import OptionError
from wdiff.errors import WdiffError
from wdiff.results import Results
from wdiff.select import Selection
from wdiff.watcher import KEPT_LAST, Watcher

REPO = Path(__file__).resolve().parent.parent
OPTIONS = {"render": False, "max_points": 4096, "chunk_elements": 700, "spectrum": False}
ATTENTION = "model.layers.*.self_attn.*"

SHAPES: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (40, 16)}
for _i in range(3):
    for _p in ("q", "k", "v", "o"):
        SHAPES[f"model.layers.{_i}.self_attn.{_p}_proj.weight"] = (16, 16)
    SHAPES[f"model.layers.{_i}.mlp.up_proj.weight"] = (32, 16)
    SHAPES[f"model.layers.{_i}.mlp.down_proj.weight"] = (16, 32)
    SHAPES[f"model.layers.{_i}.input_layernorm.weight"] = (16,)
SHAPES["model.norm.weight"] = (16,)
STEPS = [10, 20, 30, 40, 50, 60, 70, 80]


@pytest.fixture(scope="module")
def seq() -> list[dict[str, np.ndarray]]:
    return random_sequence(SHAPES, len(STEPS), "BF16", seed=15)


def _run_dir(root: Path, seq: list, steps: list[int], shards: int = 1, tied: bool = False) -> Path:
    run = trainer_run(root, seq, steps, shards=shards)
    if tied:  # the output embedding is the input one: named lm_head.weight, stored once
        for step in steps:
            (run / f"checkpoint-{step}" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    return run


def _stored_bytes(folder: Path, names: list[str]) -> int:
    """Bytes the safetensors library says these tensors take in one checkpoint folder."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            for n in st.keys():
                if n in names:
                    total += st.get_tensor(n).nbytes
    return total


def _assert_same_tensors(got: Results, want: Results, names: list[str]) -> None:
    """``got`` holds ``names`` (in network order, as ``want``), each bit for bit as in ``want``:
    accumulated maps, row sums and every summary entry."""
    assert set(names) <= set(want.names)
    names = [n for n in want.names if n in set(names)]
    assert got.names == names
    for name in names:
        assert np.array_equal(got.accumulated(name), want.accumulated(name)), name
        assert np.array_equal(got.neuron_change(name), want.neuron_change(name)), name
    assert_same_entries(got.summary["tensors"], {n: want.summary["tensors"][n] for n in names})


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=300, env=env
    )


# --- the selection itself ----------------------------------------------------------------------------


def test_selection_parses_and_picks():
    s = Selection(include="a.*", steps="1000:", every=3)
    assert s.include == ("a.*",) and s.steps == (1000, None) and s.every == 3
    assert Selection(steps=":5000").steps == (None, 5000)
    assert Selection(steps=(20, 40)) == Selection(steps="20:40")
    assert Selection.from_record(s.record()) == s and Selection.from_record(None) == Selection()
    steps = [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert s.pick(steps) == [2, 5]  # 1000, 2500: every 3rd from the first in range; 3500 not added
    assert Selection(steps="500:2000").pick(steps) == [1, 2, 3, 4]  # inclusive on both sides
    assert Selection(every=2).pick(steps) == [0, 2, 4, 6]
    # a growing run: after the last selected (index 2 of the in-range ones), the every-th next
    assert Selection(every=3).following([9, 10, 11, 12, 13], started=True) == [2]
    assert Selection(every=3).following([9, 10, 11, 12, 13], started=False) == [0, 3]
    # a tied weight is kept when any of its names is included and none excluded
    tied = Selection(include="lm_head.*")
    assert tied.keeps(["model.embed_tokens.weight", "lm_head.weight"])
    assert not Selection(exclude="lm_head.*").keeps(["model.embed_tokens.weight", "lm_head.weight"])
    assert Selection(include="*.weight", exclude="*norm*").keeps(["x.weight"])
    assert not Selection(include="*.weight", exclude="*norm*").keeps(["x.norm.weight"])


@pytest.mark.parametrize(
    ("kwargs", "parameter", "says"),
    [
        ({"include": ""}, "include", "empty pattern"),
        ({"include": "a["}, "include", "'[' is not closed"),
        ({"exclude": ["x", 3]}, "exclude", "must be a glob"),
        ({"steps": "100"}, "steps", "must look like A:B"),
        ({"steps": "a:b"}, "steps", "must look like A:B"),
        ({"steps": "-5:10"}, "steps", "must look like A:B"),
        ({"steps": "50:10"}, "steps", "empty range"),
        ({"steps": (1.5, None)}, "steps", "bounds must be training steps"),
        ({"every": 0}, "every", "from 1"),
        ({"every": 1.5}, "every", "integer"),
    ],
)
def test_bad_values_are_one_line_naming_the_parameter(kwargs, parameter, says):
    with pytest.raises(OptionError) as e:
        Selection(**kwargs)
    assert e.value.parameter == parameter and says in str(e.value) and "\n" not in str(e.value)


def test_a_selection_that_leaves_too_little_says_what_of_what(tmp_path, seq):
    run = _run_dir(tmp_path / "run", seq, STEPS)
    cases = [
        (Selection(steps="35:45"), "steps 35:45 keeps 1 of 8 checkpoints (step 40); at least two"),
        (Selection(steps="30:", every=6), "every 6 keeps 1 of the 6 checkpoints in steps 30: (step 30)"),
        (Selection(every=9), "every 9 keeps 1 of 8 checkpoints (step 10)"),
        (Selection(include="*.mlp.gate*"), "include '*.mlp.gate*' matches none of the 23 tensors"),
        (Selection(exclude=["model.*"]), "exclude 'model.*' leaves none of the 23 tensors"),
    ]
    for selection, says in cases:
        with pytest.raises(OptionError) as e:
            wdiff.scan(run, select=selection)
        assert says in str(e.value), str(e.value)
    with pytest.raises(WdiffError, match="select must be a wdiff.select.Selection"):
        wdiff.scan(run, select={"every": 2})  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="pass it to wdiff.scan"):
        api.run(wdiff.scan(run), tmp_path / "out", select=Selection(every=2), **OPTIONS)
    for args, flag in (
        (["--steps", "80:10"], "--steps 80:10 is an empty range"),
        (["--every", "0"], "--every must be an integer from 1"),
        (["--include", "nothing.*"], "--include 'nothing.*' matches none of the 23 tensors"),
    ):
        p = _cli("run", str(run), "-o", str(tmp_path / "cli"), "--no-render", *args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith(f"wdiff: error: {flag}"), p.stderr
    assert not (tmp_path / "cli").exists()


# --- what is read, and what comes out -------------------------------------------------------------


def test_attention_every_2_reads_only_those_bytes_and_equals_a_run_over_them(tmp_path, seq):
    run = _run_dir(tmp_path / "run", seq, STEPS)
    selection = Selection(include=ATTENTION, every=2)
    res = api.run(run, tmp_path / "sel", select=selection, **OPTIONS)
    full = api.run(run, tmp_path / "full", **OPTIONS)
    kept_steps = STEPS[::2]  # 10, 30, 50, 70: 80 does not fall on the stride
    attention = [n for n in SHAPES if ".self_attn." in n]
    assert [c["step"] for c in res.summary["checkpoints"]] == kept_steps
    per_checkpoint = _stored_bytes(run / "checkpoint-10", attention)
    assert per_checkpoint == len(attention) * 16 * 16 * 2  # bf16
    assert res.summary["timing"]["read_bytes"] == per_checkpoint * len(kept_steps)
    assert res.summary["timing"]["read_bytes"] * 4 < full.summary["timing"]["read_bytes"]
    assert res.summary["selection"] == {
        "include": [ATTENTION], "exclude": [], "steps": None, "every": 2,
        "of": {"checkpoints": 8, "tensors": len(SHAPES)},
    }  # fmt: skip
    # the same numbers as a run over exactly those checkpoints and every tensor
    explicit = [run / f"checkpoint-{s}" for s in kept_steps]
    over_them = api.run(explicit, tmp_path / "explicit", **OPTIONS)
    _assert_same_tensors(res, over_them, attention)
    # the CLI says what it selected and writes the same
    chunk_mb = str(700 * 4 / (1 << 20))
    p = _cli("run", str(run), "-o", str(tmp_path / "cli"), "--no-render", "--include", ATTENTION,
             "--every", "2", "--chunk-mb", chunk_mb, "--max-points", "4096", "--no-spectrum")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (
        "selected 4 of 8 checkpoints, 12 of 23 tensors (include 'model.layers.*.self_attn.*', every 2)"
        in p.stderr
    )
    _assert_same_tensors(Results.load(tmp_path / "cli"), res, attention)


def test_include_exclude_steps_keep_full_run_values_bit_for_bit(tmp_path, seq):
    run = _run_dir(tmp_path / "run", seq, STEPS, tied=True)
    full = api.run(run, tmp_path / "full", **OPTIONS)
    # an include of an alias keeps the tied weight; an exclude leaves the norms out
    selection = Selection(include=["model.layers.1.*", "lm_head.weight"], exclude="*layernorm*")
    res = api.run(run, tmp_path / "sel", select=selection, **OPTIONS)
    names = ["model.embed_tokens.weight"] + [
        n for n in SHAPES if n.startswith("model.layers.1.") and "layernorm" not in n
    ]
    _assert_same_tensors(res, full, names)
    assert res.summary["tensors"]["model.embed_tokens.weight"]["aliases"] == ["lm_head.weight"]
    assert res.summary["timing"]["read_bytes"] == _stored_bytes(run / "checkpoint-10", names) * len(STEPS)
    # a step range: inclusive, open on one side
    for steps, kept in (("30:60", [30, 40, 50, 60]), ("50:", [50, 60, 70, 80]), (":20", [10, 20])):
        part = api.run(run, tmp_path / f"steps{steps}", select=Selection(steps=steps), **OPTIONS)
        assert [c["step"] for c in part.summary["checkpoints"]] == kept
        over = api.run([run / f"checkpoint-{s}" for s in kept], tmp_path / f"over{steps}", **OPTIONS)
        _assert_same_tensors(part, over, over.names)


def test_unselected_checkpoints_are_never_opened(tmp_path, seq):
    """A checkpoint outside the selection may even be unreadable: it is not opened."""
    run = _run_dir(tmp_path / "run", seq, STEPS)
    (run / "checkpoint-20" / "model.safetensors").write_bytes(b"not a checkpoint")
    scanned = wdiff.scan(run, select=Selection(steps="30:"))
    assert scanned.steps == [30, 40, 50, 60, 70, 80]
    with pytest.raises(WdiffError, match="checkpoint-20"):
        wdiff.scan(run)


# --- incremental runs ---------------------------------------------------------------------------------


def test_same_selection_extends_another_recomputes(tmp_path, seq):
    src, root, out = _run_dir(tmp_path / "src", seq, STEPS), tmp_path / "run", tmp_path / "out"
    selection = Selection(include=ATTENTION, every=2)
    for step in STEPS[:5]:  # 10 .. 50: selected 10, 30, 50
        shutil.copytree(src / f"checkpoint-{step}", root / f"checkpoint-{step}")
    first = api.run(root, out, select=selection, **OPTIONS)
    assert first.summary["update"] == "full" and len(first.summary["checkpoints"]) == 3
    for step in STEPS[5:]:  # the run grew to 80: selected 10, 30, 50, 70
        shutil.copytree(src / f"checkpoint-{step}", root / f"checkpoint-{step}")
    grown = api.run(root, out, select=selection, **OPTIONS)
    assert grown.summary["update"] == "incremental from 3"
    batch = api.run(root, tmp_path / "batch", select=selection, **OPTIONS)
    assert batch.summary["update"] == "full"
    assert_same_entries(grown.summary["tensors"], batch.summary["tensors"])
    for name in batch.names:
        assert np.array_equal(grown.accumulated(name), batch.accumulated(name))
    assert api.run(root, out, select=selection, **OPTIONS).summary["update"] == "up to date"
    # another selection (even one whose checkpoints would line up) is recomputed in full, not mixed
    other = api.run(root, out, select=Selection(include=ATTENTION, steps="10:70", every=2), **OPTIONS)
    assert other.summary["update"] == "full"
    assert api.run(root, out, **OPTIONS).summary["update"] == "full"  # everything now
    assert api.run(root, out, **OPTIONS).summary["update"] == "up to date"


def test_results_without_a_selection_read_as_everything(tmp_path, seq):
    root, out = _run_dir(tmp_path / "run", seq, STEPS), tmp_path / "out"
    api.run(root, out, **OPTIONS)
    summary = json.loads((out / "summary.json").read_text())
    del summary["selection"]  # as a wdiff from before selections wrote it
    (out / "summary.json").write_text(json.dumps(summary))
    assert Results.load(out).summary.get("selection") is None
    assert api.run(root, out, **OPTIONS).summary["update"] == "up to date"
    assert api.run(root, out, select=Selection(every=2), **OPTIONS).summary["update"] == "full"
    bad = json.loads((out / "summary.json").read_text())
    bad["selection"]["every"] = 0
    (out / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(WdiffError, match=r"summary.json: not wdiff's summary: selection.every: expected"):
        Results.load(out)
    assert api.run(root, out, **OPTIONS).summary["update"] == "full"  # not extended: recomputed


# --- watch ----------------------------------------------------------------------------------------------


def _checkpoint(root: Path, step: int, tensors: dict) -> None:
    save(root / f"checkpoint-{step}" / "model.safetensors", tensors)
    (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_watch_with_every_picks_what_a_batch_run_picks(tmp_path, seq):
    root, out = tmp_path / "run", tmp_path / "out"
    root.mkdir()
    selection = Selection(include=ATTENTION, steps="20:", every=3)
    watcher = Watcher(root, out, settle=1, select=selection, **OPTIONS)
    updates = []
    for step, tensors in zip(STEPS, seq):
        _checkpoint(root, step, tensors)
        updates += [u for _ in range(2) for u in watcher.poll()]
    # steps 20 .. 80 in range, every 3rd from 20: 20, 50, 80
    assert [[c["step"] for c in u.summary["checkpoints"]] for u in updates] == [[20, 50], [20, 50, 80]]
    assert [u.summary["update"] for u in updates] == ["full", "incremental from 2"]
    batch = api.run(root, tmp_path / "batch", select=selection, **OPTIONS)
    watched = Results.load(out)
    attention = [n for n in SHAPES if ".self_attn." in n]
    _assert_same_tensors(watched, batch, attention)
    assert watched.summary["selection"]["every"] == 3
    # what the watch keeps of the newest checkpoint: the selected tensors only
    with safe_open(out / KEPT_LAST, "np") as kept:
        assert sorted(kept.keys()) == sorted(attention)
    # a watch with another selection starts over (recomputed in full)
    other = Watcher(root, out, settle=1, select=Selection(include=ATTENTION), **OPTIONS)
    again = [u for _ in range(2) for u in other.poll()]
    assert again and again[0].summary["update"] == "full"
    assert [c["step"] for c in again[-1].summary["checkpoints"]] == STEPS


# --- LoRA, sharded, remote -------------------------------------------------------------------------------

PREFIX = "base_model.model."
LORA = {"model.layers.0.self_attn.q_proj": (24, 16, 4), "model.layers.1.mlp.up_proj": (40, 16, 8)}


def _lora_run(root: Path, count: int = 4) -> list[dict]:
    rng = np.random.default_rng(3)
    state = {}
    for m, (out, inp, r) in LORA.items():
        state[f"{PREFIX}{m}.lora_A.weight"] = rng.standard_normal((r, inp))
        state[f"{PREFIX}{m}.lora_B.weight"] = 0.1 * rng.standard_normal((out, r))
    seq = []
    for t in range(count):
        tensors = {k: v.astype(np.float32) for k, v in state.items()}
        adapter_checkpoint(root / f"checkpoint-{(t + 1) * 5}", tensors, {"r": 4, "lora_alpha": 8,
                           "rank_pattern": {"up_proj": 8}}, (t + 1) * 5)  # fmt: skip
        seq.append(tensors)
        state = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
    return seq


def test_lora_product_selected_by_its_name_reads_its_factors(tmp_path):
    root = tmp_path / "run"
    seq = _lora_run(root)
    full = api.run(root, tmp_path / "full", **OPTIONS)
    product = "model.layers.0.self_attn.q_proj.weight"
    assert product in full.names
    res = api.run(root, tmp_path / "sel", select=Selection(include=ATTENTION), **OPTIONS)
    assert res.names == [product]  # the factors' names begin with base_model.: not selected
    _assert_same_tensors(res, full, [product])
    factors = [f"{PREFIX}model.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB"]
    assert res.summary["timing"]["read_bytes"] == sum(seq[0][f].nbytes for f in factors) * len(seq)
    # selecting the factors alone reads them, and no product
    only = api.run(root, tmp_path / "factors", select=Selection(include="*lora_*"), **OPTIONS)
    assert only.names == sorted(seq[0], key=full.names.index)
    _assert_same_tensors(only, full, only.names)


def test_lora_watch_keeps_only_the_factors_of_the_selected_product(tmp_path):
    src, root, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    _lora_run(src)
    root.mkdir()
    watcher = Watcher(root, out, settle=1, select=Selection(include=ATTENTION), **OPTIONS)
    for folder in sorted(src.iterdir(), key=lambda p: int(p.name.split("-")[1])):
        shutil.copytree(folder, root / folder.name)
        [u for _ in range(2) for u in watcher.poll()]
    batch = api.run(root, tmp_path / "batch", select=Selection(include=ATTENTION), **OPTIONS)
    product = "model.layers.0.self_attn.q_proj.weight"
    _assert_same_tensors(Results.load(out), batch, [product])
    with safe_open(out / KEPT_LAST, "np") as kept:
        assert sorted(kept.keys()) == [
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB"
        ]


def test_sharded_run_reads_only_the_shards_bytes_selected(tmp_path, seq):
    run = _run_dir(tmp_path / "run", seq, STEPS, shards=3)
    selection = Selection(include="model.layers.2.*", steps="20:70", every=2)
    res = api.run(run, tmp_path / "sel", select=selection, **OPTIONS)
    names = [n for n in SHAPES if n.startswith("model.layers.2.")]
    kept = [20, 40, 60]
    assert [c["step"] for c in res.summary["checkpoints"]] == kept
    assert res.summary["timing"]["read_bytes"] == _stored_bytes(run / "checkpoint-20", names) * len(kept)
    over = api.run([run / f"checkpoint-{s}" for s in kept], tmp_path / "over", **OPTIONS)
    _assert_same_tensors(res, over, names)
    # the checkpoints' fingerprints are those of every shard: a full run over them extends nothing else
    assert [c["fingerprint"] for c in res.summary["checkpoints"]] == [
        c["fingerprint"] for c in over.summary["checkpoints"]
    ]


def test_https_selection_fetches_only_what_it_selects(http_server, tmp_path, seq):
    pytest.importorskip("aiohttp")
    from test_remote import tensor_reads

    local = _run_dir(tmp_path / "srv" / "run", seq, STEPS)
    base = http_server(tmp_path / "srv")
    selection = Selection(include="model.layers.0.*", steps="30:", every=2)
    res = api.run(f"{base}/run/", tmp_path / "out", select=selection, commit_every=0, **OPTIONS)
    kept = [30, 50, 70]
    assert [c["step"] for c in res.summary["checkpoints"]] == kept
    reads = tensor_reads(base.log())
    touched = {path.split("/")[-2] for path, _, _ in reads}
    assert touched == {f"checkpoint-{s}" for s in kept}  # the others are never fetched
    names = [n for n in SHAPES if n.startswith("model.layers.0.")]
    want = _stored_bytes(local / "checkpoint-30", names)
    assert res.summary["timing"]["read_bytes"] == want * len(kept)
    over = api.run([local / f"checkpoint-{s}" for s in kept], tmp_path / "over", **OPTIONS)
    _assert_same_tensors(res, over, names)


def test_hub_revisions_fetch_only_the_selected_revisions(hub_server, hf_env, tmp_path, seq):
    pytest.importorskip("huggingface_hub")
    from servers import hub_commit_sha

    local = _run_dir(tmp_path / "local", seq, STEPS)
    folders = {}
    for step in STEPS:
        folder = tmp_path / "revisions" / f"step{step}"
        folder.mkdir(parents=True)
        shutil.copy(local / f"checkpoint-{step}" / "model.safetensors", folder / "model.safetensors")
        folders[f"step{step}"] = folder
    hub = hub_server({"org/suite": folders})
    hf_env(hub)
    selection = Selection(include=ATTENTION, steps=":60", every=2)
    hub.reset()
    res = api.run("hf://org/suite", tmp_path / "out", revisions="step*", select=selection, **OPTIONS)
    kept = [10, 30, 50]
    assert [c["revision"] for c in res.summary["checkpoints"]] == [f"step{s}" for s in kept]
    names = [n for n in SHAPES if ".self_attn." in n]
    assert res.summary["timing"]["read_bytes"] == _stored_bytes(local / "checkpoint-10", names) * len(kept)
    over = api.run([local / f"checkpoint-{s}" for s in kept], tmp_path / "over", **OPTIONS)
    _assert_same_tensors(res, over, names)
    # no file of a revision left out is asked for (listing the branches names them all)
    import hashlib

    fetched = [r["path"] for r in hub.log() if r["method"] == "GET" and "model.safetensors" in r["path"]]
    assert fetched
    for step in STEPS:  # the Hub resolves at the commit, the CDN serves by the file's sha256
        commit = hub_commit_sha(hub, "org/suite", f"step{step}")
        digest = hashlib.sha256((folders[f"step{step}"] / "model.safetensors").read_bytes()).hexdigest()
        asked = [p for p in fetched if commit in p or digest in p]
        assert bool(asked) == (step in kept), (step, asked)
