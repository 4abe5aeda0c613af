"""A real mixture-of-experts run trained with plain torch on the CPU in a few seconds, written in the
layout of a HuggingFace Mixtral checkpoint: ``model.layers.N.block_sparse_moe.gate.weight`` (the router,
one row per expert) and ``model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight`` (SwiGLU experts),
attention ``q/k/v/o_proj``, RMSNorms, ``model.embed_tokens``, ``lm_head``; ``checkpoint-N/`` folders
with ``trainer_state.json`` as the HF Trainer writes them.

Top-2 routing with softmax weights over the chosen two, as Mixtral does, trained on the counting task of
``tests/planted.py`` with AdamW (weight decay 0.01). The planted cause: ``starve={(layer, expert), ...}``
masks those router logits to -inf, so the router never picks that expert: it gets no tokens (router
collapse, as a load-balancing failure leaves it). ``fused=True`` writes the experts as transformers 5
holds them in memory, one 3-D tensor per projection with the expert first
(``block_sparse_moe.experts.gate_up_proj`` (E, 2I, H), ``.down_proj`` (E, H, I)).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path

from planted import VOCAB, WIDTH, _batch
from planted import _model as planted_model

EXPERTS = 8
TOP_K = 2
HIDDEN = 32  # each expert's intermediate size


def _model(torch, layers: int, starve: Collection[tuple[int, int]]):
    nn = torch.nn

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Linear(WIDTH, HIDDEN, bias=False)  # gate
            self.w2 = nn.Linear(HIDDEN, WIDTH, bias=False)  # down
            self.w3 = nn.Linear(WIDTH, HIDDEN, bias=False)  # up

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    class Moe(nn.Module):
        def __init__(self, layer: int) -> None:
            super().__init__()
            self.gate = nn.Linear(WIDTH, EXPERTS, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))
            mask = torch.zeros(EXPERTS)
            for lay, e in starve:
                if lay == layer:
                    mask[e] = -math.inf
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, x):
            flat = x.reshape(-1, WIDTH)
            logits = self.gate(flat) + self.mask
            top, chosen = logits.topk(TOP_K, dim=-1)
            weights = torch.softmax(top, dim=-1)
            out = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                token, slot = (chosen == e).nonzero(as_tuple=True)
                if token.numel():  # an expert no token reaches is not called: no gradient at all
                    out.index_add_(0, token, weights[token, slot, None] * expert(flat[token]))
            return out.reshape(x.shape)

    return planted_model(torch, layers, make_mlp=Moe, mlp_name="block_sparse_moe")


def _fuse(state: dict, torch) -> dict:
    """Per-expert w1/w2/w3 -> transformers 5's fused ``experts.gate_up_proj`` and ``experts.down_proj``."""
    out = {}
    for name, value in state.items():
        if ".experts." not in name:
            out[name] = value
    prefixes = sorted({n.split(".experts.")[0] for n in state if ".experts." in n})
    for p in prefixes:
        w = {k: [state[f"{p}.experts.{e}.{k}.weight"] for e in range(EXPERTS)] for k in ("w1", "w2", "w3")}
        out[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(w["w1"], w["w3"])])
        out[f"{p}.experts.down_proj"] = torch.stack(w["w2"])
    return out


def train(
    root: str | Path,
    *,
    starve: Collection[tuple[int, int]] = (),
    layers: int = 2,
    steps: int = 200,
    save_every: int = 50,
    lr: float = 3e-3,
    fused: bool = False,
    seed: int = 0,
) -> Path:
    """Train the tiny MoE decoder and write an HF Trainer output dir at ``root``; returns ``root``."""
    import torch
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        model = _model(torch, layers, starve)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        root = Path(root)
        history: list[dict] = []
        for step in range(1, steps + 1):
            tokens, targets = _batch(torch, gen)
            loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                history.append({"learning_rate": lr, "loss": round(loss.item(), 4), "step": step})
            if step % save_every == 0:
                folder = root / f"checkpoint-{step}"
                folder.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
                if fused:
                    state = _fuse(state, torch)
                save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
                trainer_state = {"global_step": step, "max_steps": steps, "log_history": list(history)}
                (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if not math.isfinite(history[-1]["loss"]):
            raise RuntimeError(f"planted MoE run {root} diverged")
        return root
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # python tests/planted_moe.py DIR: the runs the tests use, to look at
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "planted-moe")
    train(out / "healthy")
    train(out / "starved", starve={(1, 3)})
    train(out / "starved-fused", starve={(1, 3)}, fused=True)
