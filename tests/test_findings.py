"""Findings on runs with planted causes, and none on a healthy control or the sample runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import save, sgd_run, trainer_run

import wdiff
from wdiff import findings, metrics
from wdiff.results import Results

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"

PLANTED = {
    "lr_scale": {"layers.4.": 10.0},
    "frozen": ("layers.2.mlp.weight",),
    "unused_rows": {"embed.weight": [0, *range(40, 50)]},
    "nan_at": ("layers.1.attn.weight", 60, (3, 7)),
    "kick": ("layers.3.mlp.weight", 55, 30.0),
}


def _run(tmp_path_factory, name: str, **causes) -> Results:
    checkpoints, steps = sgd_run(**causes)
    root = trainer_run(tmp_path_factory.mktemp(name) / "run", checkpoints, steps)
    return wdiff.run(root, root.parent / "out", render=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _run(tmp_path_factory, "planted", **PLANTED)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return _run(tmp_path_factory, "healthy")


def _found(res: Results) -> list[dict]:
    doc = json.loads((res.path / "findings.json").read_text())
    assert doc["schema"] == 2  # {"schema", "findings"}; wdiff before the schema wrote the bare list
    return doc["findings"]


def test_every_planted_cause_is_found_with_kind_tensor_rows_and_steps(planted):
    got = {(f["kind"], f["tensor"]): f for f in _found(planted)}
    expected = {
        ("nonfinite", "layers.1.attn.weight"),
        ("frozen", "layers.2.mlp.weight"),
        ("unchanged_rows", "embed.weight"),
        ("spike", "layers.3.mlp.weight"),
        ("outlier_change", "layers.4.attn.weight"),
        ("outlier_change", "layers.4.mlp.weight"),
        ("outlier_change", "layers.4.norm.weight"),
        ("lr_outlier", "layers.4"),  # the same cause as one block (wdiff.indicators)
    }
    assert set(got) == expected  # and nothing else: no false alarm on the untouched tensors
    assert got[("nonfinite", "layers.1.attn.weight")]["steps"] == [60]
    assert got[("nonfinite", "layers.1.attn.weight")]["rows"] == [[3, 3]]
    assert got[("unchanged_rows", "embed.weight")]["rows"] == [[0, 0], [40, 49]]
    assert got[("spike", "layers.3.mlp.weight")]["steps"] == [50, 60]
    assert "more" in got[("outlier_change", "layers.4.attn.weight")]["message"]
    for f in got.values():
        assert set(f) <= {"kind", "tensor", "rows", "steps", "message"}
        assert "try" in f["message"].lower() or "check" in f["message"].lower(), f["message"]


def test_healthy_run_gives_no_finding(healthy):
    assert _found(healthy) == []


def test_low_learning_rate_layer_is_an_outlier_too(tmp_path_factory):
    res = _run(tmp_path_factory, "slow", lr_scale={"layers.3.": 0.05})
    got = {(f["kind"], f["tensor"]) for f in _found(res)}
    outliers = {("outlier_change", f"layers.3.{k}.weight") for k in ("attn", "mlp", "norm")}
    assert got == outliers | {("lr_outlier", "layers.3")}  # the block, by wdiff.indicators
    assert all("less" in f["message"] or "slower" in f["message"] for f in _found(res))


@pytest.mark.parametrize("run", ["digits-gpt2", "digits-bert-bf16-sharded"])
def test_sample_runs_give_only_true_findings(tmp_path, run):
    """GPT-2: every vocabulary row is used (pixels 0-16, classes 17-26, BOS 27) and tied to the
    output, so no row is unchanged and nothing else is wrong: no finding. BERT: row 0 of the word
    embeddings is the padding index (pad_token_id 0) and gets no gradient, and pure-BF16 LayerNorm
    scales stuck at exactly 1.0 never move (updates below half a BF16 step): true findings only."""
    res = wdiff.run(SAMPLES / run, tmp_path / "out", render=False)
    got = _found(res)
    if run == "digits-gpt2":
        assert got == []
        return
    kinds = {f["kind"] for f in got}
    assert kinds == {"unchanged_rows", "stalled_elements"}
    rows = [f for f in got if f["kind"] == "unchanged_rows"]
    assert [(f["tensor"], f["rows"]) for f in rows] == [("bert.embeddings.word_embeddings.weight", [[0, 0]])]
    for f in got:
        if f["kind"] == "stalled_elements":
            assert "LayerNorm.weight" in f["tensor"]


def test_whole_run_frozen_is_one_finding(tmp_path):
    same = {"a.weight": np.ones((4, 4), np.float32), "b.weight": np.zeros((3,), np.float32)}
    for step in (1, 2, 3):
        save(tmp_path / "run" / f"step_{step}.safetensors", same)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False)
    got = _found(res)
    assert [(f["kind"], f["tensor"]) for f in got] == [("frozen", "*")]


def test_spike_rule_ignores_the_first_interval_and_scales_by_step_gap(planted):
    """Unequal step gaps: the change per step, not per interval, is compared."""
    m = metrics.analyse(planted)
    intervals = [r for r in m.intervals if r["tensor"] == "layers.0.attn.weight"]
    rows = [dict(r) for r in intervals]
    rows[3]["l2"] = rows[3]["l2"] * 4  # 4x the change ...
    rows[3]["step_gap"] = rows[3]["step_gap"] * 4  # ... over 4x the steps: not a spike
    rows[0]["l2"] = rows[0]["l2"] * 50  # the first interval: never flagged
    other = [r for r in m.intervals if r["tensor"] != "layers.0.attn.weight"]
    m.intervals = other + rows
    got = [f for f in findings.find(m) if f.kind == "spike" and f.tensor == "layers.0.attn.weight"]
    assert got == []
    rows[3]["step_gap"] = intervals[3]["step_gap"]
    rows[3]["l2"] = intervals[3]["l2"] * findings.SPIKE_RATIO * 1.5
    got = [f for f in findings.find(m) if f.kind == "spike" and f.tensor == "layers.0.attn.weight"]
    assert [f.steps for f in got] == [[rows[3]["step_start"], rows[3]["step_end"]]]


def test_a_spike_of_the_whole_model_is_one_finding(tmp_path_factory):
    res = _run(tmp_path_factory, "loss-spike", kick=("", 35, 30.0))  # every tensor, one step
    got = _found(res)
    assert [(f["kind"], f["tensor"], f["steps"]) for f in got] == [("spike", "*", [30, 40])]
    assert got[0]["message"].startswith(f"{len(res.names)} tensors (first: embed.weight)")


def test_a_divergence_of_the_whole_model_is_one_finding(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"layers.{i}.weight" for i in range(4)]
    w = {n: rng.standard_normal((6, 5)).astype(np.float32) for n in names}
    for step in (100, 200, 300, 400):
        if step == 200:
            w["layers.2.weight"][1, 1] = np.inf  # one tensor first ...
        if step == 300:
            w = {n: np.full((6, 5), np.nan, np.float32) for n in names}  # ... then all of them
        else:
            w = {n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for n, v in w.items()}
        save(tmp_path / "run" / f"step_{step}.safetensors", w)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False)
    got = [(f["kind"], f["tensor"], f.get("steps"), f.get("rows")) for f in _found(res)]
    assert got == [
        ("nonfinite", "layers.2.weight", [200], [[0, 5]]),
        ("nonfinite", "*", [300], None),
    ]


def _bf16_run(root, frozen_weight_lr: float = 0.0):
    """Pure-BF16 training: W(t+1) = bf16(W(t) + update). Layer norms (values near 1, spacing 2^-7)
    get updates of 0.01 except 5 elements each (1e-4: rounded away, stalled); the final norm gets 1e-4
    everywhere (every update rounded away: frozen by rounding); ``layers.*.mlp.weight`` moves 0.01 on
    values near 0.02, except layer 3's whose learning rate is ``frozen_weight_lr``."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(5)
    w = {f"model.layers.{b}.input_layernorm.weight": np.ones(64) for b in range(4)}
    w |= {f"model.layers.{b}.mlp.weight": 0.02 * rng.standard_normal((16, 64)) for b in range(4)}
    w["model.norm.weight"] = np.ones(64)
    w = {k: v.astype(bf16) for k, v in w.items()}
    seq = [w]
    for _ in range(4):
        nxt = {}
        for k, v in w.items():
            size = 1e-4 if k == "model.norm.weight" else 0.01
            if k == "model.layers.3.mlp.weight":
                size = frozen_weight_lr
            step = size * rng.choice([-1.0, 1.0], v.shape)
            if k.endswith("input_layernorm.weight"):
                step[:5] = 1e-4
            nxt[k] = (v.astype(np.float32) + step).astype(bf16)
        seq.append(nxt)
        w = nxt
    return trainer_run(root, seq, [10, 20, 30, 40, 50])


def test_a_bf16_tensor_frozen_by_rounding_says_so(tmp_path):
    res = wdiff.run(_bf16_run(tmp_path / "run"), tmp_path / "out", render=False)
    got = {(f["kind"], f["tensor"]): f["message"] for f in _found(res)}
    norm = got[("frozen", "model.norm.weight")]
    assert "Likely cause: BF16 rounding, not a frozen parameter" in norm
    assert "are 0.0078 apart in BF16" in norm
    assert "4 of its 4 siblings of the same kind have elements that never moved" in norm
    assert "requires_grad=False, missing from" not in norm
    # a 2-D BF16 weight whose learning rate was 0: its siblings moved far more than its spacing
    mlp = got[("frozen", "model.layers.3.mlp.weight")]
    assert "Likely cause" not in mlp and "missing from the optimizer's param_groups" in mlp
    stalled = [t for k, t in got if k == "stalled_elements"]
    assert sorted(stalled) == [f"model.layers.{b}.input_layernorm.weight" for b in range(4)]


def test_an_f32_frozen_tensor_keeps_the_optimizer_hint(tmp_path):
    rng = np.random.default_rng(6)
    seq = []
    w = {
        "a.norm.weight": np.ones(8, np.float32),
        "layers.0.w": rng.standard_normal((4, 4)).astype(np.float32),
    }
    for _ in range(3):
        seq.append(dict(w))
        w = {"a.norm.weight": w["a.norm.weight"], "layers.0.w": w["layers.0.w"] + 0.01}
    res = wdiff.run(trainer_run(tmp_path / "run", seq, [1, 2, 3]), tmp_path / "out", render=False)
    (frozen,) = [f for f in _found(res) if f["kind"] == "frozen"]
    assert frozen["tensor"] == "a.norm.weight" and "Likely cause" not in frozen["message"]


def test_a_real_pure_bf16_run_names_rounding_for_its_frozen_norms(tmp_path):
    """tests/planted.py trained in pure BF16 with torch (AdamW's steps of about 3e-3 on norm scales at
    1.0, below half the BF16 spacing above 1.0): norm scales that never moved are frozen by rounding,
    and wdiff says so; the same run in float32 has no such finding."""
    import planted

    res = wdiff.run(planted.train(tmp_path / "bf16", bf16=True), tmp_path / "out", render=False)
    found = _found(res)
    frozen = [f for f in found if f["kind"] == "frozen"]
    assert frozen and all(f["tensor"].endswith("norm.weight") for f in frozen)
    for f in frozen:
        assert "Likely cause: BF16 rounding, not a frozen parameter" in f["message"], f["message"]
        assert "missing from the optimizer's param_groups" not in f["message"]
    assert any(f["kind"] == "stalled_elements" for f in found)
    fp32 = wdiff.run(planted.train(tmp_path / "fp32"), tmp_path / "out32", render=False)
    assert [f for f in _found(fp32) if f["kind"] in ("frozen", "stalled_elements")] == []


def test_a_norm_of_a_frozen_block_is_not_blamed_on_rounding(tmp_path):
    """Pure BF16 with layer 1's param group at learning rate 0 (the layer frozen): its norm scales are
    frozen with its matrices, so the hint is the optimizer's, while the other layers' norm scales that
    only rounding froze keep the rounding explanation."""
    import planted

    run = planted.train(tmp_path / "run", bf16=True, stop_at={"model.layers.1": 0})
    found = {
        f["tensor"]: f["message"]
        for f in _found(wdiff.run(run, tmp_path / "out", render=False))
        if f["kind"] == "frozen"
    }
    layer1 = [t for t in found if t.startswith("model.layers.1.")]
    assert len(layer1) == 9  # every tensor of the block
    for t in layer1:
        assert "Likely cause" not in found[t] and "missing from the optimizer's param_groups" in found[t], t
    others = [t for t in found if t.endswith("norm.weight") and not t.startswith("model.layers.1.")]
    assert others and all("Likely cause: BF16 rounding" in found[t] for t in others)
