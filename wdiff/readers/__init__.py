"""Find the weights of one checkpoint (a file or a folder) and list its tensors.

Formats are recognised by their first bytes, not their suffix. Pickle files (``pytorch_model.bin``,
``*.pt``) are never unpickled: loading one runs arbitrary code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from wdiff.errors import WdiffError
from wdiff.readers.base import DTYPES, DType, TensorRef, open_regular
from wdiff.readers.layouts import accelerate_models, read_accelerate
from wdiff.readers.onnx import looks_like_onnx, read_onnx
from wdiff.readers.safetensors import INDEX_NAME, looks_like_safetensors, read_header, read_sharded

__all__ = [
    "DTYPES",
    "DType",
    "TensorRef",
    "find_weights",
    "has_weights",
    "looks_like_onnx",
    "looks_like_safetensors",
    "read_checkpoint",
]

PICKLE_HINT = (
    "is a PyTorch pickle, which wdiff never unpickles (loading one can run code); convert it to "
    'safetensors once where you trust it: python -c "import torch; from safetensors.torch import '
    "save_file; save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\""
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def _sniff_pickle(path: Path) -> bool:
    """Torch pickles start with the pickle protocol byte or are zip archives (torch >= 1.6)."""
    try:
        with open_regular(path) as f:
            head = f.read(4)
    except (OSError, WdiffError):
        return False
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def missing(path: Path) -> str:
    """Why a path given as a checkpoint does not exist, in words."""
    if path.is_symlink():
        return "symlink to nothing: its target is missing or it is a symlink loop"
    return "no such file or folder"


def find_weights(folder: Path) -> Path | None:
    """The weights entry point of a checkpoint folder: a shard index, a single safetensors file, the
    folder itself for an accelerate ``save_state`` with several models, or a single ONNX model."""
    index = folder / INDEX_NAME
    if index.is_file():
        return index
    if len(accelerate_models(folder)) > 1:
        return folder
    single = folder / "model.safetensors"
    if single.is_file():
        return single
    indexes = sorted(folder.glob("*.safetensors.index*.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(files) == 1:
        shard = _SHARD_NAME.search(files[0].name)
        if shard and int(shard.group(2)) > 1:  # the index is written after the shards (FORMATS.md)
            raise WdiffError(
                files[0], f"shard {int(shard.group(1))} of {int(shard.group(2))} and no index yet: incomplete"
            )
        return files[0]
    if len(files) > 1 or len(indexes) > 1:
        names = ", ".join(p.name for p in (indexes or files)[:4])
        raise WdiffError(folder, f"several weight files and no model.safetensors(.index.json): {names}")
    models = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    if len(models) == 1:
        return models[0]
    if len(models) > 1:
        raise WdiffError(folder, f"several ONNX models in one checkpoint folder: {models[0].name}, ...")
    return None


def has_weights(folder: Path) -> bool:
    """Does this folder hold the weights of one checkpoint?

    A folder of several unrelated ``.safetensors`` files (no index, no ``model.safetensors``) is not one
    checkpoint: the scanner treats it as a folder of checkpoint files.
    """
    try:
        return find_weights(folder) is not None
    except WdiffError:
        return False


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, TensorRef]:
    """All tensors of one checkpoint, by name, from a file or a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        entry = find_weights(path)
        if entry is None:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            weights = [n for n in pickles if n.startswith(("pytorch_model", "model", "adapter_model"))]
            if weights:
                raise WdiffError(path / weights[0], PICKLE_HINT)
            raise WdiffError(path, "no safetensors weights in this folder")
        if entry == path:
            return read_accelerate(path)
        path = entry
    if not path.exists():
        raise WdiffError(path, missing(path))
    if path.name.endswith(".json"):
        return read_sharded(path)
    if looks_like_safetensors(path):
        tensors, _ = read_header(path)
        return tensors
    if looks_like_onnx(path) or path.suffix == ".onnx":  # the suffix only once the bytes said nothing
        return dict(read_onnx(path))
    if _sniff_pickle(path):
        raise WdiffError(path, PICKLE_HINT)
    # Not recognised by its bytes: let the safetensors parser say precisely what is wrong.
    tensors, _ = read_header(path)
    return tensors
