#!/usr/bin/env python3
"""Generate real PyTorch-pickle checkpoint runs, one per layout wdiff must read (dev-only).

Small, deterministic, REAL training runs on scikit-learn's bundled ``load_digits()`` (the data of the
other sample scripts), each saved the way its library saves, 3-4 checkpoints per run, a few KB to a few
hundred KB per checkpoint. Into ``OUT/<layout>/``:

  research      step_0.pt, step_50.pt, ...: ``torch.save(model.state_dict())`` (plain research code)
  wrapped       ckpt_000050.pth, ...: ``torch.save({"model": sd, "optimizer": ..., "step": n, "config"})``
  hf-bin        HF Trainer, ``save_safetensors=False``: checkpoint-N/pytorch_model.bin (+ optimizer.pt,
                scheduler.pt, rng_state.pth, training_args.bin, trainer_state.json, config.json)
  hf-sharded    the same with ``max_shard_size`` small: pytorch_model-0000i-of-00002.bin + index
  peft-bin      PEFT LoRA under the HF Trainer, ``save_safetensors=False``: checkpoint-N/adapter_model.bin
  lightning     Lightning ``ModelCheckpoint(every_n_train_steps, save_top_k=-1, save_last=True)``:
                lightning_logs/version_0/checkpoints/epoch=E-step=S.ckpt + last.ckpt
  lightning-dirpath   the same with ``dirpath=`` set: ckpts/epoch=E-step=S.ckpt + last.ckpt
  deepspeed     DeepSpeed ZeRO-2 ``engine.save_checkpoint``: global_stepN/mp_rank_00_model_states.pt +
                zero_pp_rank_0_mp_rank_00_optim_states.pt, ``latest``, zero_to_fp32.py, zero_to_torch.py
  dcp           torch.distributed.checkpoint, one process: step-N/.metadata + __0_0.distcp
  dcp-fsdp2     the same from 2 gloo processes with FSDP2 (``fully_shard``, Shard(0)): __0_0/__1_0.distcp
  legacy        ``torch.save(sd, f, _use_new_zipfile_serialization=False)`` (the pre-1.6 format)
  research-bf16 like research, the model trained in bfloat16 (``model.to(torch.bfloat16)``)

Why transformers 4.x: transformers 5 removed ``save_safetensors``/``safe_serialization`` (Trainer and
``save_pretrained`` write only safetensors), so the ``pytorch_model.bin`` files found in the wild were all
written by 4.x. The hf-bin, hf-sharded and peft-bin runs are therefore made by the real transformers
4.57.6 Trainer (the last 4.x), in a venv of their own: see scripts/requirements-torch-formats.txt.

    /work/devvenv-torch/bin/python scripts/make_torch_checkpoints.py /tmp/torch-runs          # all, ~1 min
    /work/devvenv-torch/bin/python scripts/make_torch_checkpoints.py /tmp/torch-runs --only lightning,dcp
    /work/devvenv-torch/bin/python scripts/make_torch_checkpoints.py /tmp/torch-runs --install

``--install`` also copies the research run to sample_checkpoints/digits-mlp-pt/ and the runs that need
transformers/peft/Lightning/DeepSpeed into tests/data/torch/. At the end the script prints, per run,
the accumulated L1 ``sum_t sum |W(t+1) - W(t)|`` over its float weights, computed with
``torch.load(..., weights_only=True)`` in float64 (DCP: torch's own ``dcp_to_torch_save``).
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse
import functools
import json
import math
import re
import shutil
import tempfile
import time
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
    REPO,
    SEED,
    DigitLMDataset,
    dir_size,
    load_digit_tokens,
    set_determinism,
    wipe,
)

SAMPLE_DIR = REPO / "sample_checkpoints" / "digits-mlp-pt"
TESTS_DATA = REPO / "tests" / "data" / "torch"
TESTS_LAYOUTS = ("hf-bin", "hf-sharded", "peft-bin", "lightning", "lightning-dirpath", "deepspeed")

# The LoRA settings of sample_checkpoints/digits-gpt2-lora: Conv1D layers, so fan_in_fan_out; one module
# with its own rank and alpha.
LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["c_attn", "c_fc"],
    "fan_in_fan_out": True,
    "lora_dropout": 0.0,
    "rank_pattern": {"transformer.h.1.mlp.c_fc": 2},
    "alpha_pattern": {"transformer.h.1.mlp.c_fc": 6},
}


# --------------------------------------------------------------------------------------------------
# data and the small models


class DigitMLP(torch.nn.Module):
    """8x8 digit (64 pixels / 16) -> Linear -> BatchNorm -> GELU -> Linear -> GELU -> Linear(10).

    BatchNorm gives buffers (running_mean, running_var: float; num_batches_tracked: an int64 scalar),
    as real research models have."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(64, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = torch.nn.functional.gelu
        return self.head(gelu(self.mid(gelu(self.norm(self.inp(x))))))


def digit_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = load_digit_tokens()
    x = torch.from_numpy(pixels[:-N_EVAL]).float() / 16.0
    return x, torch.from_numpy(labels[:-N_EVAL])


def digit_batches(batch: int = 64):
    x, y = digit_tensors()
    g = torch.Generator().manual_seed(SEED)
    while True:
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i : i + batch]
            yield x[idx], y[idx]


def train_mlp(steps: int, every: int, save, *, hidden: int = 32, dtype=torch.float32, at_zero: bool = True):
    """Train a DigitMLP with AdamW (lr 3e-3, wd 0.01, batch 64); ``save(step, model, opt, sched)`` at
    step 0 (the untrained model, if ``at_zero``) and every ``every`` steps. Returns the losses."""
    set_determinism()
    model = DigitMLP(hidden).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # warmup
    batches = digit_batches()
    losses = []
    if at_zero:
        save(0, model, opt, sched)
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % every == 0:
            save(step, model, opt, sched)
    return losses


def _cpu_copy(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# layouts torch writes by itself


def run_research(out: Path, hidden: int = 64) -> dict:
    """step_0.pt, step_50.pt .. step_150.pt (``step_100`` sorts before ``step_50`` as text):
    ``torch.save(model.state_dict(), f)``."""
    wipe(out)
    losses = train_mlp(
        150, 50, lambda s, m, o, sch: torch.save(m.state_dict(), out / f"step_{s}.pt"), hidden=hidden
    )
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def run_bf16(out: Path) -> dict:
    """Like research, the whole model in bfloat16 (weights, gradients and AdamW state)."""
    wipe(out)
    losses = train_mlp(
        300, 100, lambda s, m, o, sch: torch.save(m.state_dict(), out / f"step_{s}.pt"), dtype=torch.bfloat16
    )
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def run_legacy(out: Path) -> dict:
    """The pre-1.6 format: several pickles in a row, no zip."""
    wipe(out)

    def save(step, model, opt, sched):
        with open(out / f"step_{step}.pt", "wb") as f:
            torch.save(model.state_dict(), f, _use_new_zipfile_serialization=False)

    losses = train_mlp(200, 100, save)
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def run_wrapped(out: Path) -> dict:
    """ckpt_000050.pth ..: the dict research code saves to resume training."""
    wipe(out)
    config = {"hidden": 32, "lr": 3e-3, "weight_decay": 0.01, "batch_size": 64, "data": "sklearn digits"}

    def save(step, model, opt, sched):
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
            "step": step,
            "config": config,
        }
        torch.save(state, out / f"ckpt_{step:06d}.pth")

    losses = train_mlp(200, 50, save, at_zero=False)
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def run_dcp(out: Path) -> dict:
    """``dcp.save({"model": sd, "optim": opt.state_dict()}, checkpoint_id=out/step-N)`` in one process."""
    import torch.distributed.checkpoint as dcp

    wipe(out)

    def save(step, model, opt, sched):
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                {"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=out / f"step-{step}"
            )

    losses = train_mlp(150, 50, save, at_zero=False)
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def _fsdp2_worker(rank: int, world: int, out: str, store: str, steps: int, every: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    set_determinism()
    mesh = init_device_mesh("cpu", (world,))
    model = DigitMLP(30)  # 30 rows: Linear(64, 30) shards 15 + 15, head (10, 30) 5 + 5, biases too
    for layer in (model.inp, model.mid, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    x, y = digit_tensors()
    g = torch.Generator().manual_seed(SEED)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (64,), generator=g)  # the same global batch on both ranks ...
        mine = idx[rank::world]  # ... each rank trains on its half (data parallel)
        loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out}/step-{step}")
    dist.destroy_process_group()


def run_dcp_fsdp2(out: Path) -> dict:
    """2 processes on gloo, FSDP2 ``fully_shard`` (each parameter Shard(0) over the 2 ranks)."""
    import torch.multiprocessing as mp

    wipe(out)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp2_worker, args=(2, str(out), f"{tmp}/store", 150, 50), nprocs=2)
    return {}


# --------------------------------------------------------------------------------------------------
# HF Trainer (transformers 4.x), PEFT


def _tiny_gpt2(n_embd: int = 16, n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=GPT2_SEQ, n_embd=n_embd, n_layer=n_layer, n_head=4,
        n_inner=2 * n_embd, bos_token_id=GPT2_BOS, eos_token_id=GPT2_BOS, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(config)


def _trainer_args(out: Path, **kw):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out), max_steps=150, per_device_train_batch_size=32, learning_rate=3e-3,
        weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=15, logging_steps=10,
        logging_first_step=True, save_strategy="steps", save_steps=50, save_safetensors=False,
        seed=SEED, data_seed=SEED, full_determinism=True, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    settings.update(kw)
    return TrainingArguments(**settings)


def _train_hf(out: Path, model, **kw) -> dict:
    from transformers import Trainer

    set_determinism()
    wipe(out)
    pixels, labels = load_digit_tokens()
    trainer = Trainer(
        model=model,
        args=_trainer_args(out, **kw),
        train_dataset=DigitLMDataset(pixels[:-N_EVAL], labels[:-N_EVAL]),
    )
    trainer.train()
    set_determinism()  # Trainer.train() calls enable_full_determinism, which changes the thread count
    for p in out.iterdir():  # keep the checkpoint-N/ folders, exactly as written
        if not (p.is_dir() and p.name.startswith("checkpoint-")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def _need_transformers_4() -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(
            f"transformers {transformers.__version__} cannot write pytorch_model.bin (v5 removed "
            "save_safetensors/safe_serialization); run this layout with transformers 4.57.6, "
            "see scripts/requirements-torch-formats.txt"
        )


def run_hf_bin(out: Path) -> dict:
    """The HF Trainer with save_safetensors=False: checkpoint-N/pytorch_model.bin and what goes with it."""
    _need_transformers_4()
    return _train_hf(out, _tiny_gpt2())


def run_hf_sharded(out: Path) -> dict:
    """As hf-bin, with the Trainer's save_pretrained call given a small max_shard_size (the Trainer has
    no option for it; a real model shards at the default 5GB): 2 shards + pytorch_model.bin.index.json."""
    _need_transformers_4()
    model = _tiny_gpt2()
    model.save_pretrained = functools.partial(model.save_pretrained, max_shard_size="20KB")
    return _train_hf(out, model)


def run_peft_bin(out: Path) -> dict:
    """PEFT LoRA under the HF Trainer with save_safetensors=False: checkpoint-N/adapter_model.bin."""
    from peft import LoraConfig, get_peft_model

    _need_transformers_4()
    model = get_peft_model(_tiny_gpt2(n_embd=32), LoraConfig(task_type="CAUSAL_LM", **LORA))
    info = _train_hf(out, model, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0)
    _check_peft_delta(model, out)
    return info


def _check_peft_delta(model, out: Path) -> None:
    """peft's own ``get_delta_weight`` of the last checkpoint equals ``B @ A * alpha / r`` (transposed:
    fan_in_fan_out) computed from adapter_model.bin and adapter_config.json: the formula the tests use."""
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    saved = torch.load(last / "adapter_model.bin", weights_only=True)
    config = json.loads((last / "adapter_config.json").read_text())
    for name, module in model.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        key = name.removeprefix("base_model.model.")
        a = saved[f"base_model.model.{key}.lora_A.weight"].double()
        b = saved[f"base_model.model.{key}.lora_B.weight"].double()
        r = config["rank_pattern"].get(key, config["r"])
        alpha = config["alpha_pattern"].get(key, config["lora_alpha"])
        mine = (b @ a).T * (alpha / r)
        theirs = module.get_delta_weight("default").double()
        if not torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7):
            raise SystemExit(f"peft get_delta_weight of {key} differs from B @ A * alpha / r")
    print(f"[peft-bin] peft get_delta_weight == (B @ A).T * alpha / r for every module of {last.name}")


# --------------------------------------------------------------------------------------------------
# Lightning


def _lightning_module():
    import lightning as L

    class DigitsLit(L.LightningModule):
        """``save_hyperparameters()`` stores an argparse.Namespace, a dict and plain values in every
        checkpoint (hyper_parameters) and in hparams.yaml."""

        def __init__(self, args: argparse.Namespace, optim: dict, hidden: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = DigitMLP(hidden)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), **self.hparams.optim)

    return DigitsLit


def run_lightning(out: Path, dirpath: str | None = None) -> dict:
    """Lightning 2.x: ModelCheckpoint every 20 steps, all kept, plus last.ckpt (a full copy of the newest)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    set_determinism()
    wipe(out)
    L.seed_everything(SEED, verbose=False)
    x, y = digit_tensors()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )  # fmt: skip
    kw = {"dirpath": out / dirpath} if dirpath else {}
    checkpoints = ModelCheckpoint(every_n_train_steps=20, save_top_k=-1, save_last=True, **kw)
    trainer = L.Trainer(
        max_steps=60, callbacks=[checkpoints], default_root_dir=out, accelerator="cpu", deterministic=True,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
    )  # fmt: skip
    module = _lightning_module()(
        argparse.Namespace(data="sklearn digits", batch_size=64, seed=SEED),
        {"lr": 3e-3, "weight_decay": 0.01},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return {"global_step": trainer.global_step}


# --------------------------------------------------------------------------------------------------
# DeepSpeed


def run_deepspeed(out: Path) -> dict:
    """Real DeepSpeed (CPU accelerator, gloo, one process), ZeRO stage 2: ``engine.save_checkpoint(out)``
    every 50 steps writes global_stepN/ (model states + ZeRO optimizer partition) and ``latest``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import torch.distributed as dist

    set_determinism()
    # Deterministic mode fills every torch.empty with NaN, and ZeRO allocates buckets of 5e8 elements
    # each step: 1 s a step. The buckets are made small below; their initial contents are never read.
    torch.utils.deterministic.fill_uninitialized_memory = False
    wipe(out)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = DigitMLP(32)
    config = {
        "train_batch_size": 64,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1 << 16, "allgather_bucket_size": 1 << 16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batches = digit_batches()
    losses = []
    for step in range(1, 151):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if step % 50 == 0:
            engine.save_checkpoint(str(out))
    dist.destroy_process_group()
    return {"first_loss": losses[0], "last_loss": losses[-1]}


# --------------------------------------------------------------------------------------------------
# the independent check: accumulated L1 with torch.load


def _ordered_files(folder: Path, layout: str) -> tuple[list[Path], str | None]:
    """The weight files of a run in step order, and the key that holds the weights."""

    def step_of(p: Path) -> int:
        return int(re.findall(r"\d+", p.name)[-1])

    if layout in ("research", "research-bf16", "legacy"):
        return sorted(folder.glob("step_*.pt"), key=step_of), None
    if layout == "wrapped":
        return sorted(folder.glob("ckpt_*.pth"), key=step_of), "model"
    if layout in ("hf-bin", "hf-sharded", "peft-bin"):
        name = {"hf-bin": "pytorch_model.bin", "peft-bin": "adapter_model.bin"}.get(layout, "*.bin")
        folders = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return [f for c in folders for f in sorted(c.glob(name)) if f.name != "training_args.bin"], None
    if layout.startswith("lightning"):
        files = [p for p in folder.rglob("*.ckpt") if p.name != "last.ckpt"]
        return sorted(files, key=lambda p: int(p.stem.split("step=")[1])), "state_dict"
    if layout == "deepspeed":
        return sorted(
            folder.glob("global_step*/mp_rank_00_model_states.pt"), key=lambda p: step_of(p.parent)
        ), "module"
    return sorted(folder.glob("step-*"), key=step_of), "model"  # dcp


def load_weights(path: Path, key: str | None) -> dict[str, np.ndarray]:
    """Float tensors of one checkpoint as float64 numpy, read by torch itself."""
    if path.is_dir():  # torch.distributed.checkpoint folder: torch's own converter, then torch.load
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, f"{tmp}/all.pt")
            obj = torch.load(f"{tmp}/all.pt", weights_only=True)
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):  # Lightning hparams
            obj = torch.load(path, weights_only=True, map_location="cpu")
    sd = obj[key] if key else obj
    return {k: v.double().numpy() for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}


def accumulated_l1(folder: Path, layout: str) -> tuple[int, float]:
    files, key = _ordered_files(folder, layout)
    if layout == "hf-sharded":  # several shards per checkpoint: merge them per folder
        by_ckpt: dict[Path, dict] = {}
        for f in files:
            by_ckpt.setdefault(f.parent, {}).update(load_weights(f, None))
        weights = list(by_ckpt.values())
    else:
        weights = [load_weights(f, key) for f in files]
    total = 0.0
    for a, b in zip(weights, weights[1:]):
        total += sum(float(np.abs(b[k] - a[k]).sum()) for k in a)
    return len(weights), total


# --------------------------------------------------------------------------------------------------

RUNS = {
    "research": run_research,
    "wrapped": run_wrapped,
    "hf-bin": run_hf_bin,
    "hf-sharded": run_hf_sharded,
    "peft-bin": run_peft_bin,
    "lightning": run_lightning,
    "lightning-dirpath": functools.partial(run_lightning, dirpath="ckpts"),
    "deepspeed": run_deepspeed,
    "dcp": run_dcp,
    "dcp-fsdp2": run_dcp_fsdp2,
    "legacy": run_legacy,
    "research-bf16": run_bf16,
}


def _install(root: Path, names: list[str]) -> None:
    if "research" in names:
        wipe(SAMPLE_DIR)
        for f in sorted((root / "research").iterdir()):
            shutil.copy2(f, SAMPLE_DIR / f.name)
        print(f"installed {SAMPLE_DIR} ({dir_size(SAMPLE_DIR) / 1e3:.0f} KB)")
    for name in names:
        if name in TESTS_LAYOUTS:
            target = TESTS_DATA / name
            shutil.rmtree(target, ignore_errors=True)
            # DeepSpeed copies its recovery scripts (zero_to_fp32.py, zero_to_torch.py) into every run
            # folder: left out of tests/data, where ruff would lint them as the project's code.
            shutil.copytree(root / name, target, ignore=shutil.ignore_patterns("*.py"))
            print(f"installed {target} ({dir_size(target) / 1e3:.0f} KB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the runs into (one sub-folder per layout)")
    parser.add_argument("--only", help=f"comma-separated layouts out of: {', '.join(RUNS)}")
    parser.add_argument(
        "--install", action="store_true",
        help="also copy the research run to sample_checkpoints/digits-mlp-pt/ and the runs that need "
        "transformers/peft/Lightning/DeepSpeed to tests/data/torch/",
    )  # fmt: skip
    args = parser.parse_args()
    names = list(RUNS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.out.resolve() == REPO or REPO in args.out.resolve().parents:
        parser.error("write the runs outside the repository (use --install to copy them in)")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in names:
        t0 = time.perf_counter()
        info = RUNS[name](args.out / name)
        count, l1 = accumulated_l1(args.out / name, name)
        report[name] = {
            **info,
            "checkpoints": count,
            "accumulated_l1": l1,
            "kb": math.ceil(dir_size(args.out / name) / 1e3),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"[{name}] {json.dumps(report[name])}", flush=True)
    if args.install:
        _install(args.out, names)
    print("\nlayout               checkpoints  accumulated L1 (torch.load, float64)   size")
    for name, r in report.items():
        print(f"{name:20s} {r['checkpoints']:11d}  {r['accumulated_l1']:38.6f}   {r['kb']} KB")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
