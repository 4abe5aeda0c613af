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
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
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
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        args = (world, store, jobs, dict(shard_dims or {}), key, extra)
        mp.spawn(_sharded_worker, args=args, nprocs=world)
    return [Path(folder) for folder, _ in jobs] + [Path(folder) for folder in extra]


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
