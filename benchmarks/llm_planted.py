"""A Llama-3.2-1B-shaped bf16 run with four planted problems, to look at: which colour scale shows them all.

    python benchmarks/llm_planted.py DIR [--layers 16] [--checkpoints 5]
    wdiff run DIR -o OUT [--normalize global|tensor|relative]

The shapes are Llama-3.2-1B's (vocabulary 128,256, hidden 2,048, MLP 8,192, 32 query and 8 key/value
heads of 64, tied embeddings, 16 layers: 146 tensors, 2.47 GB a checkpoint in BF16) in the HF layout
(``checkpoint-N/`` with two shards, an index and ``trainer_state.json``). The weights start as an
initialised model does (matrices N(0, 0.02), norm scales 1.0) and every interval adds an update in
float32 that is rounded to BF16 when stored, as a pure-BF16 run does: N(0, 0.001) for matrices and
embeddings (5% of their RMS), N(0, 0.014) for the norm scales (a scale near 1.0 keeps only the updates
above half its BF16 spacing, 0.0039: the few that survive are large), so in absolute terms the norm
scales move most.

Planted:
- ``model.layers.{L/3}.mlp.*``: frozen (no update at all);
- ``model.norm.weight``: updates of N(0, 0.0004), below half a BF16 step at 1.0 (0.0039 above, 0.002
  below) but for one in millions: frozen by rounding;
- rows 100,000 and up of ``model.embed_tokens.weight`` (28,256 rows): never updated (unused tokens);
- ``model.layers.{9L/16}.self_attn.q_proj.weight``: 10x the update (a param group with 10x the LR).

Writes through the official safetensors writer; about 20 s a checkpoint at 16 layers on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import save  # noqa: E402  (the tests' writer: safetensors.serialize_file)

VOCAB, HIDDEN, MLP, KV = 128_256, 2_048, 8_192, 512
UNUSED_FROM = 100_000
BF16 = ml_dtypes.bfloat16


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (MLP, HIDDEN),
            f"{p}.mlp.up_proj.weight": (MLP, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, MLP),
        }
    out["model.norm.weight"] = (HIDDEN,)
    return out


def planted(layers: int) -> dict[str, object]:
    return {
        "frozen_mlp": f"model.layers.{layers // 3}.mlp",
        "frozen_by_rounding": "model.norm.weight",
        "unused_rows": [UNUSED_FROM, VOCAB - 1],
        "fast_tensor": f"model.layers.{(9 * layers) // 16}.self_attn.q_proj.weight",
    }


def update_size(name: str, plant: dict) -> float:
    if name.startswith(str(plant["frozen_mlp"]) + "."):
        return 0.0
    if name == plant["frozen_by_rounding"]:
        return 0.0004
    if name.endswith("norm.weight"):
        return 0.014
    return 0.01 if name == plant["fast_tensor"] else 0.001


def make(root: Path, layers: int = 16, checkpoints: int = 5, every: int = 500, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    plant = planted(layers)
    weights = {}
    for name, shape in shapes(layers).items():
        if name.endswith("norm.weight"):
            start = np.ones(shape, np.float32)
        else:
            start = rng.standard_normal(shape, np.float32)
            start *= 0.02
        weights[name] = start.astype(BF16)
    history = []
    for c in range(checkpoints):
        step = (c + 1) * every
        if c:
            for name, w in weights.items():
                size = update_size(name, plant)
                if size == 0:
                    continue
                d = rng.standard_normal(w.shape, np.float32)
                d *= size
                if name == "model.embed_tokens.weight":
                    d[UNUSED_FROM:] = 0
                d += w.astype(np.float32)
                weights[name] = d.astype(BF16)
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        names = list(weights)
        half = len(names) // 2
        weight_map = {}
        for k, part in enumerate((names[:half], names[half:])):
            shard = f"model-{k + 1:05d}-of-00002.safetensors"
            save(folder / shard, {n: weights[n] for n in part}, metadata={"format": "pt"})
            weight_map |= {n: shard for n in part}
        total = sum(w.nbytes for w in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        history.append({"loss": round(3.0 - 0.3 * c, 3), "learning_rate": 3e-4, "step": step})
        state = {"global_step": step, "max_steps": checkpoints * every, "log_history": list(history)}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        print(f"{folder}: {total / 1e9:.2f} GB", flush=True)
    (root / "planted.json").write_text(json.dumps(plant, indent=2))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--checkpoints", type=int, default=5)
    args = parser.parse_args()
    make(args.root, args.layers, args.checkpoints)
