"""Folder layouts beyond one model per folder: accelerate ``save_state`` with several models.

``Accelerator.save_state`` writes one file per prepared model: ``model.safetensors``,
``model_1.safetensors``, ``model_2.safetensors``, ... (plus pickled optimizer/RNG state, never read).
The models are unrelated networks whose tensor names can collide (two ``nn.Sequential`` both have
``0.weight``), so when there are several each tensor is named after its file: ``model.0.weight``,
``model_1.0.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path

from wdiff.readers.base import TensorRef
from wdiff.readers.safetensors import read_header

_ACCELERATE_MODEL = re.compile(r"^model(?:_(\d+))?\.safetensors$")


def accelerate_models(folder: Path) -> list[Path]:
    """``model.safetensors``, ``model_1.safetensors``, ... in model order (empty if none)."""
    found = []
    for p in folder.glob("model*.safetensors"):
        m = _ACCELERATE_MODEL.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1) or 0), p))
    return [p for _, p in sorted(found)]


def read_accelerate(folder: Path) -> dict[str, TensorRef]:
    """The tensors of every model of an accelerate checkpoint, each name prefixed by its file's stem."""
    tensors: dict[str, TensorRef] = {}
    for path in accelerate_models(folder):
        prefix = path.name.removesuffix(".safetensors")
        refs, _ = read_header(path)
        for name, ref in refs.items():
            tensors[f"{prefix}.{name}"] = ref
    return tensors
