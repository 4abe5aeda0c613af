"""PEFT LoRA runs: the effective weight change scale * (B(t+1) A(t+1) - B(t) A(t)) against numpy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from factories import reference
from kinds import adapter_checkpoint, check_against_reference
from safetensors import safe_open
from safetensors.numpy import load_file

import wdiff
from wdiff.checkpoints import scan

SAMPLE = Path(__file__).parent.parent / "sample_checkpoints" / "digits-gpt2-lora"
PREFIX = "base_model.model."


def _adapters(modules: dict[str, tuple[int, int, int]], count: int, dtype=np.float32, seed: int = 0):
    """``count`` checkpoints of A (r, in) and B (out, r) per module, as a random walk."""
    rng = np.random.default_rng(seed)
    state = {}
    for m, (out, inp, r) in modules.items():
        state[f"{PREFIX}{m}.lora_A.weight"] = rng.standard_normal((r, inp))
        state[f"{PREFIX}{m}.lora_B.weight"] = 0.1 * rng.standard_normal((out, r))
    seq = []
    for _ in range(count):
        seq.append({k: v.astype(dtype) for k, v in state.items()})
        state = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
    return seq


def _effective(tensors, module, scale, transpose):
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
    w = scale * (b @ a)
    return w.T if transpose else w


MODULES = {"model.layers.0.self_attn.q_proj": (24, 16, 4), "model.layers.1.mlp.up_proj": (40, 16, 8)}
CONFIGS = {  # adapter_config, scale of q_proj (rank 4) and up_proj (rank 8), orientation
    "plain": ({"r": 4, "lora_alpha": 16, "rank_pattern": {"up_proj": 8}}, 16 / 4, 16 / 8),
    "rslora": (
        {"r": 4, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"up_proj": 8}},
        16 / 2,
        16 / 8**0.5,
    ),
    "patterns": (
        {
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"up_proj": 8},
            "alpha_pattern": {"layers.1.mlp.up_proj": 2},
        },
        8 / 4,
        2 / 8,
    ),
    "fan_in_fan_out": (
        {"r": 4, "lora_alpha": 4, "fan_in_fan_out": True, "rank_pattern": {"up_proj": 8}},
        1.0,
        0.5,
    ),
}


@pytest.mark.parametrize("chunk", [7, 1 << 20])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_effective_change_matches_numpy(tmp_path, config, chunk):
    settings, q_scale, up_scale = CONFIGS[config]
    seq = _adapters(MODULES, 4, seed=len(config) + chunk)
    for step, tensors in zip([5, 10, 15, 20], seq):
        adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tensors, settings, step)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, chunk_elements=chunk)
    transpose = bool(settings.get("fan_in_fan_out"))
    for module, scale in zip(MODULES, (q_scale, up_scale)):
        name = f"{module}.weight"
        weights = [_effective(t, module, scale, transpose) for t in seq]
        check_against_reference(res.summary["tensors"][name], res.accumulated(name), weights)
    for raw in seq[0]:  # the raw factors are accumulated as well
        check_against_reference(res.summary["tensors"][raw], res.accumulated(raw), [t[raw] for t in seq])


def test_a_rank_the_config_does_not_give_is_skipped_with_a_reason(tmp_path):
    seq = _adapters(MODULES, 2)
    for step, tensors in enumerate(seq):
        adapter_checkpoint(tmp_path / f"checkpoint-{step}", tensors, {"r": 4, "lora_alpha": 8})
    run = scan(tmp_path)
    assert [s.name for s in run.skipped] == ["model.layers.1.mlp.up_proj.weight"]
    assert "r=4 but lora_A has rank 8" in run.skipped[0].reason


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fan_in_fan_out_gives_the_base_orientation(tmp_path, fan_in_fan_out):
    modules = {"h.0.attn.c_attn": (12, 5, 2)}
    seq = _adapters(modules, 3, seed=2)
    for step, tensors in enumerate(seq):
        adapter_checkpoint(
            tmp_path / f"checkpoint-{step}",
            tensors,
            {"r": 2, "lora_alpha": 3, "fan_in_fan_out": fan_in_fan_out},
        )
    res = wdiff.run(tmp_path, tmp_path / "out", render=False)
    acc = res.accumulated("h.0.attn.c_attn.weight")
    assert acc.shape == ((5, 12) if fan_in_fan_out else (12, 5))
    weights = [_effective(t, "h.0.attn.c_attn", 1.5, fan_in_fan_out) for t in seq]
    check_against_reference(res.summary["tensors"]["h.0.attn.c_attn.weight"], acc, weights)


def test_bf16_factors_embeddings_and_convolutions(tmp_path):
    """Embedding adapters ((r, vocab) and (dim, r), always transposed) in BF16, conv adapters (1x1 B)."""
    rng = np.random.default_rng(7)
    bf16 = ml_dtypes.bfloat16
    names = {"ea": f"{PREFIX}emb.lora_embedding_A", "eb": f"{PREFIX}emb.lora_embedding_B"}
    names |= {"ca": f"{PREFIX}conv.lora_A.weight", "cb": f"{PREFIX}conv.lora_B.weight"}
    shapes = {"ea": ((2, 30), bf16), "eb": ((6, 2), bf16), "ca": ((2, 3, 3, 3), np.float32)}
    shapes["cb"] = ((4, 2, 1, 1), np.float32)
    seq = [{names[k]: rng.standard_normal(s).astype(d) for k, (s, d) in shapes.items()} for _ in range(3)]
    for t, tensors in enumerate(seq):
        adapter_checkpoint(tmp_path / f"checkpoint-{t + 1}", tensors, {"r": 2, "lora_alpha": 4})
    res = wdiff.run(tmp_path, tmp_path / "out", render=False, chunk_elements=11)
    f64 = [{k: t[n].astype(np.float64) for k, n in names.items()} for t in seq]
    emb = [2.0 * (w["eb"] @ w["ea"]).T for w in f64]
    conv = [2.0 * (w["cb"].reshape(4, 2) @ w["ca"].reshape(2, 27)).reshape(4, 3, 3, 3) for w in f64]
    check_against_reference(res.summary["tensors"]["emb.weight"], res.accumulated("emb.weight"), emb)
    check_against_reference(res.summary["tensors"]["conv.weight"], res.accumulated("conv.weight"), conv)


def test_dora_is_not_mistaken_for_lora(tmp_path):
    seq = _adapters({"q": (4, 4, 2)}, 2)
    for t, tensors in enumerate(seq):
        adapter_checkpoint(tmp_path / f"checkpoint-{t}", tensors, {"r": 2, "lora_alpha": 2, "use_dora": True})
    run = scan(tmp_path)
    assert {t.name for t in run.tensors} == set(seq[0])  # raw factors only
    assert "DoRA" in run.skipped[0].reason and run.skipped[0].name == "q.weight"


def test_incremental_lora_run_equals_a_full_run(tmp_path):
    seq = _adapters(MODULES, 5, seed=11)
    settings = {"r": 4, "lora_alpha": 8, "rank_pattern": {"up_proj": 8}}
    for step, tensors in zip(range(1, 6), seq):
        adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tensors, settings, step)
    later = tmp_path / "later"
    later.mkdir()
    for step in (4, 5):
        shutil.move(tmp_path / "run" / f"checkpoint-{step}", later / f"checkpoint-{step}")
    kw = {"render": False, "chunk_elements": 9, "frames": True}
    wdiff.run(tmp_path / "run", tmp_path / "out", **kw)
    for step in (4, 5):
        shutil.move(later / f"checkpoint-{step}", tmp_path / "run" / f"checkpoint-{step}")
    extended = wdiff.run(tmp_path / "run", tmp_path / "out", **kw)
    full = wdiff.run(tmp_path / "run", tmp_path / "full", **kw)
    assert extended.summary["update"] == "incremental from 3"
    for name in full.names:
        np.testing.assert_allclose(extended.accumulated(name), full.accumulated(name), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            extended.neuron_change(name), full.neuron_change(name), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(extended.frames(name), full.frames(name), rtol=1e-6, atol=1e-7)
        for key in ("interval_l2", "l2", "net_l2"):
            np.testing.assert_allclose(
                extended.summary["tensors"][name][key], full.summary["tensors"][name][key], rtol=1e-9
            )


def test_real_peft_run_matches_the_reference(tmp_path):
    """A real PEFT training run on GPT-2 (Conv1D: fan_in_fan_out) with rank/alpha patterns."""
    res = wdiff.run(SAMPLE, tmp_path / "out", render=False, chunk_elements=100)
    folders = sorted(SAMPLE.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    seq = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["rank_pattern"] == {"transformer.h.1.mlp.c_fc": 2}
    effective = {
        "transformer.h.0.attn.c_attn": 8 / 4,
        "transformer.h.1.attn.c_attn": 8 / 4,
        "transformer.h.0.mlp.c_fc": 8 / 4,
        "transformer.h.1.mlp.c_fc": 6 / 2,  # alpha_pattern / rank_pattern
    }
    assert {n for n in res.names if not n.startswith(PREFIX)} == {f"{m}.weight" for m in effective}
    for module, scale in effective.items():
        weights = [_effective(t, module, scale, transpose=True) for t in seq]
        name = f"{module}.weight"
        assert res.summary["tensors"][name]["shape"] == [32, weights[0].shape[1]]  # Conv1D: (in, out)
        check_against_reference(res.summary["tensors"][name], res.accumulated(name), weights)
    for raw in seq[0]:
        ref = reference(seq, raw)
        np.testing.assert_allclose(res.accumulated(raw), ref["accumulated"], rtol=1e-5, atol=1e-7)


def test_schedulers_give_identical_bits(tmp_path):
    seq = _adapters(MODULES, 3, seed=4)
    for step, tensors in enumerate(seq):
        adapter_checkpoint(
            tmp_path / "run" / f"checkpoint-{step}",
            tensors,
            {"r": 4, "lora_alpha": 8, "rank_pattern": {"up_proj": 8}},
        )
    a = wdiff.run(
        tmp_path / "run", tmp_path / "a", render=False, chunk_elements=50, scheduler="threads", workers=2
    )
    b = wdiff.run(tmp_path / "run", tmp_path / "b", render=False, chunk_elements=50, scheduler="sync")
    for name in a.names:
        np.testing.assert_array_equal(a.accumulated(name), b.accumulated(name))
        assert a.summary["tensors"][name] == b.summary["tensors"][name]


def test_adapter_names_in_keys(tmp_path):
    """Keys that keep the adapter name (``lora_A.default.weight``) name the same base weight; two
    adapters of one module get the adapter name in the result's name."""
    rng = np.random.default_rng(3)
    seq = []
    for _ in range(2):
        seq.append(
            {
                f"{PREFIX}q.lora_A.default.weight": rng.standard_normal((2, 3)).astype(np.float32),
                f"{PREFIX}q.lora_B.default.weight": rng.standard_normal((4, 2)).astype(np.float32),
                f"{PREFIX}v.lora_A.one.weight": rng.standard_normal((2, 3)).astype(np.float32),
                f"{PREFIX}v.lora_B.one.weight": rng.standard_normal((4, 2)).astype(np.float32),
                f"{PREFIX}v.lora_A.two.weight": rng.standard_normal((2, 3)).astype(np.float32),
                f"{PREFIX}v.lora_B.two.weight": rng.standard_normal((4, 2)).astype(np.float32),
            }
        )
    for t, tensors in enumerate(seq):
        adapter_checkpoint(tmp_path / f"checkpoint-{t}", tensors, {"r": 2, "lora_alpha": 2})
    run = scan(tmp_path)
    effective = sorted(t.name for t in run.tensors if not t.name.startswith(PREFIX))
    assert effective == ["q.weight", "v.one.weight", "v.two.weight"]


@pytest.mark.parametrize("chunk", [37, 1 << 20])
def test_rows_frames_and_cells_equal_a_run_over_the_effective_weights(tmp_path, chunk):
    """Everything a run writes (accumulated map, row sums, frames, pooled cells, metrics) matches a
    run over the effective weights saved as F32 safetensors: LoRA goes through the same kernels."""
    from factories import save

    settings = {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "rank_pattern": {"up_proj": 8}}
    seq = _adapters(MODULES, 4, seed=21)
    for step, tensors in enumerate(seq):
        adapter_checkpoint(tmp_path / "lora" / f"checkpoint-{step}", tensors, settings, step)
        effective = {
            f"{m}.weight": _effective(tensors, m, 8 / r, True).astype(np.float32)
            for m, (_, _, r) in MODULES.items()
        }
        save(tmp_path / "dense" / f"checkpoint-{step}" / "model.safetensors", effective)
    kw = {"render": False, "chunk_elements": chunk, "frames": True, "max_points": 500}
    lora = wdiff.run(tmp_path / "lora", tmp_path / "out-lora", **kw)
    dense = wdiff.run(tmp_path / "dense", tmp_path / "out-dense", **kw)
    for name in dense.names:
        close = {"rtol": 1e-5, "atol": 1e-6}
        np.testing.assert_allclose(lora.accumulated(name), dense.accumulated(name), **close)
        np.testing.assert_allclose(lora.neuron_change(name), dense.neuron_change(name), **close)
        np.testing.assert_allclose(lora.frames(name), dense.frames(name), **close)
        for key in ("accumulated_l1", "net_l2", "interval_l2", "interval_l1", "l2", "rotation"):
            np.testing.assert_allclose(
                lora.summary["tensors"][name][key], dense.summary["tensors"][name][key], rtol=1e-5
            )
    with (
        safe_open(tmp_path / "out-lora" / "pooled.safetensors", "numpy") as a,
        safe_open(tmp_path / "out-dense" / "pooled.safetensors", "numpy") as b,
    ):
        for name in dense.names:
            np.testing.assert_allclose(a.get_tensor(name), b.get_tensor(name), rtol=1e-5, atol=1e-6)
