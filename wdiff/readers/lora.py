"""PEFT LoRA adapter checkpoints: the effective weight change of every adapted module.

A PEFT checkpoint holds ``adapter_model.safetensors`` + ``adapter_config.json``. For a module with
``lora_A`` (r, in) and ``lora_B`` (out, r) the adapter adds ``scale * B @ A`` to the base weight
(``transpose(B @ A, fan_in_fan_out) * scaling`` in peft's ``Linear.get_delta_weight``), with
``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` and
``alpha_pattern`` override r and alpha per module. Embedding adapters (``lora_embedding_A`` (r, vocab),
``lora_embedding_B`` (dim, r)) are always transposed; conv adapters flatten A's trailing dimensions.

This module only pairs A with B and works out each checkpoint's scale and orientation from the
tensors' headers (``LoraRef``); ``wdiff.blocks`` computes the products chunk by chunk. The effective
tensor is named like the base weight it changes: ``base_model.model.`` stripped, ``lora_A``/``lora_B``
and the adapter name dropped, ending in ``.weight``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from wdiff.readers.base import CONFIG_LIMIT, Skipped, TensorRef, read_json
from wdiff.readers.patterns import pattern_values
from wdiff.readers.remote import location

if TYPE_CHECKING:
    from wdiff.sequence import AlignedTensor, Checkpoint

ADAPTER_CONFIG = "adapter_config.json"
_KEY = re.compile(
    r"^(?P<module>.+?)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>(?!weight$)[^.]+))?(?:\.weight)?$"
)
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraRef(TensorRef):
    """The effective change ``scale * B @ A`` (transposed if ``transpose``) of one module in one
    checkpoint. ``path``/``offset``/``nbytes`` describe B; ``nbytes`` counts the bytes of A and B."""

    source: ClassVar[str] = "product"

    a: TensorRef
    b: TensorRef
    scale: float
    transpose: bool

    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.a.files(), *self.b.files()]))


def read_adapter_config(folder: Path) -> dict | None:
    """The ``adapter_config.json`` of a PEFT checkpoint folder (None when there is none)."""
    config_path = folder / ADAPTER_CONFIG
    if not config_path.exists():  # a pipe or a folder there is refused by read_json, not skipped
        return None
    config = read_json(config_path, "adapter config", CONFIG_LIMIT)
    return config if isinstance(config, dict) else None


class _Overrides:
    """One checkpoint's ``rank_pattern`` and ``alpha_pattern`` resolved for its modules (matched as
    peft matches them, with a time bound: ``readers.patterns``)."""

    def __init__(self, config: dict, modules: list[str], where: str) -> None:
        self.rank = pattern_values(config.get("rank_pattern"), modules, where, "rank_pattern")
        self.alpha = pattern_values(config.get("alpha_pattern"), modules, where, "alpha_pattern")


def _pairs(tensors: dict[str, TensorRef]) -> dict[tuple[str, str | None, bool], dict[str, TensorRef]]:
    pairs: dict[tuple[str, str | None, bool], dict[str, TensorRef]] = {}
    for name, ref in tensors.items():
        m = _KEY.match(name)
        if m:
            key = (m["module"], m["adapter"], m["emb"] is not None)
            pairs.setdefault(key, {})[m["ab"]] = ref
    return pairs


def _effective(
    module: str, embedding: bool, a: TensorRef, b: TensorRef, config: dict, overrides: _Overrides
) -> tuple[LoraRef | None, str]:
    """One checkpoint's LoraRef for a module, or None and why not."""
    if len(a.shape) < 2 or len(b.shape) < 2 or b.shape[1] != a.shape[0]:
        return None, f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not multiply"
    if any(d != 1 for d in b.shape[2:]):
        return None, f"lora_B {list(b.shape)} is not a 1x1 kernel"
    if not (a.kind.is_float and b.kind.is_float):
        return None, f"lora_A/lora_B dtype {a.dtype}/{b.dtype} is not a float"
    short = module.removeprefix(_PREFIX)
    rank = a.shape[0]
    r = overrides.rank.get(short, config.get("r", rank))
    alpha = overrides.alpha.get(short, config.get("lora_alpha", r))
    if r != rank:
        return None, f"adapter_config gives r={r} but lora_A has rank {rank}"
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or rank < 1:
        return None, f"adapter_config lora_alpha {alpha!r} is not a number"
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    transpose = embedding or (bool(config.get("fan_in_fan_out")) and len(a.shape) == 2)
    out_shape = (b.shape[0], *a.shape[1:])
    shape = (out_shape[1], out_shape[0]) if transpose else out_shape
    ref = LoraRef(
        f"{short}.weight", b.dtype, tuple(shape), b.path, b.offset, a.nbytes + b.nbytes,
        a, b, float(scale), transpose,
    )  # fmt: skip
    return ref, ""


def effective_tensors(checkpoints: Sequence[Checkpoint]) -> tuple[list[AlignedTensor], list[Skipped]]:
    """The effective weight change of every module adapted in every checkpoint of a PEFT LoRA run."""
    from wdiff.sequence import AlignedTensor, scanned_files

    configs = [c.adapter for c in checkpoints]
    if any(c is None for c in configs):
        return [], []
    per_checkpoint = [_pairs(c.tensors) for c in checkpoints]
    keys = sorted(set().union(*per_checkpoint), key=lambda k: (k[0], k[1] or "", k[2]))
    multi = {m for m, _, _ in keys if sum(1 for k in keys if k[0] == m) > 1}
    stored = set().union(*(c.tensors for c in checkpoints))
    shorts = sorted({m.removeprefix(_PREFIX) for m, _, _ in keys})
    overrides = [
        _Overrides(config, shorts, str(_side_folder(c.path) / ADAPTER_CONFIG))  # type: ignore[arg-type]
        for c, config in zip(checkpoints, configs)
    ]
    aligned, skipped = [], []
    for module, adapter, embedding in keys:
        label = f"{module.removeprefix(_PREFIX)}.weight"
        if module in multi and adapter:
            label = f"{module.removeprefix(_PREFIX)}.{adapter}.weight"
        if label in stored:  # the adapter file also stores a tensor of that name (modules_to_save, ...)
            skipped.append(Skipped(label, "effective LoRA change: a stored tensor has the same name"))
            continue
        refs, why = [], ""
        for checkpoint, pairs, config, override in zip(checkpoints, per_checkpoint, configs, overrides):
            assert config is not None
            peft_type = str(config.get("peft_type", "LORA")).upper()
            pair = pairs.get((module, adapter, embedding), {})
            if peft_type != "LORA" or config.get("use_dora"):
                kind = "DoRA" if config.get("use_dora") else peft_type
                why = f"{checkpoint.path}: {kind} adapters change the weight differently: effective change not computed"  # noqa: E501
            elif "A" not in pair or "B" not in pair:
                why = f"lora_A or lora_B missing from {checkpoint.path}"
            else:
                ref, why = _effective(module, embedding, pair["A"], pair["B"], config, override)
                if ref is not None:
                    refs.append(ref)
                    continue
            break
        shapes = {r.shape for r in refs}
        if not why and len(shapes) > 1:
            why = f"changes shape across checkpoints: {', '.join(str(list(s)) for s in sorted(shapes))}"
        if why:
            skipped.append(Skipped(label, f"effective LoRA change: {why}"))
            continue
        refs = [r if r.name == label else _renamed(r, label) for r in refs]
        aligned.append(AlignedTensor(label, refs[0].shape, tuple(refs), scanned_files(refs, checkpoints)))
    return aligned, skipped


def _side_folder(path: str) -> Path:
    """The folder of a checkpoint's side files (as ``wdiff.checkpoints.side_folder``)."""
    where = location(path)
    return where if where.is_dir() else where.parent


def _renamed(ref: LoraRef, name: str) -> LoraRef:
    from dataclasses import replace

    return replace(ref, name=name)
