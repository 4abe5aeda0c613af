"""Update size against the learning rate (wdiff.indicators) and the "what to change" list
(wdiff.advice), on real runs trained with torch with a planted cause each (tests/planted.py), on a
healthy control and on every shipped sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import planted
import pytest

import wdiff
from wdiff import advice, indicators, metrics
from wdiff.findings import Finding
from wdiff.results import Results

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
SAMPLE_RUNS = [
    "digits-gpt2",
    "digits-bert-bf16-sharded",
    "digits-gpt2-lora",
    "digits-mlp-pt",
    "digits-accelerate",
    "digits-mlp-onnx/torchscript",
    "digits-mlp-onnx/dynamo",
]
CAUSES = {
    "healthy": {},
    "fast-block": {"lr_scale": {"model.layers.2": 10.0}},
    "stopped-embeddings": {"stop_at": {"model.embed_tokens": 200}},
}


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Results]:
    """Each planted run trained once per session (about 4 s each) and analysed by wdiff."""
    root = tmp_path_factory.mktemp("planted")
    return {
        name: wdiff.run(planted.train(root / name, **causes), root / f"{name}-out", render=False)
        for name, causes in CAUSES.items()
    }


def _found(res: Results) -> list[dict]:
    return json.loads((res.path / "findings.json").read_text())["findings"]


def _ours(res: Results) -> list[tuple[str, str]]:
    return [(f["kind"], f["tensor"]) for f in _found(res) if f["kind"] in indicators.KINDS]


def test_a_block_with_10x_learning_rate_is_an_lr_outlier(runs):
    res = runs["fast-block"]
    assert _ours(res) == [("lr_outlier", "model.layers.2")]
    message = next(f["message"] for f in _found(res) if f["kind"] == "lr_outlier")
    assert "faster than its peers per unit of learning rate" in message
    ind = indicators.block_indicators(metrics.analyse(res), res.summary["trainer_state"])
    factors = {b: ind.factor(b) for b in ind.blocks if np.isfinite(ind.factor(b))}
    # the planted 10x shows as its multiplier (Adam: steps scale with the rate), the others near 1
    assert 6 < factors["model.layers.2"] < 12
    assert all(1 / indicators.PEER_RATIO < f < 2 for b, f in factors.items() if b != "model.layers.2")


def test_embeddings_whose_learning_rate_drops_to_0_stopped_moving(runs):
    res = runs["stopped-embeddings"]
    assert _ours(res) == [("stopped_moving", "model.embed_tokens")]
    f = next(f for f in _found(res) if f["kind"] == "stopped_moving")
    assert f["steps"] == [200]
    assert "stopped moving after step 200" in f["message"] and "the loss still fell" in f["message"]
    # and nothing else changed: the same seed, the other blocks train as in the healthy run
    assert [x for x in _found(res) if x["kind"] not in indicators.KINDS] == []


def test_healthy_control_has_no_finding_and_margins_to_the_thresholds(runs):
    res = runs["healthy"]
    assert _found(res) == []
    m = metrics.analyse(res)
    ind = indicators.block_indicators(m, res.summary["trainer_state"])
    factors = [ind.factor(b) for b in ind.blocks if np.isfinite(ind.factor(b))]
    assert max(factors) < indicators.PEER_RATIO / 2 and min(factors) > 2 / indicators.PEER_RATIO
    update = np.nan_to_num(ind.update)
    for b in range(len(ind.blocks)):
        others = np.median(np.delete(update, b, axis=0), axis=0)
        assert (update[b] / others).min() > 5 * indicators.STOP_SHARE  # slowest block: ~0.1 of the rest


def test_effective_learning_rate_is_update_ratio_per_step_over_the_interval_mean_rate(runs):
    res = runs["healthy"]
    m = metrics.analyse(res)
    ind = indicators.block_indicators(m, res.summary["trainer_state"])
    history = res.summary["trainer_state"]["log_history"]
    span = m.spans[2]
    rates = [e["learning_rate"] for e in history if span.step_start < e["step"] <= span.step_end]
    assert ind.learning_rate[2] == pytest.approx(np.mean(rates))
    b = ind.blocks.index("model.layers.1")
    names = [t["tensor"] for t in m.tensors if t["block"] == "model.layers.1"]
    s = res.summary["tensors"]
    dw = np.sqrt(sum(s[n]["interval_l2"][2] ** 2 for n in names))
    w = np.sqrt(sum(s[n]["l2"][2] ** 2 for n in names))
    assert ind.per_lr[b, 2] == pytest.approx(dw / w / span.gap / np.mean(rates), rel=1e-9)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Results]:
    root = tmp_path_factory.mktemp("samples")
    return {run: wdiff.run(SAMPLES / run, root / run.replace("/", "-"), render=False) for run in SAMPLE_RUNS}


@pytest.mark.parametrize("run", SAMPLE_RUNS)
def test_no_false_alarm_on_the_shipped_samples(samples, run):
    assert _ours(samples[run]) == []


def test_what_to_change_is_ranked_and_links_its_evidence(runs):
    """Both planted causes in one list: the stopped embeddings first (severity), then the fast block,
    whose outlier_change tensors join it as evidence; every link in the box points into the page."""
    fast, stopped = _found(runs["fast-block"]), _found(runs["stopped-embeddings"])
    found = [Finding(**f) for f in fast + stopped]
    got = advice.suggest(found)
    assert 2 <= len(got) <= advice.LIMIT
    assert [s.rank for s in got] == list(range(1, len(got) + 1))
    assert [s.severity for s in got] == sorted((s.severity for s in got), reverse=True)
    assert (got[0].kind, got[0].tensors) == ("stopped_moving", ["model.embed_tokens"])
    assert got[0].text.startswith("Check the data loader") and "after step 200" in got[0].text
    assert got[1].kind == "lr_outlier" and got[1].tensors[0] == "model.layers.2"
    assert got[1].text.startswith("Lower the learning rate of the param group holding model.layers.2")
    assert all(found[i].tensor.startswith("model.layers.2") for i in got[1].findings)
    covered = [i for s in got for i in s.findings]
    assert sorted(covered) == list(range(len(found)))  # every finding is evidence once

    page = (runs["fast-block"].path / "report.html").read_text()
    box = page[page.index('id="what-to-change"') :]
    box = box[: box.index("</section>")]
    assert page.index('id="what-to-change"') < page.index('id="findings"')  # at the top
    targets = re.findall(r'href="#([^"]+)"', box)
    assert "finding-4" in targets and "update-size" in targets  # the lr_outlier row and the table
    for target in targets:
        assert f'id="{target}"' in page, target
    assert "model.layers.2" in box and "8." in box  # the block and its factor


def test_more_than_five_causes_give_five_suggestions():
    found = [
        Finding("nonfinite", "a.weight", "NaN", steps=[10]),
        Finding("frozen", "b.weight", "frozen"),
        Finding("spike", "c.weight", "spike", steps=[20, 30]),
        Finding("spike", "d.weight", "spike", steps=[40, 50]),
        Finding("unchanged_rows", "wte.weight", "rows"),
        Finding("stalled_elements", "ln.weight", "bf16"),
        Finding("duplicate_checkpoint", "*", "same weights saved twice", steps=[300]),
        Finding("low_rank_update", "layers.0.q_proj.weight", "Rank 8 holds 90%. Try a LoRA of rank 8."),
    ]
    got = advice.suggest(found)
    assert [s.kind for s in got] == ["nonfinite", "duplicate_checkpoint", "frozen", "spike", "spike"]
    assert got[1].text.startswith("Check how the checkpoints were saved") and "step 300" in got[1].text
    unknown = advice.suggest(found[-1:])
    assert unknown[0].text == "Look at low_rank_update on layers.0.q_proj.weight: Rank 8 holds 90%."


def test_cli_closes_with_what_to_change(runs):
    from typer.testing import CliRunner

    from wdiff.cli import app

    result = CliRunner().invoke(app, ["report", str(runs["stopped-embeddings"].path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("what to change (report.html#what-to-change):")
    assert lines[start + 1].startswith("  1. Check the data loader and the param group of model.embed_tokens")
    assert lines[start + 1].endswith("[findings #1; report.html#update-size]")


def test_cli_says_nothing_to_change_on_a_healthy_run(runs):
    from typer.testing import CliRunner

    from wdiff.cli import app

    result = CliRunner().invoke(app, ["report", str(runs["healthy"].path)])
    assert result.exit_code == 0 and "no findings" in result.output
    # nothing drawn from a finding; at most the update-rank hint, which is information, not a problem
    tail = result.output.split("what to change", 1)
    lines = tail[1].splitlines()[1:] if len(tail) == 2 else []
    suggestions = [line for line in lines if line.strip()[:2].rstrip(".").isdigit()]
    assert all(line.rstrip().endswith("[report.html#update-rank]") for line in suggestions), result.output
