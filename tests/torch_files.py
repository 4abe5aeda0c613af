"""Make real PyTorch checkpoints for tests with torch itself, and read them back with torch's own loader.

torch is a test-only dependency (pyproject dev extras): wdiff never imports it. Arrays cross the
boundary bit for bit (bf16 and fp8 through integer views), so a test compares what wdiff assembles
with what torch loads, exactly.

torch.distributed.checkpoint (DCP):
- ``save_dcp`` writes one folder from a single process (``dcp.save`` without a process group);
- ``save_dcp_sharded`` writes folders from 2 processes (gloo on CPU), each tensor a DTensor sharded
  along a chosen dim, so a tensor has one chunk per rank in ``__0_0.distcp`` and ``__1_0.distcp``;
  one spawn writes every folder given (a run of several steps costs one process start);
- ``load_dcp`` reads a folder with ``dcp.load`` into preallocated tensors;
- ``read_ref`` reads what a wdiff reader located (one byte range, or pieces) as a numpy array.

Real training runs in every PyTorch layout, with their reference read back by
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from wdiff.readers.base import DTYPES, PiecesRef, TensorRef

# numpy/ml_dtypes type -> (torch dtype, integer view of the same width, used to cross bit for bit)
_TORCH = {
    np.dtype(np.float64): (torch.float64, None),
    np.dtype(np.float32): (torch.float32, None),
    np.dtype(np.float16): (torch.float16, None),
    np.dtype(ml_dtypes.bfloat16): (torch.bfloat16, np.int16),
    np.dtype(ml_dtypes.float8_e4m3fn): (torch.float8_e4m3fn, np.uint8),
    np.dtype(ml_dtypes.float8_e5m2): (torch.float8_e5m2, np.uint8),
    np.dtype(np.int64): (torch.int64, None),
    np.dtype(np.int32): (torch.int32, None),
    np.dtype(np.uint8): (torch.uint8, None),
    np.dtype(np.bool_): (torch.bool, None),
    np.dtype(np.complex64): (torch.complex64, None),
    np.dtype(np.complex128): (torch.complex128, None),
}
_NUMPY = {t: (d, view) for d, (t, view) in _TORCH.items()}
_VIEW = {np.int16: torch.int16, np.uint8: torch.uint8}


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A torch tensor with the same dtype, shape and bits as ``a`` (a copy: torch owns its memory)."""
    a = np.array(a, order="C")
    dtype, view = _TORCH[a.dtype]
    if view is None:
        return torch.from_numpy(a.copy())
    return torch.from_numpy(a.view(view).copy()).view(dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The numpy/ml_dtypes array with ``t``'s dtype, shape and bits."""
    t = t.detach().cpu().contiguous()
    dtype, view = _NUMPY[t.dtype]
    if view is None:
        return t.numpy().copy()
    return t.view(_VIEW[view]).numpy().view(dtype).copy()


def save_dcp_state(folder: str | Path, state_dict: dict) -> Path:
    """``dcp.save`` of any state dict (modules' and optimizers' state dicts, plain values) from a single
    process."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state_dict, checkpoint_id=str(folder))
    return Path(folder)


def save_dcp(
    folder: str | Path,
    tensors: Mapping[str, np.ndarray],
    *,
    key: str | None = "model",
    extra: Mapping[str, object] | None = None,
) -> Path:
    """One DCP folder written by a single process: ``{key: tensors, **extra}`` (``key=None``: the
    tensors at the top level, as torchtitan saves a model). ``extra`` may hold torch objects
    (optimizer state, ``io.BytesIO``) and plain Python values."""
    folder = Path(folder)
    model = {name: to_torch(a) for name, a in tensors.items()}
    state: dict = dict(model) if key is None else {key: model}
    state.update(extra or {})
    return save_dcp_state(folder, state)


def _fsdp2_save(folder: str, mesh: object) -> None:
    """A tiny model wrapped with FSDP2 (``fully_shard`` per layer and at the root), one AdamW step, then
    ``{"model", "optim"}`` from ``get_state_dict``, as training scripts save them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same initial weights on every rank, as after a broadcast
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 16), torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 5)
    )
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)


def _sharded_worker(
    rank: int, world: int, store: str, jobs: list, shard_dims: dict, key: str | None, fsdp2: list
) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    # A file store for the rendezvous: no port to pick, so no race with other test runs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for folder, tensors in jobs:
            model = {}
            for name, a in tensors.items():
                dim = shard_dims.get(name, 0)
                placement = Replicate() if dim is None or a.ndim == 0 else Shard(dim)
                # every rank holds the full array: each takes its shard locally (src_data_rank=None),
                # no scatter (gloo cannot send fp8)
                model[name] = distribute_tensor(to_torch(a), mesh, [placement], src_data_rank=None)
            dcp.save(model if key is None else {key: model}, checkpoint_id=folder)
        for folder in fsdp2:
            _fsdp2_save(folder, mesh)
        # Both ranks done before teardown: tearing gloo down while the peer still talks aborts the
        # process ("terminate called without an active exception") about every other run.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_dcp_sharded(
    checkpoints: Mapping[str | Path, Mapping[str, np.ndarray]],
    *,
    shard_dims: Mapping[str, int | None] | None = None,
    key: str | None = "model",
    world: int = 2,
    fsdp2: tuple[str | Path, ...] = (),
) -> list[Path]:
    """DCP folders written by ``world`` processes (gloo on CPU), as FSDP2 / torchtitan write them: every
    tensor a DTensor with ``Shard(shard_dims.get(name, 0))`` (``None``: replicated, written once),
    so each has one chunk per rank, in that rank's ``__R_0.distcp``. One spawn writes every folder,
    and also, into each of ``fsdp2``, a tiny model trained one step under FSDP2 ``fully_shard`` with
    its AdamW state (``{"model": ..., "optim": ...}``)."""
    import torch.multiprocessing as mp

    jobs = [
        (str(folder), {n: np.array(a) for n, a in tensors.items()}) for folder, tensors in checkpoints.items()
    ]
    extra = [str(folder) for folder in fsdp2]
    outputs = [Path(folder) for folder, _ in jobs] + [Path(folder) for folder in extra]

    def once(tmp: str) -> None:
        args = (world, os.path.join(tmp, "store"), jobs, dict(shard_dims or {}), key, extra)
        mp.spawn(_sharded_worker, args=args, nprocs=world)

    spawn_writers(once, outputs)
    return outputs


def spawn_writers(once, outputs: list[Path], attempts: int = 3) -> None:
    """Run ``once(tmp)`` (an ``mp.spawn`` of gloo writers) until it succeeds, at most ``attempts``
    times, each in a fresh rendezvous folder and with the outputs removed first.

    gloo can abort a process in its teardown on a loaded machine ("terminate called without an active
    exception", SIGABRT) after both ranks wrote everything and met at a barrier; that is the test
    harness's process group, not what is tested, so a spawn that dies that way is run again whole."""
    import shutil

    from torch.multiprocessing.spawn import ProcessExitedException

    for attempt in range(attempts):
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                once(tmp)
                return
            except ProcessExitedException:
                if attempt == attempts - 1:
                    raise


def load_dcp(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a DCP folder, by flattened name, as torch's own reader loads it (``dcp.load``
    into tensors preallocated from the folder's metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    state = {
        fqn: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder))
    return {fqn: to_numpy(t) for fqn, t in state.items()}


def read_ref(ref: TensorRef) -> np.ndarray:
    """The tensor a ``TensorRef``/``PiecesRef`` locates, read from its byte range(s) and decoded."""
    kind = DTYPES[ref.dtype]
    width = kind.bits // 8
    ranges = [(p.path, p.offset, p.count * width) for p in ref.pieces] if isinstance(ref, PiecesRef) else []
    ranges = ranges or [(ref.path, ref.offset, ref.nbytes)]
    data = bytearray()
    for path, offset, n in ranges:
        with open(path, "rb") as f:
            f.seek(offset)
            data += f.read(n)
    assert len(data) == ref.numel * width, f"{ref.name}: {len(data)} bytes for {ref.numel} elements"
    return (
        np.frombuffer(bytes(data), dtype=kind.storage).view(kind.decoded or kind.storage).reshape(ref.shape)
    )


# --- real training runs in every PyTorch layout ---------------------------------------------------------

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
    dist.barrier()  # both ranks done before teardown (see _sharded_worker)
    dist.destroy_process_group()


def make_dcp_fsdp2_run(folder: Path, steps: int = 30, every: int = 10) -> list[Path]:
    """Two gloo processes, FSDP2 ``fully_shard``: every parameter Shard(0) over the ranks, so each
    checkpoint is ``.metadata`` + ``__0_0.distcp`` + ``__1_0.distcp`` with a tensor's rows split."""
    import torch.multiprocessing as mp

    outputs = [folder / f"step-{s}" for s in range(every, steps + 1, every)]

    def once(tmp: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        mp.spawn(_fsdp2_worker, args=(2, str(folder), f"{tmp}/store", steps, every), nprocs=2)

    spawn_writers(once, outputs)
    return outputs


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
