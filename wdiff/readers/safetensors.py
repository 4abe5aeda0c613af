"""safetensors files and sharded safetensors folders, read from their headers.

wdiff parses the header itself (docs/formats.md: ``safe_open`` cannot decode BF16/FP8 to numpy and copies
whole tensors) and enforces every rule the reference reader enforces, so a file wdiff accepts is one
the safetensors library accepts, and a broken or half-written file is refused with a clear line.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

from wdiff.errors import WdiffError
from wdiff.readers.base import (
    DTYPES,
    INDEX_LIMIT,
    TensorRef,
    encodable,
    open_regular,
    read_json,
    record_header,
    size_of,
)  # fmt: skip
from wdiff.readers.remote import location

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
INDEX_NAME = "model.safetensors.index.json"


def looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """Sniff the first bytes: a plausible little-endian header length followed by ``{``."""
    try:
        with open_regular(path) as f:
            head = f.read(9)
            size = size_of(f)
    except (OSError, WdiffError):
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size and head[8:9] == b"{"


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON")


def _int(token: str) -> int | float:
    """JSON integers as Python ints, except ``-0``: serde_json (the reference reader) reads it as the
    float -0.0, which is no size or offset, so the header is refused ("expected usize"). Kept a float
    here, it fails the same checks; Python's ``int("-0")`` would quietly make it 0."""
    return -0.0 if token == "-0" else int(token)


def _no_lone_surrogates(value: object) -> None:
    """serde_json refuses a ``\\ud800`` escape without its pair ("lone leading surrogate"); Python's
    json accepts it and the name then cannot be written or printed as UTF-8. Refused alike."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"lone surrogate {item[e.start]!r} in the string {shown(item)}") from None


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {shown(key)}")
        out[key] = value
    return out


def shown(value: object) -> str:
    """``repr`` of a value taken from a file, cut short: an error stays one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        return "a number of over 4300 digits"
    return text if len(text) <= 80 else text[:70] + f"... ({len(text)} chars)"


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _bits(shape: list[int], bits: int, limit: int) -> int:
    """``prod(shape) * bits``, in Python ints (no overflow), stopping once past ``limit``: a header
    claiming 2**62 x 2**62 x ... elements costs no more than a file-sized product."""
    if 0 in shape:
        return 0
    total = bits
    for dim in shape:
        total *= dim
        if total > limit:
            return total
    return total


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorRef], dict[str, str] | None]:
    """Parse and validate one safetensors file; return its tensors (by name) and ``__metadata__``."""
    path = os.fspath(path)
    try:
        with open_regular(path) as f:
            size = size_of(f)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WdiffError(path, f"not a safetensors file: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise WdiffError(path, f"safetensors header length {n} exceeds the 100 MB limit")
            if 8 + n > size:
                raise WdiffError(
                    path,
                    f"safetensors header of {n} bytes runs past the end of the {size}-byte file",
                )
            raw = f.read(n)
            record_header(path, prefix + raw)  # for the re-check before compute (scan.recheck)
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WdiffError(path, "safetensors header is not valid UTF-8") from None
    try:
        header = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_unique_object,
            parse_int=_int if "-0" in text else None,  # no "-0" anywhere: no -0 to catch, C speed
        )  # fmt: skip
        if "\\u" in text:  # only escapes make lone surrogates: UTF-8 cannot hold one
            _no_lone_surrogates(header)
    except (ValueError, RecursionError) as e:
        raise WdiffError(path, f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise WdiffError(path, "safetensors header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise WdiffError(path, "safetensors __metadata__ must map strings to strings")

    data_start = 8 + n
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise WdiffError(path, f"tensor {shown(name)}: entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise WdiffError(path, f"tensor {shown(name)}: unknown dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise WdiffError(path, f"tensor {shown(name)}: shape {shown(shape)} is not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise WdiffError(path, f"tensor {shown(name)}: data_offsets {shown(offsets)} is not [begin, end]")
        begin, end = offsets
        if end < begin:
            raise WdiffError(path, f"tensor {shown(name)}: data_offsets {shown(offsets)} run backwards")
        bits = _bits(shape, DTYPES[dtype].bits, 8 * size)
        if bits % 8 or bits // 8 != end - begin:
            raise WdiffError(
                path,
                f"tensor {shown(name)}: {dtype} shape {shown(shape)} needs {shown(bits // 8)} bytes"
                f"{f' and {bits % 8} bits' if bits % 8 else ''} but data_offsets give {shown(end - begin)}",
            )
        entries.append((begin, end, name, dtype, tuple(shape)))

    entries.sort()
    expected = 0
    for begin, end, name, _, _ in entries:
        if begin != expected:
            problem = "overlaps the previous tensor" if begin < expected else "leaves a gap"
            raise WdiffError(path, f"tensor {shown(name)}: data at offset {begin} {problem}")
        expected = end
    if data_start + expected != size:
        state = "is truncated" if data_start + expected > size else "has trailing bytes"
        raise WdiffError(
            path,
            f"file {state}: the header describes {data_start + expected} bytes, the file has {size}",
        )

    tensors = {
        name: TensorRef(name, dtype, shape, path, data_start + begin, end - begin)
        for begin, end, name, dtype, shape in entries
    }
    return tensors, metadata


def _shard_header(path: Path) -> dict[str, TensorRef]:
    tensors, _ = read_header(path)
    return tensors


def read_sharded(
    index_path: str | os.PathLike[str],
    read_shard: Callable[[Path], dict[str, TensorRef]] = _shard_header,
) -> dict[str, TensorRef]:
    """Tensors of a sharded checkpoint, through its index (``model.safetensors.index.json``, or HF's
    ``pytorch_model.bin.index.json`` of the same shape, with ``read_shard`` reading a PyTorch shard)."""
    index_path = location(index_path)
    folder = index_path.parent.resolve()
    index = read_json(index_path, "shard index", INDEX_LIMIT)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WdiffError(index_path, 'shard index has no "weight_map" of tensor name to shard file')

    shards: dict[str, dict[str, TensorRef]] = {}
    for shard in sorted(set(weight_map.values())):
        # A shard name comes from outside: it must name a file inside the checkpoint folder.
        if not shard or "\0" in shard or not encodable(shard):
            raise WdiffError(index_path, f"shard path {shown(shard)} in weight_map is not a file name")
        candidate = folder / shard
        try:
            inside = not os.path.isabs(shard) and candidate.resolve().is_relative_to(folder)
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            raise WdiffError(index_path, f"shard {shown(shard)} is a symlink loop") from None
        if not inside:
            raise WdiffError(index_path, f"shard path {shown(shard)} leaves the checkpoint folder")
        if not candidate.exists():  # a pipe or folder is refused by its reader: "not a regular file"
            raise WdiffError(index_path, f"shard {shown(shard)} named in weight_map does not exist")
        shards[shard] = read_shard(candidate)

    tensors: dict[str, TensorRef] = {}
    for name, shard in weight_map.items():
        ref = shards[shard].get(name)
        if ref is None:
            raise WdiffError(folder / shard, f"tensor {shown(name)} listed in the index is not in this shard")
        tensors[name] = ref
    return tensors
