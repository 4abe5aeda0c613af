"""Many small tensors (mixture-of-experts): a run's cost grows linearly in the tensor count.

No wall clock here (the machine is shared): the tests count what a run does instead. Results files
are opened and headers parsed a fixed number of times per run, whatever the tensor count; Dask gets a
few tasks per hundred small tensors, not two per tensor; and the Python calls a whole run makes grow
linearly (a loop over every tensor inside a loop over every tensor would make them grow as N^2).
``benchmarks/many_tensors.py`` measures the time (docs/performance.md, "Many tensors").
"""

from __future__ import annotations

import collections
import gc
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import wdiff
from tests.factories import save
from tests.kinds import check_against_reference
from wdiff import compute
from wdiff.naming import network_order
from wdiff.schema import ACCUMULATED, NEURON_CHANGE, POOLED


def moe(n: int, experts: int = 8) -> list[tuple[str, tuple[int, ...]]]:
    """N tensors named like a mixture-of-experts model: per layer a norm, a router, 3 matrices per
    expert and a second norm; embeddings first and a head last."""
    names = [("model.embed_tokens.weight", (32, 8))]
    layer = 0
    while len(names) < n - 1:
        p = f"model.layers.{layer}."
        names += [(p + "input_layernorm.weight", (8,)), (p + "mlp.gate.weight", (experts, 8))]
        for e in range(experts):
            names += [
                (f"{p}mlp.experts.{e}.{w}.weight", (4, 8) if w != "w2" else (8, 4))
                for w in ("w1", "w2", "w3")
            ]
        names.append((p + "post_attention_layernorm.weight", (8,)))
        layer += 1
    return names[: n - 1] + [("lm_head.weight", (32, 8))]


def make_run(folder: Path, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """3 checkpoints of N tensors as HF Trainer folders (the official writer sorts the names)."""
    rng = np.random.default_rng(seed)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in moe(n)}
    seq = []
    for step in (10, 20, 30):
        save(folder / f"checkpoint-{step}" / "model.safetensors", weights)
        seq.append(weights)
        weights = {k: (v + rng.uniform(-1e-2, 1e-2, v.shape)).astype(np.float32) for k, v in weights.items()}
    return seq


class Counts:
    """What a run does that could be repeated per tensor: results files opened, JSON documents and
    safetensors headers parsed, Dask tasks, aggregate calls, and every Python call (``sys.setprofile``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, calls: bool = False):
        import safetensors

        import wdiff.readers
        from wdiff.readers import safetensors as st_reader

        self.opens: collections.Counter[str] = collections.Counter()
        self.json_loads = 0
        self.headers = 0
        self.tasks = 0
        self.combines = 0
        self.calls = 0
        self._profile = calls
        real_open, real_loads, real_header = safetensors.safe_open, json.loads, st_reader.read_header
        real_graph, real_aggregate = compute.build_graph, compute.aggregate

        def safe_open(path, *a, **k):
            self.opens[Path(path).name] += 1
            return real_open(path, *a, **k)

        def loads(*a, **k):
            self.json_loads += 1
            return real_loads(*a, **k)

        def read_header(*a, **k):
            self.headers += 1
            return real_header(*a, **k)

        def build_graph(*a, **k):
            graph = real_graph(*a, **k)
            self.tasks += len(graph[0])
            return graph

        def aggregate(*a, **k):
            self.combines += 1
            return real_aggregate(*a, **k)

        monkeypatch.setattr(safetensors, "safe_open", safe_open)
        monkeypatch.setattr(json, "loads", loads)
        monkeypatch.setattr(st_reader, "read_header", read_header)
        monkeypatch.setattr(wdiff.readers, "read_header", read_header)
        monkeypatch.setattr(compute, "build_graph", build_graph)
        monkeypatch.setattr(compute, "aggregate", aggregate)

    def run(self, inputs: Path, out: Path) -> wdiff.Results:
        def count(frame, event, arg):
            self.calls += 1

        if self._profile:
            sys.setprofile(count)
        try:  # one thread: every call is seen, in the same order every time
            return wdiff.run(inputs, out, render=False, scheduler="sync")
        finally:
            sys.setprofile(None)


def counts_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, calls: bool = False) -> Counts:
    make_run(tmp_path / f"run-{n}", n)
    with monkeypatch.context() as m:
        counts = Counts(m, calls)
        counts.run(tmp_path / f"run-{n}", tmp_path / f"out-{n}")
    return counts


def test_results_files_are_opened_once_per_run_whatever_the_tensor_count(tmp_path, monkeypatch):
    """The report read ``rows.safetensors`` once per tensor (a header parse of a file that grows with
    the tensor count: quadratic, most of a 20,000-tensor run). Now every count is the same at N and
    at 2N, and small."""
    small = counts_for(tmp_path, monkeypatch, 300)
    large = counts_for(tmp_path, monkeypatch, 600)
    assert small.opens == large.opens, (small.opens, large.opens)
    assert all(large.opens[f] <= 2 for f in (NEURON_CHANGE, ACCUMULATED, POOLED)), large.opens
    assert small.json_loads == large.json_loads <= 10
    # one per checkpoint in the scan, and one each of accumulated and rows when the report checks them
    # against summary.json (wdiff.schema)
    assert small.headers == large.headers == 3 + 2
    assert (small.combines, large.combines) == (300, 600)  # once per tensor, nothing more


def test_small_tensors_share_dask_tasks(tmp_path, monkeypatch):
    """One chunk task and one aggregate task per tensor cost more than their work (and Dask's own
    bookkeeping grows faster than the graph): whole small tensors are bundled."""
    counts = counts_for(tmp_path, monkeypatch, 2 * compute.BUNDLE_TENSORS + 10)
    assert counts.tasks <= 3 + 2  # 3 bundles; the embedding and head bundle along, nothing left over


def test_python_calls_grow_linearly_in_the_tensor_count(tmp_path, monkeypatch):
    """Every Python call of a whole run (scan, compute, results, scene, findings, report), counted at N,
    2N and 4N tensors: linear growth adds twice as many calls from 2N to 4N as from N to 2N; a step
    that loops over all tensors for each tensor would add four times as many."""
    c = [counts_for(tmp_path, monkeypatch, n, calls=True).calls for n in (150, 300, 600)]
    first, second = c[1] - c[0], c[2] - c[1]
    assert first > 0
    assert second / first < 2.2, c


def test_the_collector_is_paused_during_a_run_and_restored(tmp_path, monkeypatch):
    make_run(tmp_path / "run", 20)
    seen = []
    real = compute.compute

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)

    monkeypatch.setattr(compute, "compute", spy)
    assert gc.isenabled()
    wdiff.run(tmp_path / "run", tmp_path / "out", render=False)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller's choice is kept
        wdiff.run(tmp_path / "run", tmp_path / "out2", render=False)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_five_thousand_tensors_against_numpy(tmp_path):
    """A whole run of 5,000 tensors (bundled, on threads): a sample checked against the float64
    reference, every tensor present in network order, the bundled results equal to a run with one
    task per tensor (bundles of one) bit for bit."""
    seq = make_run(tmp_path / "run", 5000)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False)
    names = [name for name, _ in moe(5000)]
    assert res.names == network_order(names)  # layers.10 after layers.9 (the file has it first)
    assert res.names.index("model.layers.10.input_layernorm.weight") > res.names.index(
        "model.layers.9.post_attention_layernorm.weight"
    )
    sample = names[:: len(names) // 60] + names[-3:]
    maps = res.accumulated_of(sample)
    for name in sample:
        check_against_reference(res.summary["tensors"][name], maps[name], [c[name] for c in seq])
    rows = res.neuron_change_of(sample)
    for name in sample:
        expect = maps[name].astype(np.float64).reshape(maps[name].shape[0], -1).sum(axis=1)
        np.testing.assert_allclose(rows[name], expect, rtol=1e-6)


def test_bundles_give_the_same_bits_as_one_task_per_tensor(tmp_path, monkeypatch):
    make_run(tmp_path / "run", 700, seed=3)
    bundled = wdiff.run(tmp_path / "run", tmp_path / "bundled", render=False)
    monkeypatch.setattr(compute, "BUNDLE_TENSORS", 1)
    single = wdiff.run(tmp_path / "run", tmp_path / "single", render=False, scheduler="sync")
    assert bundled.names == single.names
    for name in bundled.names:
        a, b = dict(bundled.summary["tensors"][name]), dict(single.summary["tensors"][name])
        assert a == b, name
    for f in (ACCUMULATED, NEURON_CHANGE):
        assert (tmp_path / "bundled" / f).read_bytes() == (tmp_path / "single" / f).read_bytes()
    a, b = bundled.accumulated_of(bundled.names), single.accumulated_of(single.names)
    assert all(np.array_equal(a[n], b[n]) for n in a)
