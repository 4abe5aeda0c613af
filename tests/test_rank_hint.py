"""The rank of the update as a hint (wdiff.rank_hint): the report's "Rank of the update" table and one
suggestion in advice, never a finding."""

from __future__ import annotations

import json

import numpy as np
from factories import trainer_run
from kinds import adapter_checkpoint

import wdiff
from wdiff import advice, rank_hint
from wdiff.report.build import read_findings

BLOCKS = 4
STEPS = (10, 20, 30, 40)


def _planted(root, seed: int = 0):
    """q_proj: W(t) = W(0) + (t/T) U V^T of rank 4; mlp.up_proj: W(0) + (t/T) full-rank noise."""
    rng = np.random.default_rng(seed)
    start, end = {}, {}
    for b in range(BLOCKS):
        q = f"model.layers.{b}.self_attn.q_proj.weight"
        up = f"model.layers.{b}.mlp.up_proj.weight"
        start[q] = rng.standard_normal((64, 64))
        end[q] = start[q] + 0.02 * rng.standard_normal((64, 4)) @ rng.standard_normal((4, 64))
        start[up] = rng.standard_normal((96, 64))
        end[up] = start[up] + 0.02 * rng.standard_normal((96, 64))
    seq = []
    for i in range(len(STEPS)):
        t = i / (len(STEPS) - 1)
        seq.append({n: ((1 - t) * start[n] + t * end[n]).astype(np.float32) for n in start})
    return trainer_run(root, seq, STEPS)


def test_a_planted_low_rank_update_gives_the_lora_hint(tmp_path):
    res = wdiff.run(_planted(tmp_path / "run"), tmp_path / "out", render=False, spectrum=True)
    rows = {g.label: g for g in rank_hint.groups(res.summary)}
    assert set(rows) == {"q_proj", "up_proj"}
    q, up = rows["q_proj"], rows["up_proj"]
    assert len(q.tensors) == len(up.tensors) == BLOCKS and q.shape == "64x64" and up.shape == "96x64"
    assert q.energy["0.99"] <= 4 and q.energy["0.9"] <= 4  # the planted rank
    assert up.energy["0.9"] > 16  # full-rank noise: a large share of its 64 values
    text, groups = rank_hint.hint(res.summary)
    assert text.startswith("A LoRA of rank 4 on q_proj would capture 90% of this run's full-weight update")
    assert f"the up_proj updates need rank {up.needs()}+" in text
    # information, not a finding: findings.json stays as it was, the hint is the last suggestion
    found = read_findings(tmp_path / "out")
    assert all(f.kind != "update_rank" for f in found)
    assert "update_rank" not in (tmp_path / "out" / "findings.json").read_text()
    got = advice.suggest(found, summary=res.summary)
    assert got[-1].kind == "update_rank" and got[-1].findings == [] and got[-1].chart == "update-rank"
    assert all(s.kind != "update_rank" for s in advice.suggest(found))  # without the summary: none
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="update-rank"' in page and "Rank of the update" in page
    box = page[page.index('id="what-to-change"') : page.index('id="findings"')]
    assert "A LoRA of rank 4 on q_proj" in box and 'href="#update-rank"' in box
    lines = advice.what_to_change(found, "report.html", res.summary)
    assert lines[-1].endswith("[report.html#update-rank]") and "rank 4 on q_proj" in lines[-1]
    print(text, {k: (g.energy, g.effective_rank) for k, g in rows.items()})


def test_the_hint_never_pushes_out_a_findings_suggestion(tmp_path):
    res = wdiff.run(_planted(tmp_path / "run"), tmp_path / "out", render=False, spectrum=True)
    from wdiff.findings import Finding

    found = [Finding(kind=f"kind{i}", tensor=f"t{i}", message=f"m{i}.") for i in range(advice.LIMIT)]
    got = advice.suggest(found, summary=res.summary)
    assert len(got) == advice.LIMIT and all(s.kind != "update_rank" for s in got)
    got = advice.suggest(found[:2], summary=res.summary)
    assert [s.kind for s in got] == ["kind0", "kind1", "update_rank"] and got[-1].rank == 3


PREFIX = "base_model.model."


def test_a_lora_run_says_when_the_adapters_use_less_than_r(tmp_path):
    rng = np.random.default_rng(3)
    modules = {f"model.layers.{b}.self_attn.q_proj": (24, 16) for b in range(3)}
    modules |= {f"model.layers.{b}.mlp.up_proj": (40, 16) for b in range(3)}
    state = {}
    for mod, (out, inp) in modules.items():
        state[f"{PREFIX}{mod}.lora_A.weight"] = rng.standard_normal((8, inp))
        state[f"{PREFIX}{mod}.lora_B.weight"] = 0.1 * rng.standard_normal((out, 8))
    seq = []
    for _ in range(3):
        seq.append({k: v.astype(np.float32) for k, v in state.items()})
        state = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
    for b in range(3):
        seq[-1][f"{PREFIX}model.layers.{b}.self_attn.q_proj.lora_B.weight"][:, 3:] = 0  # B(T) A(T): rank 3
    for step, tensors in zip((5, 10, 15), seq):
        adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tensors, {"r": 8, "lora_alpha": 16}, step)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True)
    rows = {g.label: g for g in rank_hint.groups(res.summary)}
    assert (rows["q_proj"].r, rows["q_proj"].rank_used) == (8, 3)
    assert (rows["up_proj"].r, rows["up_proj"].rank_used) == (8, 8)
    assert rows["q_proj"].rank_held <= 3 and rows["up_proj"].rank_held == 8  # 99% of B(T) A(T)
    text, groups = rank_hint.hint(res.summary)
    held = rows["q_proj"].rank_held
    assert text == (
        "The adapters on up_proj need all r=8 ranks for 99% of their weight: a larger r (16) may fit this "
        f"run better; the adapters on q_proj hold 99% of their weight in rank {held} of r=8: r=4 would do."
    )
    assert all(f.kind != "update_rank" for f in read_findings(tmp_path / "out"))
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>rank holding 99%</th>" in page and f"hold 99% of their weight in rank {held} of r=8" in page


def test_older_results_without_the_held_rank_use_the_numerical_rank():
    lora = {"r": 8, "rank_used": 3}
    spec = {"singular_values": [1.0, 0.5, 0.1], "effective_rank": 2.5, "k": 3, "lora": lora}
    spec["rank_for_energy"] = {"0.5": 1, "0.9": 2, "0.99": 3}
    summary = {"tensors": {"model.layers.0.q_proj.weight": {"shape": [16, 24], "update_spectrum": spec}}}
    (row,) = rank_hint.groups(summary)
    assert row.rank_held == 3
    text = rank_hint.hint(summary)[0]
    assert text == "The adapters hold 99% of their weight in rank 3 of r=8: r=4 would do."


def test_no_spectra_no_hint_no_section(tmp_path):
    res = wdiff.run(_planted(tmp_path / "run"), tmp_path / "out", render=False, spectrum=False)
    assert rank_hint.groups(res.summary) == [] and rank_hint.hint(res.summary) is None
    found = read_findings(tmp_path / "out")
    assert all(s.kind != "update_rank" for s in advice.suggest(found, summary=res.summary))
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="update-rank"' not in page and "Rank of the update" not in page
    assert json.loads((tmp_path / "out" / "findings.json").read_text())["findings"] == [
        f.to_json() for f in found
    ]
