#!/usr/bin/env python3
"""Generate the sample training runs in sample_checkpoints/ (dev-only).

Two REAL, small, deterministic training runs on scikit-learn's bundled
``load_digits()`` data (1797 8x8 images, intensities 0..16):

1. ``sample_checkpoints/digits-gpt2/`` -- a HuggingFace ``transformers.Trainer``
   run of a tiny GPT-2 (tied embeddings) trained as a causal LM on
   "BOS, class token, 64 pixel tokens" sequences.  Everything the Trainer writes
   into each ``checkpoint-N/`` is kept (model.safetensors, config.json,
   generation_config.json, trainer_state.json, optimizer.pt, scheduler.pt,
   rng_state.pth, training_args.bin).

2. ``sample_checkpoints/digits-bert-bf16-sharded/`` -- a tiny BERT sequence
   classifier (pixel tokens -> digit class) trained with a plain PyTorch loop in
   pure bfloat16, saved every 50 steps into ``step_<N>/`` folders with
   ``save_pretrained(max_shard_size=...)`` so each checkpoint is several
   ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
   Step numbers 50..300 make lexical order ("100" < "50") differ from numeric order.

Nothing is downloaded: models are built from config objects, the data ships with
scikit-learn, and HF_HUB_OFFLINE=1 is set.

Usage (see scripts/requirements-samples.txt for the venv):
    /work/devvenv/bin/python scripts/make_sample_checkpoints.py [--only gpt2|bf16]

The script wipes and recreates its output folders.  It is not part of wdiff and
wdiff must never import it.
"""

from __future__ import annotations

import os

# Must be set before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # harmless on CPU
os.environ["PYTHONHASHSEED"] = "0"

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO / "sample_checkpoints"
GPT2_DIR = OUT_ROOT / "digits-gpt2"
BF16_DIR = OUT_ROOT / "digits-bert-bf16-sharded"

N_PIXEL_VALUES = 17  # intensities 0..16 -> token ids 0..16
N_CLASSES = 10
SEED = 0
N_EVAL = 297  # last 297 images held out, first 1500 used for training


def set_determinism(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: CPU reductions then do not depend on the machine's core count.
    torch.set_num_threads(1)


def load_digit_tokens() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    pixels = digits.data.astype(np.int64)  # (1797, 64), values 0..16
    labels = digits.target.astype(np.int64)  # (1797,)
    assert pixels.min() >= 0 and pixels.max() < N_PIXEL_VALUES
    return pixels, labels


def wipe(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# Run 1: Trainer + tiny GPT-2 causal LM
# --------------------------------------------------------------------------

GPT2_CLASS_BASE = N_PIXEL_VALUES  # class tokens 17..26
GPT2_BOS = N_PIXEL_VALUES + N_CLASSES  # 27, also used as EOS id
GPT2_VOCAB = GPT2_BOS + 1  # 28
GPT2_SEQ = 1 + 1 + 64  # BOS, class, 64 pixels


class DigitLMDataset(torch.utils.data.Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        n = len(labels)
        seq = np.empty((n, GPT2_SEQ), dtype=np.int64)
        seq[:, 0] = GPT2_BOS
        seq[:, 1] = GPT2_CLASS_BASE + labels
        seq[:, 2:] = pixels
        self.ids = torch.from_numpy(seq)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.clone()}


def run_gpt2(out_dir: Path) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    set_determinism()
    wipe(out_dir)
    pixels, labels = load_digit_tokens()
    train_ds = DigitLMDataset(pixels[:-N_EVAL], labels[:-N_EVAL])
    eval_ds = DigitLMDataset(pixels[-N_EVAL:], labels[-N_EVAL:])

    config = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=GPT2_SEQ,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_inner=64,  # 2*n_embd instead of the default 4*n_embd: keeps the folder small
        bos_token_id=GPT2_BOS,
        eos_token_id=GPT2_BOS,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)

    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=400,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        warmup_steps=30,
        logging_strategy="steps",
        logging_steps=10,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=50,
        save_strategy="steps",
        save_steps=50,  # -> checkpoint-50 ... checkpoint-400 (8 checkpoints)
        seed=SEED,
        data_seed=SEED,
        full_determinism=True,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
    t0 = time.time()
    trainer.train()
    elapsed = time.time() - t0
    # Trainer.train() calls enable_full_determinism, which resets the thread count etc.
    set_determinism()

    # Keep only checkpoint-N/ folders (drop runs/, logs, anything else).
    for p in out_dir.iterdir():
        if not (p.is_dir() and p.name.startswith("checkpoint-")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    losses = [e for e in trainer.state.log_history if "loss" in e]
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    info = {
        "first_loss": losses[0]["loss"],
        "first_loss_step": losses[0]["step"],
        "last_loss": losses[-1]["loss"],
        "last_loss_step": losses[-1]["step"],
        "first_eval_loss": evals[0]["eval_loss"],
        "last_eval_loss": evals[-1]["eval_loss"],
        "seconds": elapsed,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    print(f"[digits-gpt2] {info}")
    return info


# --------------------------------------------------------------------------
# Run 2: plain PyTorch loop, pure bf16, sharded save_pretrained
# --------------------------------------------------------------------------

BERT_CLS = N_PIXEL_VALUES  # 17
BERT_VOCAB = N_PIXEL_VALUES + 1  # 18
BERT_SEQ = 1 + 64
BF16_SAVE_EVERY = 50
BF16_STEPS = 300  # -> step_50 ... step_300 (6 checkpoints; "step_100" < "step_50" lexically)
BF16_SHARD = "30KB"


def run_bf16(out_dir: Path) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    set_determinism()
    wipe(out_dir)
    pixels, labels = load_digit_tokens()
    ids = np.concatenate([np.full((len(labels), 1), BERT_CLS), pixels], axis=1)
    x_train = torch.from_numpy(ids[:-N_EVAL])
    y_train = torch.from_numpy(labels[:-N_EVAL])
    x_eval = torch.from_numpy(ids[-N_EVAL:])
    y_eval = torch.from_numpy(labels[-N_EVAL:])

    config = BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=BERT_SEQ,
        type_vocab_size=1,
        pad_token_id=0,
        num_labels=N_CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    torch.manual_seed(SEED)
    model = BertForSequenceClassification(config).to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED)
    batch = 64

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=x_eval).logits.float()
        model.train()
        loss = torch.nn.functional.cross_entropy(logits, y_eval).item()
        acc = (logits.argmax(-1) == y_eval).float().mean().item()
        return loss, acc

    history = []
    perm = torch.randperm(len(y_train), generator=gen)
    pos = 0
    t0 = time.time()
    for step in range(1, BF16_STEPS + 1):
        if pos + batch > len(perm):
            perm = torch.randperm(len(y_train), generator=gen)
            pos = 0
        idx = perm[pos : pos + batch]
        pos += batch
        out = model(input_ids=x_train[idx], labels=y_train[idx])
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.float().item())
        if step % BF16_SAVE_EVERY == 0:
            ev_loss, ev_acc = evaluate()
            recent = sum(history[-BF16_SAVE_EVERY:]) / BF16_SAVE_EVERY
            print(
                f"[digits-bf16] step {step:4d} train loss (mean of last {BF16_SAVE_EVERY}) "
                f"{recent:.4f}  eval loss {ev_loss:.4f}  eval acc {ev_acc:.3f}"
            )
            ckpt = out_dir / f"step_{step}"
            model.save_pretrained(ckpt, max_shard_size=BF16_SHARD)
    elapsed = time.time() - t0

    # A small plain-text loss log beside the checkpoints (not inside them).
    (out_dir / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": round(v, 6)}) + "\n" for i, v in enumerate(history))
    )
    info = {
        "first_loss": history[0],
        "last_loss": history[-1],
        "first10_mean": sum(history[:10]) / 10,
        "last10_mean": sum(history[-10:]) / 10,
        "seconds": elapsed,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    print(f"[digits-bf16] {info}")
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["gpt2", "bf16"], help="generate one run only")
    a = ap.parse_args()
    OUT_ROOT.mkdir(exist_ok=True)
    results = {}
    if a.only in (None, "gpt2"):
        results["digits-gpt2"] = run_gpt2(GPT2_DIR)
    if a.only in (None, "bf16"):
        results["digits-bert-bf16-sharded"] = run_bf16(BF16_DIR)
    for name in results:
        d = OUT_ROOT / name
        print(f"{name}: {dir_size(d) / 1e6:.2f} MB in {sum(1 for _ in d.rglob('*') if _.is_file())} files")
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
