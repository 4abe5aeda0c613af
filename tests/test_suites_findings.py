"""Broken checkpoint suites: the distance of every checkpoint to the last one (``distance_last_l2``,
summed in the same pass) against a float64 numpy reference on every compute path, incremental runs
against full ones, and the findings ``duplicate_checkpoint`` and ``out_of_order_checkpoint`` on
planted runs (real files, copied as a user or a Hub mirror would) and healthy controls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from factories import DTYPES, random_sequence, save, sgd_run, trainer_run
from kinds import adapter_checkpoint
from test_lora import MODULES, _adapters, _effective
from test_pieces import _scatter

import wdiff
from wdiff import api, findings, metrics
from wdiff.schema import check_summary
from wdiff.sequence import AlignedTensor, Checkpoint, Run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"

SHAPES = {"layers.0.w": (37, 53), "layers.1.w": (37, 53), "bias": (1000,), "scalar": ()}


def _distance_last(weights) -> list[float]:
    """float64 reference: ||W(t) - W(T-1)|| for every t."""
    w = [np.asarray(x, np.float64) for x in weights]
    return [float(np.linalg.norm((x - w[-1]).ravel())) for x in w]


def _check(got, weights) -> None:
    ref = _distance_last(weights)
    assert len(got) == len(ref)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * max(ref + [1.0]))


def _found(res) -> list[dict]:
    return json.loads((res.path / "findings.json").read_text())["findings"]


# --- the metric, on every compute path -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("chunk", [1000, 1 << 22])
def test_distance_to_the_last_checkpoint_matches_numpy_bytes(tmp_path, dtype, chunk):
    seq = random_sequence(SHAPES, 6, dtype, seed=3)
    root = trainer_run(tmp_path / "run", seq, [10, 20, 30, 40, 50, 60])
    res = wdiff.run(root, tmp_path / "out", render=False, chunk_elements=chunk)
    check_summary(res.summary)  # the validator accepts the new key
    for name in SHAPES:
        entry = res.summary["tensors"][name]
        _check(entry["distance_last_l2"], [c[name].astype(np.float64) for c in seq])
        assert entry["distance_last_l2"][-1] == 0.0
        assert entry["distance_last_l2"][0] == pytest.approx(entry["net_l2"], rel=1e-6)


def test_distance_to_the_last_checkpoint_when_the_dtype_changes(tmp_path):
    seq = random_sequence({"w": (300, 7)}, 4, "F32", seed=5)
    kinds = ["F32", "BF16", "F16", "F32"]
    stored = [{"w": c["w"].astype(DTYPES[k][0])} for c, k in zip(seq, kinds)]
    for step, tensors in zip([1, 2, 3, 4], stored):
        save(tmp_path / "run" / f"step_{step}.safetensors", tensors)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, chunk_elements=500)
    _check(res.summary["tensors"]["w"]["distance_last_l2"], [c["w"].astype(np.float64) for c in stored])


@pytest.mark.parametrize("chunk", [1000, 1 << 22])
def test_distance_to_the_last_checkpoint_matches_numpy_pieces(tmp_path, chunk):
    rng = np.random.default_rng(7)
    shape = (37, 53)
    weights = [rng.standard_normal(shape)]
    for _ in range(4):
        weights.append(weights[-1] + rng.standard_normal(shape) * 0.05)
    refs = [
        _scatter(tmp_path, t, w, "F32", rng, cuts)
        for t, (w, cuts) in enumerate(zip(weights, [0, 1, 5, 40, 3]))
    ]
    checkpoints = tuple(Checkpoint(str(tmp_path / f"ckpt{t}"), t * 10, {"w": r}) for t, r in enumerate(refs))
    tensor = AlignedTensor("w", shape, tuple(refs))
    assert tensor.source == "pieces"
    res = api.run(
        Run(str(tmp_path), checkpoints, (tensor,), ()), tmp_path / "out", render=False, chunk_elements=chunk
    )
    _check(res.summary["tensors"]["w"]["distance_last_l2"], [w.astype(np.float32) for w in weights])


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_distance_to_the_last_checkpoint_matches_numpy_lora_product(tmp_path, chunk):
    settings = {"r": 4, "lora_alpha": 16, "rank_pattern": {"up_proj": 8}}
    seq = _adapters(MODULES, 5, seed=2)
    for step, tensors in zip([5, 10, 15, 20, 25], seq):
        adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tensors, settings, step)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, chunk_elements=chunk)
    for module, scale in zip(MODULES, (16 / 4, 16 / 8)):
        entry = res.summary["tensors"][f"{module}.weight"]
        _check(entry["distance_last_l2"], [_effective(t, module, scale, False) for t in seq])


# --- incremental runs ------------------------------------------------------------------------------


def _grow(tmp_path, steps, first: int, **kw):
    """Run over the first ``first`` checkpoints, add the others, extend; and a full run."""
    run, later = tmp_path / "run", tmp_path / "later"
    later.mkdir()
    for step in steps[first:]:
        shutil.move(run / f"checkpoint-{step}", later / f"checkpoint-{step}")
    wdiff.run(run, tmp_path / "out", render=False, **kw)
    for step in steps[first:]:
        shutil.move(later / f"checkpoint-{step}", run / f"checkpoint-{step}")
    extended = wdiff.run(run, tmp_path / "out", render=False, **kw)
    full = wdiff.run(run, tmp_path / "full", render=False, incremental=False, **kw)
    assert extended.summary["update"] == f"incremental from {first}"
    return extended, full


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_incremental_distance_equals_the_full_run_where_it_is_given(tmp_path, dtype):
    steps = [10, 20, 30, 40, 50, 60, 70]
    seq = random_sequence(SHAPES, len(steps), dtype, seed=9)
    trainer_run(tmp_path / "run", seq, steps)
    extended, full = _grow(tmp_path, steps, 4, chunk_elements=999)
    check_summary(extended.summary)
    for name in SHAPES:
        got = extended.summary["tensors"][name]["distance_last_l2"]
        want = full.summary["tensors"][name]["distance_last_l2"]
        # W(1), W(2) were not read by the extension: their distance to the new last one is unknown
        assert got[1:3] == [None, None]
        assert got[:1] + got[3:] == want[:1] + want[3:]  # the same bits as the full run
        _check(want, [c[name].astype(np.float64) for c in seq])


def test_incremental_lora_distance_equals_the_full_run(tmp_path):
    settings = {"r": 4, "lora_alpha": 8, "rank_pattern": {"up_proj": 8}}
    seq = _adapters(MODULES, 5, seed=11)
    steps = [1, 2, 3, 4, 5]
    for step, tensors in zip(steps, seq):
        adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tensors, settings, step)
    extended, full = _grow(tmp_path, steps, 3, chunk_elements=9)
    for name in full.names:
        got = extended.summary["tensors"][name]["distance_last_l2"]
        want = full.summary["tensors"][name]["distance_last_l2"]
        assert got[1] is None and got[:1] + got[2:] == want[:1] + want[2:]


# --- findings on planted runs -----------------------------------------------------------------------


def _sgd(tmp_path, shards: int = 1, **causes) -> Path:
    checkpoints, steps = sgd_run(**causes)
    return trainer_run(tmp_path / "run", checkpoints, steps, shards=shards)


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _replace(root: Path, step: int, source_step: int, files: list[str] | None = None) -> None:
    """Replace the weights of checkpoint-``step`` by those of checkpoint-``source_step`` (all of them,
    or the files named), as a copied folder or a re-uploaded revision would."""
    src, dst = root / f"checkpoint-{source_step}", root / f"checkpoint-{step}"
    for path in _weights(src):
        if files is None or path.name in files:
            shutil.copyfile(path, dst / path.name)


def test_a_duplicated_checkpoint_is_found_and_gives_no_spike(tmp_path):
    root = _sgd(tmp_path)
    shutil.rmtree(root / "checkpoint-50")
    shutil.copytree(root / "checkpoint-40", root / "checkpoint-50")  # the same weights saved twice
    res = wdiff.run(root, tmp_path / "out", render=False)
    found = _found(res)
    assert [(f["kind"], f["tensor"], f.get("steps")) for f in found] == [
        ("duplicate_checkpoint", "*", [40, 50])
    ]  # and no spike on the next interval (its change spans two intervals' steps)
    assert "40" in found[0]["message"] and "50" in found[0]["message"]


def test_without_the_fix_the_duplicate_would_read_as_a_spike(tmp_path):
    """The spike rule on its own (no suite information) fires on the interval after a duplicate on
    this run: the fix, not the run, is what keeps it quiet."""
    root = _sgd(tmp_path, lr=0.01)
    for step in (40, 50):
        _replace(root, step, 30)  # three saves of the same weights: 40 and 50 are copies of 30
    res = wdiff.run(root, tmp_path / "out", render=False)
    m = metrics.analyse(res)
    assert findings._spikes(m)  # noqa: SLF001 - the unfixed rule
    kinds = [(f["kind"], f.get("steps")) for f in _found(res)]
    assert kinds == [("duplicate_checkpoint", [30, 40]), ("duplicate_checkpoint", [40, 50])]


def test_one_tensor_unchanged_over_an_interval_is_not_a_duplicate(tmp_path):
    checkpoints, steps = sgd_run()
    checkpoints[4]["layers.2.mlp.weight"] = checkpoints[3]["layers.2.mlp.weight"]
    root = trainer_run(tmp_path / "run", checkpoints, steps)
    res = wdiff.run(root, tmp_path / "out", render=False)
    assert not [f for f in _found(res) if f["kind"] in ("duplicate_checkpoint", "out_of_order_checkpoint")]


def test_a_checkpoint_holding_the_final_weights_is_out_of_order(tmp_path):
    root = _sgd(tmp_path)
    _replace(root, 40, 80)  # as pythia#205: a revision serving the final weights
    res = wdiff.run(root, tmp_path / "out", render=False)
    found = _found(res)
    assert [(f["kind"], f["tensor"], f.get("steps")) for f in found] == [
        ("out_of_order_checkpoint", "*", [40])
    ]
    assert "last checkpoint (step 80)" in found[0]["message"]


def test_a_checkpoint_from_late_in_training_is_out_of_order(tmp_path):
    """Not a copy of the last checkpoint, but of a late one: closer to the end than its neighbours."""
    steps = list(range(100, 1300, 100))
    seq = random_sequence({"a": (64, 32), "b": (200,), "c": (16, 16)}, len(steps), seed=4)
    root = trainer_run(tmp_path / "run", seq, steps)
    _replace(root, 300, 1100)
    res = wdiff.run(root, tmp_path / "out", render=False)
    # (random_sequence draws each interval's step size from 0.01-0.2: its spikes are not at issue)
    found = [(f["kind"], f["tensor"], f.get("steps")) for f in _found(res) if f["kind"] in SUITE_KINDS]
    assert found == [("out_of_order_checkpoint", "*", [300])]
    m = metrics.analyse(res)
    assert findings.suite(m).near[2] >= findings.ORDER_RATIO


def test_one_shard_replaced_by_the_final_one_names_its_tensors(tmp_path):
    """EleutherAI/pythia#206: a step serving the final checkpoint's first shard."""
    root = _sgd(tmp_path, shards=3)
    shard = "model-00001-of-00003.safetensors"
    _replace(root, 40, 80, files=[shard])
    res = wdiff.run(root, tmp_path / "out", render=False)
    index = json.loads((root / "checkpoint-80" / "model.safetensors.index.json").read_text())
    in_shard = [n for n, f in index["weight_map"].items() if f == shard]
    found = _found(res)
    assert [(f["kind"], f.get("steps")) for f in found] == [("out_of_order_checkpoint", [40])]
    f = found[0]
    assert f["tensor"] in in_shard and f["tensor"] != "*"
    assert f"{len(in_shard)} tensors" in f["message"]
    m = metrics.analyse(res)
    assert sorted(findings.suite(m).copies[3]) == sorted(in_shard)


def test_an_incremental_run_finds_what_its_pass_can_see(tmp_path):
    """After an extension, distances to the new last checkpoint are known from W(K-1) on: a copy of
    the final weights there is found exactly as by a full run; nothing is made up for the others."""
    steps = list(range(10, 90, 10))
    checkpoints, _ = sgd_run(steps=steps)
    checkpoints[5] = dict(checkpoints[7])  # step 60 holds the final weights (80)
    trainer_run(tmp_path / "run", checkpoints, steps)
    extended, full = _grow(tmp_path, steps, 6)
    want = [("out_of_order_checkpoint", "*", [60])]
    assert [(f["kind"], f["tensor"], f.get("steps")) for f in _found(full)] == want
    assert [(f["kind"], f["tensor"], f.get("steps")) for f in _found(extended)] == want
    assert extended.summary["tensors"]["head.weight"]["distance_last_l2"][1:5] == [None] * 4


# --- healthy controls ----------------------------------------------------------------------------

SUITE_KINDS = {"duplicate_checkpoint", "out_of_order_checkpoint"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_runs_give_no_suite_finding(tmp_path, seed):
    checkpoints, steps = sgd_run(seed=seed)
    root = trainer_run(tmp_path / "sgd", checkpoints, steps)
    assert _found(wdiff.run(root, tmp_path / "sgd-out", render=False)) == []
    seq = random_sequence({"a": (64, 32), "b": (200,), "c": (16, 16)}, 8, seed=seed)
    root = trainer_run(tmp_path / "walk", seq, [100 * (i + 1) for i in range(8)])
    res = wdiff.run(root, tmp_path / "walk-out", render=False)
    assert _found(res) == []
    # the margin: the largest healthy ratio is far below the threshold
    assert max(findings.suite_ratios(metrics.analyse(res)), default=0) < findings.ORDER_RATIO / 2


@pytest.mark.parametrize(
    "sample",
    [
        "digits-gpt2",
        "digits-bert-bf16-sharded",
        "digits-accelerate",
        "digits-gpt2-lora",
        "digits-mlp-onnx/dynamo",
        "digits-mlp-onnx/torchscript",
        "digits-mlp-pt",
    ],
)
def test_the_samples_give_no_suite_finding(tmp_path, sample):
    res = wdiff.run(SAMPLES / sample, tmp_path / "out", render=False)
    assert not [f for f in _found(res) if f["kind"] in SUITE_KINDS]
    m = metrics.analyse(res)
    s = findings.suite(m)
    assert not (s.duplicates or s.copies or s.near)
    assert max(findings.suite_ratios(m), default=0) < findings.ORDER_RATIO / 2
