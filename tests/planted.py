"""Real training runs with a planted cause, trained with plain torch on the CPU in a second or two.

A tiny decoder named like a HuggingFace Llama (``model.embed_tokens``, ``model.layers.N.self_attn.
{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, the two RMSNorms, ``model.norm``, ``lm_head``) learns a
synthetic next-token task (each sequence counts up by a per-sequence stride, modulo the vocabulary).
AdamW with one param group per block (the embeddings, each layer, the final norm and head), a linear
learning-rate decay after a short warmup (the Trainer's default schedule), and the output of an HF
Trainer run: ``checkpoint-N/model.safetensors`` and ``trainer_state.json`` whose ``log_history`` holds
``loss``, ``learning_rate`` and ``grad_norm`` every ``log_every`` steps, the learning rate being the one
of the first param group, as the Trainer logs it.

Planted causes, by param group (block) name:

- ``lr_scale={"model.layers.2": 10.0}``: that block's param group has 10x the learning rate;
- ``stop_at={"model.embed_tokens": 200}``: that group's learning rate is 0 from step 200 on;
- ``lr``: the whole model's learning rate (a healthy run uses the default);
- ``bf16=True``: pure BF16 training, where updates below half a BF16 step are rounded away.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

VOCAB = 32
WIDTH = 32
LAYERS = 4
SEQ = 16
BATCH = 32
LR = 3e-3


def _model(torch, layers: int, make_mlp=None, mlp_name: str = "mlp"):
    """The decoder; ``make_mlp(i)`` builds layer i's feed-forward module, named ``mlp_name`` (default:
    the dense SwiGLU MLP below, named ``mlp``)."""
    nn = torch.nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
            self.up_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
            self.down_proj = nn.Linear(2 * WIDTH, WIDTH, bias=False)

        def forward(self, h):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    class Block(nn.Module):
        def __init__(self, layer: int) -> None:
            super().__init__()
            self.input_layernorm = nn.RMSNorm(WIDTH)
            self.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self.self_attn, name, nn.Linear(WIDTH, WIDTH, bias=False))
            self.post_attention_layernorm = nn.RMSNorm(WIDTH)
            setattr(self, mlp_name, make_mlp(layer) if make_mlp else Mlp())

        def forward(self, x):
            a = self.self_attn
            h = self.input_layernorm(x)
            q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.o_proj(att)
            return x + getattr(self, mlp_name)(self.post_attention_layernorm(x))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(VOCAB, WIDTH)
            self.model.layers = nn.ModuleList(Block(i) for i in range(layers))
            self.model.norm = nn.RMSNorm(WIDTH)
            self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

        def forward(self, tokens):
            x = self.model.embed_tokens(tokens)
            for block in self.model.layers:
                x = block(x)
            return self.lm_head(self.model.norm(x))

    return Decoder()


def _batch(torch, gen, strides: tuple[int, int] = (1, 4)):
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    stride = torch.randint(*strides, (BATCH, 1), generator=gen)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def _group_of(name: str) -> str:
    """The param group (block) of a parameter: ``model.layers.2.mlp.up_proj.weight`` -> ``model.layers.2``."""
    parts = name.split(".")
    if parts[1] == "layers":
        return ".".join(parts[:3])
    return ".".join(parts[:-1])


def train(
    root: str | Path,
    *,
    steps: int = 400,
    save_every: int = 50,
    log_every: int = 10,
    warmup: int = 20,
    lr: float = LR,
    lr_scale: Mapping[str, float] | None = None,
    stop_at: Mapping[str, int] | None = None,
    layers: int = LAYERS,
    seed: int = 0,
    bf16: bool = False,
) -> Path:
    """Train the tiny decoder and write an HF Trainer output dir at ``root``; returns ``root``.
    ``bf16``: pure BF16 training (the weights and AdamW's states in BF16, no fp32 master copy)."""
    import torch
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: threads only contend (9 ms a step on one, 100 on two)
    try:
        return _train(
            torch,
            save_file,
            Path(root),
            steps,
            save_every,
            log_every,
            warmup,
            lr,
            lr_scale or {},
            stop_at or {},
            layers,
            seed,
            bf16,
        )
    finally:
        torch.set_num_threads(threads)


def _train(
    torch, save_file, root, steps, save_every, log_every, warmup, lr, lr_scale, stop_at, layers, seed, bf16
):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = _model(torch, layers)
    if bf16:
        model = model.to(torch.bfloat16)
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(_group_of(name), []).append(p)
    names = list(groups)
    scale = [lr_scale.get(n, 1.0) for n in names]
    optimizer = torch.optim.AdamW(
        [{"params": groups[n], "lr": lr * s} for n, s in zip(names, scale)], lr=lr, weight_decay=0.01
    )
    history: list[dict] = []
    losses: list[float] = []
    for step in range(1, steps + 1):
        # the Trainer's linear schedule: warmup to lr, then down to 0 at the last step
        factor = step / warmup if step <= warmup else (steps - step) / (steps - warmup)
        for n, s, group in zip(names, scale, optimizer.param_groups):
            stopped = n in stop_at and step > stop_at[n]
            group["lr"] = 0.0 if stopped else lr * s * factor
        tokens, targets = _batch(torch, gen)
        loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0:
            history.append(
                {
                    "epoch": step / steps,
                    "grad_norm": float(grad_norm),
                    "learning_rate": lr * factor,  # param group 0's scheduled rate, as the Trainer logs
                    "loss": round(sum(losses) / len(losses), 4),
                    "step": step,
                }
            )
            losses = []
        if step % save_every == 0:
            folder = root / f"checkpoint-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            trainer_state = {
                "global_step": step,
                "max_steps": steps,
                "logging_steps": log_every,
                "save_steps": save_every,
                "log_history": list(history),
            }
            (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if not math.isfinite(history[-1]["loss"]):
        raise RuntimeError(f"planted run {root} diverged")
    return root


# --- fine-tuning a trained run: the full weights or a LoRA of the same model ---------------------------

LORA_TARGETS = ("q_proj", "v_proj")  # PEFT's default target modules for a Llama
PEFT_PREFIX = "base_model.model."
FINE_TUNE_STRIDES = (1, 7)  # the new task: strides 1-6 where the base model saw 1-3


def fine_tune(
    base: str | Path,
    root: str | Path,
    *,
    lora_r: int | None = None,
    lora_alpha: int = 16,
    steps: int = 200,
    save_every: int = 50,
    lr: float | None = None,
    seed: int = 7,
) -> Path:
    """Fine-tune the last checkpoint of the run at ``base`` on a new task and write ``root``.

    ``lora_r=None``: a full fine-tune, written as HF Trainer checkpoints (every weight trains).
    ``lora_r=r``: PEFT's LoRA on ``q_proj`` and ``v_proj`` of every layer (A Kaiming-uniform, B zeros,
    scale ``lora_alpha / r``; the base frozen), written as PEFT adapter checkpoints
    (``adapter_model.safetensors`` + ``adapter_config.json`` in each ``checkpoint-N``).
    """
    import torch
    from safetensors.torch import load_file, save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        last = max(Path(base).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = load_file(str(last / "model.safetensors"))
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
        return _fine_tune(
            torch, save_file, state, layers, Path(root), lora_r, lora_alpha, steps, save_every, lr, seed
        )
    finally:
        torch.set_num_threads(threads)


def _lora(torch, linear, r: int, alpha: int):
    """``linear`` wrapped as PEFT's LoRA layer: ``W x + (alpha / r) B A x``."""
    nn = torch.nn

    class LoraLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = linear
            self.lora_A = nn.Linear(linear.in_features, r, bias=False)
            self.lora_B = nn.Linear(r, linear.out_features, bias=False)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
            nn.init.zeros_(self.lora_B.weight)
            self.scale = alpha / r

        def forward(self, x):
            return self.base_layer(x) + self.scale * self.lora_B(self.lora_A(x))

    return LoraLinear()


def _fine_tune(torch, save_file, state, layers, root, lora_r, lora_alpha, steps, save_every, lr, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = _model(torch, layers)
    model.load_state_dict(state)
    if lora_r is None:
        params = list(model.parameters())
        lr = lr or LR / 3
    else:
        model.requires_grad_(False)
        for block in model.model.layers:
            for name in LORA_TARGETS:
                setattr(
                    block.self_attn, name, _lora(torch, getattr(block.self_attn, name), lora_r, lora_alpha)
                )
        params = [p for p in model.parameters() if p.requires_grad]
        lr = lr or LR
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01 if lora_r is None else 0.0)
    warmup = max(1, steps // 10)
    history: list[dict] = []
    losses: list[float] = []
    for step in range(1, steps + 1):
        factor = step / warmup if step <= warmup else (steps - step) / (steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        tokens, targets = _batch(torch, gen, FINE_TUNE_STRIDES)
        loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            history.append(
                {"learning_rate": lr * factor, "loss": round(sum(losses) / len(losses), 4), "step": step}
            )
            losses = []
        if step % save_every == 0:
            folder = root / f"checkpoint-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            if lora_r is None:
                weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
                save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
            else:
                weights = {
                    f"{PEFT_PREFIX}{k}": v.detach().clone().contiguous()
                    for k, v in model.state_dict().items()
                    if ".lora_" in k
                }
                save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
                config = {
                    "peft_type": "LORA",
                    "r": lora_r,
                    "lora_alpha": lora_alpha,
                    "target_modules": list(LORA_TARGETS),
                    "base_model_name_or_path": str(root),
                }
                (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
            trainer_state = {"global_step": step, "max_steps": steps, "log_history": list(history)}
            (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if not math.isfinite(history[-1]["loss"]):
        raise RuntimeError(f"fine-tune {root} diverged")
    return root


if __name__ == "__main__":  # python tests/planted.py DIR: the runs the tests use, to look at
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "planted-runs")
    train(out / "healthy")
    train(out / "fast-block", lr_scale={"model.layers.2": 10.0})
    train(out / "stopped-embeddings", stop_at={"model.embed_tokens": 200})
    fine_tune(out / "healthy", out / "full-fine-tune")
    fine_tune(out / "healthy", out / "lora-fine-tune", lora_r=8)
