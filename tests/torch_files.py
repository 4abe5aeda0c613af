"""Real PyTorch checkpoint runs made at test time with torch alone, and their reference read back by
torch itself (``torch.load(..., weights_only=True)``; torch.distributed.checkpoint: ``dcp_to_torch_save``).

A tiny MLP with BatchNorm (float buffers and an int64 ``num_batches_tracked``, as research models have) is
really trained with AdamW on a fixed synthetic classification task, then saved the way each kind of
code saves it. The layouts that need transformers, peft, Lightning or DeepSpeed are shipped instead
(``tests/data/torch/``, made by ``scripts/make_torch_checkpoints.py``).

Functions for the layouts: ``make_research_run`` (step_N.pt state dicts), ``make_bf16_run``,
``make_legacy_run`` (pre-1.6 format), ``make_wrapped_run`` (ckpt_N.pth = {"model", "optimizer", ...}),
``make_deepspeed_like_run`` (global_stepN/mp_rank_00_model_states.pt, the dict DeepSpeed 0.19 writes),
``make_dcp_run`` and ``make_dcp_fsdp2_run`` (torch.distributed.checkpoint, 1 and 2 processes),
``make_views_run`` (tensors that are views into one storage). References: ``torch_weights``,
``dcp_weights``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SEED = 0
N_IN, N_CLASSES = 20, 5


class TinyMLP(torch.nn.Module):
    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N_IN, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.head = torch.nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.norm(self.inp(x))))


def _task(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic task: x ~ N(0, 1), label = argmax of a random linear teacher."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, N_IN, generator=g)
    return x, (x @ torch.randn(N_IN, N_CLASSES, generator=g)).argmax(1)


@dataclass
class Snapshot:
    step: int
    model: dict[str, torch.Tensor]  # a copy of model.state_dict()
    optimizer: dict  # a copy of opt.state_dict()


def train(
    steps: int, every: int, *, dtype: torch.dtype = torch.float32, at_zero: bool = True, hidden: int = 12
) -> list[Snapshot]:
    """Train TinyMLP (AdamW lr 1e-2, batch 32); snapshots at step 0 (if ``at_zero``) and every ``every``."""
    torch.manual_seed(SEED)
    model = TinyMLP(hidden).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = _task()
    g = torch.Generator().manual_seed(SEED)
    out = []

    def snap(step: int) -> None:
        out.append(Snapshot(step, _clone(model.state_dict()), _clone(opt.state_dict())))

    if at_zero:
        snap(0)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx].to(dtype)).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0:
            snap(step)
    return out


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return (
            type(obj)((k, _clone(v)) for k, v in obj.items())
            if isinstance(obj, OrderedDict)
            else {k: _clone(v) for k, v in obj.items()}
        )
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


# --- the layouts torch writes by itself ---------------------------------------------------------------


def make_research_run(folder: Path, snaps: list[Snapshot]) -> list[Path]:
    """``torch.save(model.state_dict(), f"step_{step}.pt")``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in snaps:
        paths.append(folder / f"step_{s.step}.pt")
        torch.save(s.model, paths[-1])
    return paths


def make_bf16_run(folder: Path, steps: int = 60, every: int = 20) -> list[Path]:
    """The model trained in bfloat16 (``model.to(torch.bfloat16)``), saved like research code."""
    return make_research_run(folder, train(steps, every, dtype=torch.bfloat16))


def make_legacy_run(folder: Path, snaps: list[Snapshot]) -> list[Path]:
    """The pre-1.6 serialization (magic number, several pickles in a row, no zip)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in snaps:
        paths.append(folder / f"step_{s.step}.pt")
        with open(paths[-1], "wb") as f:
            torch.save(s.model, f, _use_new_zipfile_serialization=False)
    return paths


def make_wrapped_run(folder: Path, snaps: list[Snapshot]) -> list[Path]:
    """``ckpt_000050.pth`` = {"model": sd, "optimizer": ..., "step": n, "config": {...}}."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"hidden": 12, "lr": 1e-2, "layers": ["inp", "norm", "head"], "note": "tiny"}
    paths = []
    for s in snaps:
        paths.append(folder / f"ckpt_{s.step:06d}.pth")
        torch.save({"model": s.model, "optimizer": s.optimizer, "step": s.step, "config": config}, paths[-1])
    return paths


def make_deepspeed_like_run(folder: Path, snaps: list[Snapshot]) -> list[Path]:
    """``global_stepN/mp_rank_00_model_states.pt`` holding the dict DeepSpeed 0.19.8 writes for ZeRO 0-2
    (same keys, seen in a real run: tests/data/torch/deepspeed), ZeRO-2's optimizer partition beside it,
    and the ``latest`` file. Written with torch.save: DeepSpeed itself is not a test dependency."""
    paths = []
    for s in snaps:
        step_dir = folder / f"global_step{s.step}"
        step_dir.mkdir(parents=True, exist_ok=True)
        module = OrderedDict(s.model)
        params = OrderedDict(
            (k, v.shape) for k, v in module.items() if "running" not in k and "batches" not in k
        )
        ds_config = {"train_batch_size": 32, "zero_optimization": {"stage": 2}}
        state = {
            "module": module,
            "buffer_names": ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"],
            "optimizer": None,  # ZeRO keeps it in zero_pp_rank_*_optim_states.pt
            "param_shapes": [params],
            "frozen_param_shapes": OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(),
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "skipped_steps": 0,
            "global_steps": s.step,
            "global_samples": 32 * s.step,
            "dp_world_size": 1,
            "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"dp_world_size": 1, "mp_world_size": 1},
            "ds_config": ds_config,
            "ds_version": "0.19.8",
        }
        paths.append(step_dir / "mp_rank_00_model_states.pt")
        torch.save(state, paths[-1])
        flat = torch.cat([v.reshape(-1).float() for k, v in module.items() if k in params])
        optim = {
            "optimizer_state_dict": {
                "zero_stage": 2,
                "loss_scaler": None,
                "dynamic_loss_scale": False,
                "overflow": False,
                "clip_grad": 0.0,
                "base_optimizer_state": {
                    "state": {0: {"step": torch.tensor(float(s.step))}},
                    "param_groups": [],
                },
                "single_partition_of_fp32_groups": [flat],
                "partition_count": [1],
                "ds_version": "0.19.8",
                "param_slice_mappings": [OrderedDict()],
            },
            "ds_config": ds_config,
            "ds_version": "0.19.8",
        }
        torch.save(optim, step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (folder / "latest").write_text(f"global_step{s.step}")
    return paths


def make_dcp_run(folder: Path, snaps: list[Snapshot]) -> list[Path]:
    """One process: ``dcp.save({"model": sd, "optim": opt_sd}, checkpoint_id=folder / f"step-{step}")``."""
    import torch.distributed.checkpoint as dcp

    paths = []
    for s in snaps:
        paths.append(folder / f"step-{s.step}")
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": s.model, "optim": s.optimizer}, checkpoint_id=paths[-1])
    return paths


def _fsdp2_worker(rank: int, world: int, folder: str, store: str, steps: int, every: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(SEED)
    model = TinyMLP(hidden=7)  # 7 rows over 2 ranks: uneven shards (4 + 3), head (5, 7): 3 + 2
    for layer in (model.inp, model.head):
        fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _task()
    g = torch.Generator().manual_seed(SEED)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (32,), generator=g)[rank::world]  # data parallel halves
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{folder}/step-{step}")
    dist.destroy_process_group()


def make_dcp_fsdp2_run(folder: Path, steps: int = 30, every: int = 10) -> list[Path]:
    """Two gloo processes, FSDP2 ``fully_shard``: every parameter Shard(0) over the ranks, so each
    checkpoint is ``.metadata`` + ``__0_0.distcp`` + ``__1_0.distcp`` with a tensor's rows split."""
    import torch.multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp2_worker, args=(2, str(folder), f"{tmp}/store", steps, every), nprocs=2)
    return [folder / f"step-{s}" for s in range(every, steps + 1, every)]


def make_views_run(folder: Path, count: int = 3) -> tuple[list[Path], list[dict[str, np.ndarray]]]:
    """State dicts whose tensors are views into one storage at offsets (a fused q/k/v split after
    training, an embedding and a slice of it): torch.save writes the storage once, each tensor as
    (storage, offset, size, stride). Returns the files and the float64 values saved."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    fused = torch.randn(3 * 6, 4, generator=g)
    paths, values = [], []
    for t in range(count):
        fused = fused + 0.1 * torch.randn(fused.shape, generator=g)
        q, k, v = fused.split(6)  # offsets 0, 24, 48 elements into one storage
        sd = {"attn.q.weight": q, "attn.k.weight": k, "attn.v.weight": v, "attn.k.row": fused[7]}
        paths.append(folder / f"step_{t * 10}.pt")
        torch.save(sd, paths[-1])
        values.append({n: x.double().numpy().copy() for n, x in sd.items()})
    return paths, values


# --- the reference, read by torch ----------------------------------------------------------------------


def torch_weights(path: Path, key: str | None = None) -> dict[str, np.ndarray]:
    """The floating-point tensors of one checkpoint file (``obj[key]`` if given) as float64 numpy,
    read by ``torch.load(weights_only=True)`` (Lightning hparams may hold an argparse.Namespace)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True, map_location="cpu")
    return _floats(obj[key] if key else obj)


def dcp_weights(folder: Path, key: str = "model") -> dict[str, np.ndarray]:
    """A torch.distributed.checkpoint folder, through torch's own ``dcp_to_torch_save``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "whole.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp_to_torch_save(folder, target)
        return _floats(torch.load(target, weights_only=True)[key])


def _floats(sd: dict) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}
