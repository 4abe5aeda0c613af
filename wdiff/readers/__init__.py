"""Find the weights of one checkpoint (a file or a folder) and list its tensors: the one way in.

Each format is one module that says whether it can open a path and lists the tensors there (name,
shape, dtype, where the bytes are); nothing here reads tensor data. A file is recognised by its first
bytes, never by its suffix alone: safetensors, ONNX, PyTorch's ``torch.save`` zip (read by a restricted
unpickler that never runs pickle code, ``readers.torch``) and the legacy ``torch.save`` format (refused
in one line). A folder is a checkpoint when it holds one model's weights: a shard index (safetensors or
``pytorch_model.bin.index.json``), ``model.safetensors``, one ``*.safetensors``, an accelerate
``save_state`` with several models, one ONNX model, a torch.distributed.checkpoint (``.metadata`` +
``*.distcp``), DeepSpeed's ``mp_rank_00_model_states.pt``, ``pytorch_model.bin``/``adapter_model.bin``,
or one other PyTorch file that is not optimizer, scheduler or RNG state.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from wdiff.errors import WdiffError
from wdiff.naming import step_of
from wdiff.readers.base import DTYPES, Contents, DType, Skipped, TensorRef, first_bytes
from wdiff.readers.dcp import looks_like_dcp, read_dcp
from wdiff.readers.layouts import accelerate_models, read_accelerate
from wdiff.readers.onnx import looks_like_onnx, read_onnx
from wdiff.readers.remote import location
from wdiff.readers.safetensors import INDEX_NAME, looks_like_safetensors, read_header, read_sharded
from wdiff.readers.torch import looks_like_legacy_torch, looks_like_torch_zip, read_torch

__all__ = [
    "DTYPES",
    "Contents",
    "DType",
    "TensorRef",
    "find_weights",
    "has_weights",
    "is_checkpoint_file",
    "looks_like_onnx",
    "looks_like_safetensors",
    "open_checkpoint",
    "read_checkpoint",
]

BIN_INDEX = "pytorch_model.bin.index.json"
LEGACY_HINT = (
    "is in the legacy (pre-1.6) torch.save format, which wdiff does not read; convert it once with a "
    "torch that reads it: torch.save(torch.load('IN', weights_only=True), 'OUT.pt')"
)
RAW_PICKLE = (
    "is a raw pickle, not a torch.save file: wdiff never unpickles arbitrary objects (loading one can run "
    "code); save the state dict with torch.save or safetensors"
)
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.(safetensors|bin)$")
# PyTorch files beside the weights that are not weights (HF Trainer, accelerate, DeepSpeed, Lightning).
_NOT_WEIGHTS = re.compile(
    r"^(optimizer|scheduler|scaler|lr_scheduler|training_args|trainer_state|rng_state|random_states"
    r"|zero_pp_rank_|bf16_zero_pp_rank_|.*optim_states|custom_checkpoint_)",
    re.IGNORECASE,
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_TORCH_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin", "mp_rank_00_model_states.pt", "model.bin")


def missing(path: Path) -> str:
    """Why a path given as a checkpoint does not exist, in words."""
    if path.is_symlink():
        return "symlink to nothing: its target is missing or it is a symlink loop"
    return "no such file or folder"


def is_torch_file(path: Path) -> bool:
    """A PyTorch file (zip or legacy) whose name does not say it is optimizer, scheduler or RNG state."""
    return (
        path.is_file()
        and _NOT_WEIGHTS.match(path.name) is None
        and (looks_like_torch_zip(path) or looks_like_legacy_torch(path))
    )


def is_checkpoint_file(path: Path) -> bool:
    """A single file that holds one checkpoint's weights, recognised by its bytes."""
    if not path.is_file():
        return False
    return looks_like_safetensors(path) or looks_like_onnx(path) or is_torch_file(path)


def _only(folder: Path, found: list[Path], several: str) -> Path | None:
    """The one file of ``found``; None if none; an error naming them (``several``) if more.
    A lone shard of several (``-00001-of-00003``) is an incomplete checkpoint: its index is written
    after the shards (docs/formats.md)."""
    if len(found) > 1:
        names = ", ".join(p.name for p in sorted(found)[:4])
        raise WdiffError(folder, f"{several}: {names}")
    if not found:
        return None
    shard = _SHARD_NAME.search(found[0].name)
    if shard and int(shard.group(2)) > 1:
        raise WdiffError(
            found[0], f"shard {int(shard.group(1))} of {int(shard.group(2))} and no index yet: incomplete"
        )
    return found[0]


def _files(folder: Path, pattern: str) -> list[Path]:
    return [p for p in folder.glob(pattern) if p.is_file()]


def find_weights(folder: Path) -> Path | None:
    """The weights entry point of a checkpoint folder (see the module docstring), the folder itself
    for an accelerate ``save_state`` with several models and a torch.distributed.checkpoint; None when
    the folder holds no checkpoint."""
    # Fixed names are taken when anything is there: a pipe named model.safetensors is then refused as
    # "not a regular file" when opened, not passed over.
    for name in (INDEX_NAME, BIN_INDEX):
        if (folder / name).exists():
            return folder / name
    if len(accelerate_models(folder)) > 1:
        return folder
    if (folder / "model.safetensors").exists():
        return folder / "model.safetensors"
    found = (
        _only(
            folder,
            _files(folder, "*.safetensors.index*.json"),
            "several shard indexes in one checkpoint folder",
        )
        or _only(
            folder,
            _files(folder, "*.safetensors"),
            "several weight files and no model.safetensors(.index.json)",
        )
        or _only(folder, _files(folder, "*.onnx"), "several ONNX models in one checkpoint folder")
    )
    if found is not None:
        return found
    if looks_like_dcp(folder):
        return folder
    for name in _TORCH_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    # One other PyTorch file (``model.pt``) is the folder's weights. Files whose names give steps
    # (``epoch=0-step=20.ckpt``, beside Lightning's ``last.ckpt``) make it a folder of checkpoints,
    # even while it holds only the first one (training still writing it), not a checkpoint folder.
    torch_files = [p for p in folder.iterdir() if p.suffix in _TORCH_SUFFIXES and is_torch_file(p)]
    if any(step_of(p.name) is not None for p in torch_files):
        return None
    return _only(folder, torch_files, "several PyTorch weight files and no shard index")


def has_weights(folder: Path) -> bool:
    """Does this folder hold the weights of one checkpoint?

    A folder of several unrelated weight files (no index, no ``model.safetensors``) is not one
    checkpoint: the scanner treats it as a folder of checkpoint files.
    """
    try:
        return find_weights(folder) is not None
    except WdiffError:
        return False


def _read_file(path: Path) -> Contents:
    """One checkpoint file, by its first bytes."""
    if looks_like_safetensors(path):
        tensors, _ = read_header(path)
        return Contents(tensors)
    if looks_like_onnx(path) or path.suffix == ".onnx":  # the suffix only once the bytes said nothing
        return Contents(dict(read_onnx(path)))
    if looks_like_torch_zip(path):
        return read_torch(path)
    if looks_like_legacy_torch(path):
        raise WdiffError(path, LEGACY_HINT)
    head = first_bytes(path, 4)
    if head.startswith(b"PK\x03\x04"):
        raise WdiffError(
            path,
            "is a zip archive but not a torch.save file (its first entry is not ARCHIVE/data.pkl or a "
            "storage)",
        )
    if head.startswith(b"\x80"):
        raise WdiffError(path, RAW_PICKLE)
    # Not recognised by its bytes: let the safetensors parser say precisely what is wrong.
    tensors, _ = read_header(path)
    return Contents(tensors)


def _unicode_names(contents: Contents) -> Contents:
    """Leave out (with the reason) tensors whose names hold a lone UTF-16 surrogate.

    A pickle can hold one (Python's pickle decodes with ``surrogatepass``, so ``torch.load`` accepts
    it), but no UTF-8 text can: neither the results (a safetensors file, whose reference reader refuses
    such names) nor ``summary.json`` nor the terminal. safetensors and ONNX inputs are refused earlier,
    as their reference readers refuse them. The name shown is escaped (``\\ud800``).
    """
    try:
        "".join(contents.tensors).encode("utf-8")
        "".join(s.name for s in contents.skipped).encode("utf-8")
        return contents
    except UnicodeEncodeError:
        pass

    def ok(name: str) -> bool:
        return not any("\ud800" <= c <= "\udfff" for c in name)

    def escaped(name: str) -> str:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")

    reason = "its name holds a lone UTF-16 surrogate, which no UTF-8 file can hold: not computed"
    bad = [Skipped(escaped(n), reason) for n in contents.tensors if not ok(n)]
    tensors = {n: r for n, r in contents.tensors.items() if ok(n)}
    skipped = tuple(s if ok(s.name) else Skipped(escaped(s.name), s.reason) for s in contents.skipped)
    return replace(contents, tensors=tensors, skipped=skipped + tuple(bad))


def open_checkpoint(path: str | os.PathLike[str]) -> Contents:
    """Everything a reader finds in one checkpoint, a file or a checkpoint folder."""
    return _unicode_names(_open_checkpoint(location(path)))


def _open_checkpoint(path: Path) -> Contents:
    if path.is_dir():
        entry = find_weights(path)
        if entry is None:
            raise WdiffError(path, "no weights in this folder (safetensors, ONNX or PyTorch)")
        if entry == path:
            if looks_like_dcp(path):
                return read_dcp(path)
            return Contents(read_accelerate(path))
        path = entry
    if not path.exists():
        raise WdiffError(path, missing(path))
    if path.name.endswith(".json"):
        shards: dict[Path, Contents] = {}

        def shard_tensors(shard: Path) -> dict[str, TensorRef]:
            shards[shard] = _read_file(shard)
            return shards[shard].tensors

        tensors = read_sharded(path, shard_tensors)
        skipped = tuple(s for c in shards.values() for s in c.skipped)
        keys = {c.state_key for c in shards.values()}
        return Contents(tensors, skipped, keys.pop() if len(keys) == 1 else None)
    return _read_file(path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, TensorRef]:
    """All tensors of one checkpoint, by name, from a file or a checkpoint folder."""
    return open_checkpoint(path).tensors
