#!/usr/bin/env python3
"""Generate the ONNX, LoRA and accelerate sample runs in sample_checkpoints/ (dev-only).

Three REAL, small, deterministic training runs on scikit-learn's bundled ``load_digits()`` data, the
same data as ``make_sample_checkpoints.py``:

1. ``sample_checkpoints/digits-mlp-onnx/`` -- a small row-wise MLP classifier trained with a plain
   PyTorch loop; every 50 steps the model is exported to ONNX by BOTH PyTorch exporters:
   ``torchscript/step_<N>.onnx`` (``torch.onnx.export(..., dynamo=False)``, constant folding on: the
   first Linear sees a 3-D input, so it becomes a MatMul on a folded, transposed copy of its weight
   named ``onnx::MatMul_<k>``) and ``dynamo/step_<N>.onnx`` (``dynamo=True``, parameter names kept).
2. ``sample_checkpoints/digits-gpt2-lora/`` -- a PEFT LoRA run (``transformers.Trainer``) on a tiny
   GPT-2 (Conv1D layers, so ``fan_in_fan_out=True``): ``checkpoint-<N>/adapter_model.safetensors`` +
   ``adapter_config.json``.
3. ``sample_checkpoints/digits-accelerate/`` -- ``accelerate.Accelerator.save_state`` with automatic
   naming (``checkpoints/checkpoint_<i>/``) of two prepared models (``model.safetensors`` and
   ``model_1.safetensors``).

Usage: /work/devvenv/bin/python scripts/make_sample_adapters.py [--only onnx|lora|accelerate]
(the dev venv also needs ``pip install onnx==1.23.2 onnxscript==0.7.2 peft==0.21.2``).
The script wipes and recreates its output folders. wdiff never imports it.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":  # str hashing orders sets (peft)
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_checkpoints import (  # noqa: E402
    GPT2_BOS,
    GPT2_SEQ,
    GPT2_VOCAB,
    N_EVAL,
    OUT_ROOT,
    SEED,
    DigitLMDataset,
    dir_size,
    load_digit_tokens,
    set_determinism,
    wipe,
)

ONNX_DIR = OUT_ROOT / "digits-mlp-onnx"
LORA_DIR = OUT_ROOT / "digits-gpt2-lora"
ACCEL_DIR = OUT_ROOT / "digits-accelerate"


class RowMLP(torch.nn.Module):
    """8x8 digit -> 8 rows of 8 pixels -> Linear per row -> GELU -> LayerNorm -> a residual
    Linear + GELU -> LayerNorm -> flatten -> classes. The two LayerNorms start equal (ones, zeros), so
    the TorchScript exporter deduplicates them in the step-0 export (Identity copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.row = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.mix = torch.nn.Linear(16, 16)
        self.norm2 = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 8, 8)
        gelu = torch.nn.functional.gelu
        h = self.norm(gelu(self.row(x)))
        h = self.norm2(h + gelu(self.mix(h)))
        return self.head(h.flatten(1))


def _digit_batches(pixels: np.ndarray, labels: np.ndarray, batch: int):
    g = torch.Generator().manual_seed(SEED)
    x = torch.from_numpy(pixels[:-N_EVAL]).float().reshape(-1, 8, 8) / 16.0
    y = torch.from_numpy(labels[:-N_EVAL])
    while True:
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i : i + batch]
            yield x[idx], y[idx]


def run_onnx(out_dir: Path, steps: int = 300, every: int = 50) -> dict:
    set_determinism()
    wipe(out_dir)
    (out_dir / "torchscript").mkdir()
    (out_dir / "dynamo").mkdir()
    pixels, labels = load_digit_tokens()
    model = RowMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batches = _digit_batches(pixels, labels, 64)
    example = (torch.zeros(1, 8, 8),)
    losses = []
    for step in range(0, steps + 1):
        if step:
            x, y = next(batches)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        if step % every == 0:  # step 0 too: the untrained model, where the exporter deduplicates
            model.eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, example, str(out_dir / "torchscript" / f"step_{step}.onnx"), dynamo=False,
                    input_names=["pixels"], output_names=["logits"], do_constant_folding=True,
                )  # fmt: skip
                torch.onnx.export(
                    model, example, str(out_dir / "dynamo" / f"step_{step}.onnx"), dynamo=True,
                    input_names=["pixels"], output_names=["logits"], external_data=False,
                )  # fmt: skip
            model.train()
    for leftover in out_dir.rglob("*.data"):  # the dynamo exporter keeps everything inline here
        raise SystemExit(f"unexpected external data file {leftover}")
    info = {"first_loss": losses[0], "last_loss": losses[-1], "bytes": dir_size(out_dir)}
    print(f"[digits-mlp-onnx] {info}")
    return info


def run_lora(out_dir: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    set_determinism()
    wipe(out_dir)
    pixels, labels = load_digit_tokens()
    config = GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=GPT2_SEQ, n_embd=32, n_layer=2, n_head=4, n_inner=64,
        bos_token_id=GPT2_BOS, eos_token_id=GPT2_BOS, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(SEED)
    base = GPT2LMHeadModel(config)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0,
        rank_pattern={"transformer.h.1.mlp.c_fc": 2}, alpha_pattern={"transformer.h.1.mlp.c_fc": 6},
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(base, lora)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=200, per_device_train_batch_size=32, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=10, save_strategy="steps", save_steps=50,
        seed=SEED, data_seed=SEED, full_determinism=True, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    train_ds = DigitLMDataset(pixels[:-N_EVAL], labels[:-N_EVAL])
    trainer = Trainer(model=model, args=args, train_dataset=train_ds)
    trainer.train()
    set_determinism()
    for p in out_dir.iterdir():
        if not (p.is_dir() and p.name.startswith("checkpoint-")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for ckpt in out_dir.iterdir():  # keep the adapter and the trainer state; drop pickles and tokenizer
        for f in ckpt.iterdir():
            if f.name not in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
                f.unlink()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    info = {"first_loss": losses[0], "last_loss": losses[-1], "bytes": dir_size(out_dir)}
    print(f"[digits-gpt2-lora] {info}")
    return info


def run_accelerate(out_dir: Path, steps: int = 150, every: int = 50) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    set_determinism()
    wipe(out_dir)
    pixels, labels = load_digit_tokens()
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(project_dir=str(out_dir), automatic_checkpoint_naming=True),
    )
    torch.manual_seed(SEED)
    encoder = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU())
    head = torch.nn.Linear(32, 10)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=3e-3)
    encoder, head, opt = accelerator.prepare(encoder, head, opt)
    batches = _digit_batches(pixels, labels, 64)
    losses = []
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(head(encoder(x.flatten(1))), y)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        losses.append(float(loss))
        if step % every == 0:
            accelerator.save_state()
    for ckpt in (out_dir / "checkpoints").iterdir():  # keep the weights; drop optimizer/RNG pickles
        for f in ckpt.iterdir():
            if not f.name.endswith(".safetensors"):
                f.unlink()
    info = {"first_loss": losses[0], "last_loss": losses[-1], "bytes": dir_size(out_dir)}
    print(f"[digits-accelerate] {info}")
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["onnx", "lora", "accelerate"])
    args = parser.parse_args()
    runs = {
        "onnx": (run_onnx, ONNX_DIR),
        "lora": (run_lora, LORA_DIR),
        "accelerate": (run_accelerate, ACCEL_DIR),
    }
    infos = {}
    for name, (fn, folder) in runs.items():
        if args.only in (None, name):
            infos[name] = fn(folder)
    print(json.dumps(infos, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
