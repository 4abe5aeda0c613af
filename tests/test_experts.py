"""Mixture-of-experts health (wdiff.experts, the ``expert_starved`` finding, the report's Experts table)
on real MoE runs trained with torch on the CPU (tests/planted_moe.py): a healthy control and runs whose
layer-1 router never picks expert 3, in Mixtral's per-expert layout, in transformers 5's fused layout
and renamed to Qwen-MoE / DeepSeek names."""

from __future__ import annotations

import json

import numpy as np
import planted_moe
import pytest
from safetensors.numpy import load_file, save_file

import wdiff
from wdiff import advice, experts, metrics
from wdiff.report.build import read_findings
from wdiff.results import Results

MOE = "model.layers.1.block_sparse_moe"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Results]:
    root = tmp_path_factory.mktemp("moe")
    made = {
        "healthy": planted_moe.train(root / "healthy"),
        "starved": planted_moe.train(root / "starved", starve={(1, 3)}),
        "fused": planted_moe.train(root / "fused", starve={(1, 3)}, fused=True),
        "two": planted_moe.train(root / "two", starve={(0, 1), (0, 6)}, layers=2),
    }
    made["qwen"] = _as_qwen(made["starved"], root / "qwen")
    return {k: wdiff.run(v, root / f"{k}-out", render=False, spectrum=False) for k, v in made.items()}


def _as_qwen(run, root):
    """The same weights under Qwen-MoE names (mlp.experts.E.{gate,up,down}_proj, mlp.gate) plus a
    shared expert that is not routed (mlp.shared_expert.*, which moves like any dense MLP)."""
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((32, 32)).astype(np.float32)
    for folder in sorted(run.glob("checkpoint-*")):
        state = load_file(str(folder / "model.safetensors"))
        out = {}
        for k, v in state.items():
            k = k.replace("block_sparse_moe", "mlp")
            for a, b in names.items():
                k = k.replace(f".{a}.weight", f".{b}.weight")
            out[k] = v
        shared = shared + 0.01 * rng.standard_normal(shared.shape).astype(np.float32)
        for layer in (0, 1):
            out[f"model.layers.{layer}.mlp.shared_expert.gate_proj.weight"] = shared.copy()
        (root / folder.name).mkdir(parents=True)
        save_file(out, str(root / folder.name / "model.safetensors"))
        (root / folder.name / "trainer_state.json").write_text((folder / "trainer_state.json").read_text())
    return root


def _found(res: Results) -> list[dict]:
    return json.loads((res.path / "findings.json").read_text())["findings"]


def _reference(run_root, moe: str) -> dict[int, float]:
    """Each expert's accumulated |dW| per element, from the checkpoints with numpy."""
    folders = sorted(run_root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    sums: dict[int, list[float]] = {}
    for name in states[0]:
        one = experts.expert_of(name)
        if one is None or one[0] != moe:
            continue
        acc = sum(
            np.abs(b[name].astype(np.float64) - a[name].astype(np.float64)).sum()
            for a, b in zip(states, states[1:])
        )
        s = sums.setdefault(one[1], [0.0, 0])
        s[0] += acc
        s[1] += states[0][name].size
    return {e: a / n for e, (a, n) in sorted(sums.items())}


def test_a_healthy_moe_has_no_starved_expert(runs):
    res = runs["healthy"]
    assert _found(res) == []
    layers = experts.layers(metrics.analyse(res))
    assert [layer.prefix for layer in layers] == [f"model.layers.{i}.block_sparse_moe" for i in (0, 1)]
    for layer in layers:
        assert len(layer.change) == planted_moe.EXPERTS and layer.starved == []
        assert min(layer.change.values()) > 0.5 * layer.median  # far from the 0.1 threshold
        assert layer.router == f"{layer.prefix}.gate.weight"
        ref = _reference(res.path.parent / "healthy", layer.prefix)
        np.testing.assert_allclose([layer.change[e] for e in ref], list(ref.values()), rtol=1e-5)


@pytest.mark.parametrize("name", ["starved", "fused", "qwen"])
def test_a_starved_expert_is_one_finding_with_its_router_row(runs, name):
    res = runs[name]
    moe = MOE if name != "qwen" else "model.layers.1.mlp"
    found = _found(res)
    assert [(f["kind"], f["tensor"], f["rows"]) for f in found] == [("expert_starved", moe, [[3, 3]])]
    message = found[0]["message"]
    assert message.startswith(f"Expert 3 of {moe} barely trained: it moved 0 per element")
    assert f"its row of the router {moe}.gate.weight moved" in message and "router collapse" in message
    (layer,) = [lay for lay in experts.layers(metrics.analyse(res)) if lay.prefix == moe]
    assert layer.fused == (name == "fused") and layer.change[3] == 0 and layer.starved == [3]
    assert layer.router_change[3] < 0.05 * layer.router_median  # weight decay alone moved it
    # the frozen expert tensors and the router's row are not findings of their own any more
    assert all(f["kind"] not in ("frozen", "unchanged_rows", "outlier_change") for f in found)
    (s,) = [s for s in advice.suggest(read_findings(res.path)) if s.kind == "expert_starved"]
    assert s.rank == 1 and "expert 3 of " + moe in s.text and s.chart == "experts"
    page = (res.path / "report.html").read_text()
    assert 'id="experts"' in page and "<td>3</td>" in page


def test_values_match_numpy_and_the_other_layer_is_healthy(runs):
    res = runs["starved"]
    layers = {lay.prefix: lay for lay in experts.layers(metrics.analyse(res))}
    for prefix, layer in layers.items():
        ref = _reference(res.path.parent / "starved", prefix)
        np.testing.assert_allclose([layer.change[e] for e in ref], list(ref.values()), rtol=1e-5, atol=1e-12)
    assert layers["model.layers.0.block_sparse_moe"].starved == []
    fused = {lay.prefix: lay for lay in experts.layers(metrics.analyse(runs["fused"]))}
    for prefix, layer in fused.items():  # the same run fused: the same numbers from rows.safetensors
        np.testing.assert_allclose(
            list(layer.change.values()), list(layers[prefix].change.values()), rtol=1e-5
        )


def test_two_starved_experts_of_one_layer(runs):
    found = _found(runs["two"])
    assert [(f["kind"], f["tensor"], f["rows"]) for f in found] == [
        ("expert_starved", "model.layers.0.block_sparse_moe", [[1, 1], [6, 6]])
    ]
    assert found[0]["message"].startswith("Experts 1, 6 of model.layers.0.block_sparse_moe barely trained")


def test_a_dense_model_has_no_experts_section(tmp_path):
    import planted

    res = wdiff.run(
        planted.train(tmp_path / "dense", steps=100), tmp_path / "out", render=False, spectrum=False
    )
    assert experts.layers(metrics.analyse(res)) == []
    assert 'id="experts"' not in (res.path / "report.html").read_text()


def test_names_that_are_not_experts():
    assert experts.expert_of("model.layers.1.mlp.shared_experts.gate_proj.weight") is None
    assert experts.expert_of("model.layers.1.mlp.experts.12.down_proj.weight") == (
        "model.layers.1.mlp",
        12,
        "down_proj.weight",
    )
    assert experts.fused_experts("model.layers.1.mlp.experts.gate_up_proj")
    assert not experts.fused_experts("model.layers.1.mlp.shared_experts.gate_proj.weight")
    assert (
        experts.group_key("model.layers.3.mlp.experts.7.w1.weight")
        == "model.layers.*.mlp.experts.*.w1.weight"
    )


def test_the_picture_lays_each_layers_experts_out_as_a_grid(runs):
    from wdiff.scene import build_scene

    res = runs["starved"]
    scene = build_scene(res.path / "accumulated.safetensors", res.names)
    index = {p.name: p for p in scene.placements}
    for layer in (0, 1):
        boxes = {}
        for e in range(planted_moe.EXPERTS):
            parts = [
                index[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                for w in ("w1", "w2", "w3")
            ]
            left, right = min(p.bounds[0] for p in parts), max(p.bounds[1] for p in parts)
            top, bottom = max(p.bounds[2] for p in parts), min(p.bounds[3] for p in parts)
            boxes[e] = (left, right, top, bottom)
            assert len({p.slice for p in parts}) == 1  # one depth slice: the layer's block
            # an expert's modules side by side in data-flow order: w1 (gate), w3 (up), w2 (down)
            w1, w2, w3 = parts
            assert w1.bounds[1] < w3.bounds[0] and w3.bounds[1] < w2.bounds[0]
        lefts = sorted({round(b[0], 3) for b in boxes.values()})
        tops = sorted({round(b[2], 3) for b in boxes.values()})
        assert len(lefts) >= 2 and len(tops) >= 2 and len(lefts) * len(tops) >= planted_moe.EXPERTS  # a grid
        for a in range(planted_moe.EXPERTS):  # tiles do not overlap
            for b in range(a):
                (l1, r1, t1, b1), (l2, r2, t2, b2) = boxes[a], boxes[b]
                assert r1 <= l2 or r2 <= l1 or b1 >= t2 or b2 >= t1
        # the grid sits inside the layer's frame, right of the attention
        frame = scene.blocks[index[f"model.layers.{layer}.self_attn.q_proj.weight"].slice].frame
        assert all(
            frame[0] <= b[0] and b[1] <= frame[1] and b[2] <= frame[2] and b[3] >= frame[3]
            for b in boxes.values()
        )
        assert (
            min(b[0] for b in boxes.values())
            > index[f"model.layers.{layer}.self_attn.o_proj.weight"].bounds[1]
        )
