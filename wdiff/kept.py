"""A checkpoint kept as one safetensors file, with everything the assembly step needs to read it again
exactly as the original: what ``wdiff watch`` keeps in OUT so that ``save_total_limit`` deleting the
original changes nothing.

The file holds every stored tensor's bytes exactly as stored (pieces put together in element order);
tensors that shared their bytes in the original (tied weights) are stored once. ``__metadata__``
``wdiff.checkpoint`` holds, as JSON, what the original's readers and side files said: the shared
names, ONNX initializers' places in the graph (``OnnxRef.uses``/``order``, for name matching), the
adapter config (LoRA products), the tie flag, where a pickle's weights were and what its reader could
not read.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from wdiff.errors import WdiffError
from wdiff.readers.base import InputFiles, Skipped, TensorRef, recording
from wdiff.readers.onnx import OnnxRef, Use
from wdiff.readers.safetensors import read_header
from wdiff.sequence import Checkpoint

METADATA_KEY = "wdiff.checkpoint"
_COPY_BLOCK = 1 << 24


def _storage(ref: TensorRef) -> tuple:
    """What makes two refs the same stored bytes."""
    return (ref.path, ref.offset, ref.nbytes, ref.dtype, ref.shape, getattr(ref, "pieces", ()))


def _ranges(ref: TensorRef) -> list[tuple[str, int, int]]:
    """(path, offset, nbytes) of a tensor's bytes, in element order."""
    pieces = getattr(ref, "pieces", ())
    if not pieces:
        return [(ref.path, ref.offset, ref.nbytes)]
    size = ref.kind.bits // 8
    return [(p.path, p.offset, p.count * size) for p in pieces]


def keep(checkpoint: Checkpoint, dest: Path) -> None:
    """Write ``checkpoint``'s tensors and assembly facts into one safetensors file at ``dest``.

    The header is laid out like the official writer's (space-padded to a multiple of 8); the bytes
    move with ``copy_file_range`` in bounded blocks, never through memory whole.
    """
    owners: dict[tuple, str] = {}
    shared: dict[str, str] = {}
    stored: list[tuple[str, TensorRef]] = []  # by the checkpoint's name (a ref may carry its file's name)
    for name in sorted(checkpoint.tensors):
        ref = checkpoint.tensors[name]
        owner = owners.setdefault(_storage(ref), name) if ref.nbytes else name
        if owner != name:
            shared[name] = owner
        else:
            stored.append((name, ref))
    facts: dict[str, Any] = {
        "shared": shared,
        "onnx": {
            n: {"uses": [[u.op, u.input, u.node] for u in r.uses], "order": r.order}
            for n, r in checkpoint.tensors.items()
            if isinstance(r, OnnxRef)
        },
        "adapter": checkpoint.adapter,
        "tied": checkpoint.tied,
        "state_key": checkpoint.state_key,
        "skipped": [[s.name, s.reason] for s in checkpoint.skipped],
    }
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(facts)}}
    begin = 0
    for name, ref in stored:
        header[name] = {
            "dtype": ref.dtype,
            "shape": list(ref.shape),
            "data_offsets": [begin, begin + ref.nbytes],
        }
        begin += ref.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as out, InputFiles(checkpoint.files) as files:  # each the file scanned
        out.write(len(raw).to_bytes(8, "little") + raw)
        out.flush()
        for name, ref in stored:
            for path, offset, nbytes in _ranges(ref):
                _copy(name, path, files.fd(path), offset, nbytes, out.fileno())
        files.verify()  # and not rewritten in place while it was copied


def _copy(name: str, path: str, src: int, offset: int, nbytes: int, out: int) -> None:
    done = 0
    while done < nbytes:
        n = os.copy_file_range(src, out, min(_COPY_BLOCK, nbytes - done), offset + done)
        if n == 0:
            raise WdiffError(path, f"tensor {name!r}: the file shrank while it was copied")
        done += n


def read_kept(path: Path, original: str, step: int | None, fingerprint: str | None) -> Checkpoint:
    """The checkpoint kept at ``path`` (by :func:`keep`), as the original at ``original`` was read."""
    with recording() as seen:
        tensors, metadata = read_header(path)
    try:
        facts = json.loads((metadata or {})[METADATA_KEY])
    except (KeyError, ValueError) as e:
        raise WdiffError(path, f"is not a checkpoint kept by wdiff watch ({e})") from None
    for name, info in facts["onnx"].items():
        if name in tensors:
            uses = tuple(Use(op, i, node) for op, i, node in info["uses"])
            ref = tensors[name]
            tensors[name] = OnnxRef(
                ref.name, ref.dtype, ref.shape, ref.path, ref.offset, ref.nbytes, uses, info["order"]
            )
    for name, owner in facts["shared"].items():  # the same bytes under another name, as in the original
        ref = tensors[owner]
        if name in facts["onnx"]:
            info = facts["onnx"][name]
            uses = tuple(Use(op, i, node) for op, i, node in info["uses"])
            ref = OnnxRef(name, ref.dtype, ref.shape, ref.path, ref.offset, ref.nbytes, uses, info["order"])
        tensors[name] = replace(ref, name=name)
    return Checkpoint(
        original, step, tensors, known_fingerprint=fingerprint, adapter=facts["adapter"], tied=facts["tied"],
        state_key=facts["state_key"], skipped=tuple(Skipped(n, r) for n, r in facts["skipped"]),
        files=seen.files, headers=seen.headers,
    )  # fmt: skip
