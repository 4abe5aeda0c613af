"""torch.distributed.checkpoint (DCP) folders, read from ``.metadata`` and the headers of each item.

A DCP folder (torchtitan's ``step-N/``, FSDP's ``dcp.save``) is ``.metadata``, a pickled
``torch.distributed.checkpoint.metadata.Metadata`` dataclass, plus ``__R_I.distcp`` files (rank R,
file I). Seen in torch 2.13's ``filesystem.py`` and in files it wrote here:

- ``state_dict_metadata`` maps every flattened name (``model.layers.0.attn.wq.weight``,
  ``optim.state.0.exp_avg``) to ``TensorStorageMetadata(properties(dtype, ...), size, chunks)`` or to
  ``BytesStorageMetadata()`` (any other Python value, saved with ``torch.save`` into a BytesIO);
  a chunk is a box ``(offsets, sizes)`` of the whole tensor: one per rank for a ``Shard(0)`` DTensor,
  the whole tensor for a plain or replicated one (written once, by one rank);
- ``storage_data`` maps ``MetadataIndex(fqn, chunk offsets)`` to ``_StorageInfo(relative_path,
  offset, length[, transform_descriptors])``: the item is bytes ``[offset, offset + length)`` of that
  file, and a tensor item is a complete ``torch.save`` zip of the chunk (stored, uncompressed);
- the chunk inside that zip may have any strides: torch clones a chunk only when its storage is bigger
  than the chunk, so a transposed or channels-last tensor is saved as it is in memory.

So wdiff unpickles ``.metadata`` with ``restricted_load`` (DCP's dataclasses become inert
placeholders, read field by field here), then for every chunk of a model tensor reads the item's zip
directory and ``data.pkl`` (a few hundred bytes) to find where the chunk's elements start, and turns
each chunk into runs of the tensor's row-major elements (``Piece``). Tensor bytes are never read.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from wdiff.errors import WdiffError
from wdiff.naming import last_number
from wdiff.readers.base import DTYPES, Piece, PiecesRef, Skipped, TensorRef, open_regular
from wdiff.readers.pickle import Global, Placeholder, plain_containers, restricted_load

METADATA_NAME = ".metadata"
DISTCP_SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1 << 30  # a 70B model sharded over 1,000 ranks has a .metadata of tens of MB
MAX_PIECES = 1 << 16  # byte ranges per tensor; a chunk cut along a later dim is one range per row
MIN_PIECE_ELEMENTS = 64  # average elements per range once chunks are cut into rows
MAX_ITEM_ENTRIES = 64  # files in one item's zip: torch.save of a tensor writes 7
MAX_DATA_PKL_BYTES = 1 << 20  # a chunk's data.pkl is ~150 bytes

# Top-level names of what is saved beside the model: torchtitan (optimizer, lr_scheduler, dataloader,
# train_state), the DCP tutorial and most scripts (optim, optimizer), Lightning (optimizer_states,
# callbacks, loops: a ModelCheckpoint callback keeps its best score as a tensor), rng states.
NOT_MODEL = re.compile(
    r"(optimizers?(_\d+|_states?)?|optim|(lr_)?schedulers?|lr_scheduler_\d+|data_?loader|train_state"
    r"|callbacks|loops|rng(_states?)?)"
)
MODEL_PREFIXES = ("app.model.", "model.", "")


@dataclass(frozen=True)
class TorchContents:
    """What a PyTorch checkpoint holds for wdiff: the model's tensors by name, what was left out and
    why, where in the saved dict the weights were (``state_key``) and the training step if known."""

    tensors: dict[str, TensorRef]
    skipped: tuple[Skipped, ...]
    state_key: str | None
    step: int | None


# --- the DCP records, as wdiff keeps them ----------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A box of the whole tensor: it starts at ``offsets`` and spans ``sizes`` along each dim."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the saved state dict: its dtype (a wdiff code, or ``torch.<name>`` when wdiff has
    none), its full shape and the chunks it was saved in."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class BytesEntry:
    """Any other value of the saved state dict (an int, a dict, a BytesIO): a torch.save'd object."""


@dataclass(frozen=True)
class StorageInfo:
    """Where one item is: ``length`` bytes from ``offset`` of ``relative_path`` in the folder, written
    through DCP stream extensions ``transforms`` (none unless the writer was given ``_extensions``)."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class DcpMetadata:
    """``.metadata``: every saved name's entry, and every item's place, keyed ``(fqn, chunk offsets)``
    (``None`` for a bytes item)."""

    entries: dict[str, TensorEntry | BytesEntry]
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo]
    version: str | None


# --- torch names -----------------------------------------------------------------------------------

# torch.dtype (pickled as the global ``torch.<name>``) -> wdiff dtype code; names wdiff has no code for
# (complex128, quantized, sub-byte) still unpickle and their tensors are reported as left out.
TORCH_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "complex64": "C64",
}  # fmt: skip
_OTHER_TORCH_DTYPES = (
    "complex128", "complex32", "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "float4_e2m1fn_x2",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
)  # fmt: skip
# typed storage class (``torch.FloatStorage``) -> wdiff dtype code, as torch.save names them
STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "BoolStorage": "BOOL", "ByteStorage": "U8", "CharStorage": "I8", "ShortStorage": "I16",
    "IntStorage": "I32", "LongStorage": "I64", "ComplexFloatStorage": "C64",
}  # fmt: skip


@dataclass(frozen=True)
class _Dtype:
    """A ``torch.<name>`` dtype global."""

    name: str

    @property
    def code(self) -> str:
        return TORCH_DTYPES.get(self.name, f"torch.{self.name}")


_MD = "torch.distributed.checkpoint.metadata"
# DCP's own classes: calling one (NEWOBJ) records its state in a Placeholder, read below field by field.
_DCP_CLASSES = (
    (_MD, "Metadata"),
    (_MD, "TensorStorageMetadata"),
    (_MD, "BytesStorageMetadata"),
    (_MD, "ChunkStorageMetadata"),
    (_MD, "TensorProperties"),
    (_MD, "MetadataIndex"),
    (_MD, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # torch <= 2.2 kept TensorProperties with ShardedTensor's metadata
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
)


def metadata_allowlist(path: str) -> dict[tuple[str, str], object]:
    """What each global in ``.metadata`` may become (docs/reliability.md lists them); anything else is
    refused by ``restricted_load``."""

    def size(dims: object = ()) -> tuple[int, ...]:
        # torch.Size((d0, d1, ...)): a tuple subclass; kept as a plain tuple of sizes
        if not isinstance(dims, (tuple, list)) or not all(_is_uint(d) for d in dims):
            raise WdiffError(path, "torch.Size of something other than sizes")
        return tuple(dims)  # type: ignore[arg-type]

    def memory_format(value: object) -> int:
        if not _is_uint(value):
            raise WdiffError(path, "memory format encoding is not a number")
        return value  # type: ignore[return-value]

    def layout(name: object) -> str:
        if not isinstance(name, str):
            raise WdiffError(path, "layout name is not a string")
        return name

    def file_path(*parts: object) -> str:
        # StorageMeta.checkpoint_id: where the folder was when written; informative only
        return "/".join(str(p) for p in parts)

    allowed: dict[tuple[str, str], object] = dict(plain_containers(path))
    allowed.update({key: Global(*key) for key in _DCP_CLASSES})
    allowed.update({("torch", n): _Dtype(n) for n in (*TORCH_DTYPES, *_OTHER_TORCH_DTYPES)})
    allowed[("torch", "Size")] = size
    allowed[(_MD, "_MEM_FORMAT_ENCODING")] = memory_format
    allowed[("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")] = memory_format
    allowed[("torch.serialization", "_get_layout")] = layout
    allowed[("torch", "strided")] = "torch.strided"  # how torch < 2.1 pickled the layout
    for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", cls)] = file_path
    return allowed


# --- .metadata -------------------------------------------------------------------------------------


def looks_like_dcp(folder: str | os.PathLike[str]) -> bool:
    """A ``.metadata`` file that starts like a pickle (protocol 2+) and at least one ``*.distcp``."""
    folder = Path(folder)
    try:
        with open_regular(folder / METADATA_NAME) as f:
            head = f.read(2)
        has_items = any(p.suffix == DISTCP_SUFFIX for p in folder.iterdir())
    except (OSError, WdiffError):
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and has_items


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0


def _instance(value: object, name: str, where: str, path: str) -> Placeholder:
    if not (isinstance(value, Placeholder) and value.name == name):
        raise WdiffError(path, f"{where} is not a {name}")
    return value


def _sizes(value: object, where: str, path: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(_is_uint(d) for d in value)):
        raise WdiffError(path, f"{where} is not a list of sizes")
    return value


def _tensor_entry(fqn: str, value: Placeholder, path: str) -> TensorEntry:
    attrs = value.attributes()
    where = f"tensor {_shown(fqn)}"
    props = _instance(attrs.get("properties"), "TensorProperties", f"{where} properties", path)
    # torch >= 2.1 pickles TensorProperties as a tuple (dtype, layout, requires_grad, memory format,
    # pin_memory); older ones as the dataclass's dict
    state = props.state[-1] if props.state else None
    dtype = state[0] if isinstance(state, tuple) and state else props.attributes().get("dtype")
    if not isinstance(dtype, _Dtype):
        raise WdiffError(path, f"{where} has no dtype")
    shape = _sizes(attrs.get("size"), f"{where} size", path)
    chunks_value = attrs.get("chunks")
    if not isinstance(chunks_value, list):
        raise WdiffError(path, f"{where} has no list of chunks")
    chunks = []
    for c in chunks_value:
        chunk_attrs = _instance(c, "ChunkStorageMetadata", f"{where} chunk", path).attributes()
        offsets = _sizes(chunk_attrs.get("offsets"), f"{where} chunk offsets", path)
        sizes = _sizes(chunk_attrs.get("sizes"), f"{where} chunk sizes", path)
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise WdiffError(path, f"{where}: a chunk of {len(sizes)} dims in a tensor of {len(shape)}")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise WdiffError(
                path, f"{where}: chunk at {list(offsets)} of size {list(sizes)} is outside {list(shape)}"
            )
        chunks.append(Chunk(offsets, sizes))
    # The same chunk listed twice (replicated and not deduplicated) is one item: keep it once.
    return TensorEntry(dtype.code, shape, tuple(dict.fromkeys(chunks)))


def _storage_info(value: object, where: str, path: str) -> StorageInfo:
    attrs = _instance(value, "_StorageInfo", where, path).attributes()
    relative, offset, length = attrs.get("relative_path"), attrs.get("offset"), attrs.get("length")
    transforms = attrs.get("transform_descriptors") or ()
    if not isinstance(relative, str) or not _is_uint(offset) or not _is_uint(length):
        raise WdiffError(path, f"{where} has no file, offset and length")
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise WdiffError(path, f"{where} has transform descriptors that are not names")
    return StorageInfo(relative, offset, length, tuple(transforms))  # type: ignore[arg-type]


def read_metadata(path: str | os.PathLike[str]) -> DcpMetadata:
    """Unpickle a DCP ``.metadata`` file without running its code, and check its shape."""
    path = os.fspath(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_METADATA_BYTES:
            raise WdiffError(
                path, f"DCP metadata of {size} bytes is over the {MAX_METADATA_BYTES >> 20} MiB limit"
            )
        try:
            data = f.read()
        except OSError as e:
            raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    root = _instance(restricted_load(data, path, metadata_allowlist(path)), "Metadata", "the pickle", path)
    attrs = root.attributes()

    sdm = attrs.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise WdiffError(path, "DCP metadata has no state_dict_metadata")
    entries: dict[str, TensorEntry | BytesEntry] = {}
    for fqn, value in sdm.items():
        if not isinstance(fqn, str):
            raise WdiffError(path, f"state_dict_metadata has a key {_shown(fqn)} that is not a name")
        if isinstance(value, Placeholder) and value.name == "BytesStorageMetadata":
            entries[fqn] = BytesEntry()
        elif isinstance(value, Placeholder) and value.name == "TensorStorageMetadata":
            entries[fqn] = _tensor_entry(fqn, value, path)
        else:
            raise WdiffError(path, f"{_shown(fqn)} is neither a tensor nor a bytes entry")

    storage_data = attrs.get("storage_data")
    if not isinstance(storage_data, dict):
        raise WdiffError(path, "DCP metadata has no storage_data (not written by FileSystemWriter)")
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo] = {}
    for index, value in storage_data.items():
        index_attrs = _instance(index, "MetadataIndex", "a storage_data key", path).attributes()
        fqn, offset = index_attrs.get("fqn"), index_attrs.get("offset")
        if not isinstance(fqn, str):
            raise WdiffError(path, "a storage_data key has no name")
        if offset is not None:
            offset = _sizes(offset, f"storage of {_shown(fqn)} offset", path)
        storage[(fqn, offset)] = _storage_info(value, f"storage of {_shown(fqn)}", path)
    version = attrs.get("version")
    return DcpMetadata(entries, storage, version if isinstance(version, str) else None)


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, (str, int)) else f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:70] + f"... ({len(text)} chars)"


# --- which tensors are the model -------------------------------------------------------------------


def model_prefix(names: Iterable[str]) -> tuple[str, list[str]]:
    """The prefix the model's weights share, and their full names.

    Weights are the tensor names outside the ``NOT_MODEL`` namespaces (also under ``app.``); the prefix
    is the first of ``MODEL_PREFIXES`` every weight has (``""``: the top level, as torchtitan saves)."""
    weights = [n for n in names if not NOT_MODEL.fullmatch(n.removeprefix("app.").split(".", 1)[0])]
    for prefix in MODEL_PREFIXES:
        if weights and all(n.startswith(prefix) for n in weights):
            return prefix, weights
    return "", weights


# --- one item: a torch.save zip inside a .distcp file ---------------------------------------------

_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")


@dataclass(frozen=True)
class _Entry:
    """A file of the item's zip: its local header's place and its sizes (relative to the item)."""

    header: int
    size: int
    method: int


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by ``persistent_load``: ``data/<key>`` of the zip, ``numel`` elements."""

    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _ChunkTensor:
    """What a chunk's ``data.pkl`` rebuilds: a view of a storage."""

    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Item:
    """Reads the zip of one item: ``length`` bytes from ``base`` of the open file ``f``."""

    def __init__(self, f: BinaryIO, base: int, length: int, fail: Callable[[str], WdiffError]) -> None:
        self.f, self.base, self.length, self.fail = f, base, length, fail

    def read(self, at: int, n: int) -> bytes:
        if at < 0 or n < 0 or at + n > self.length:
            raise self.fail(f"zip structure points past the item's {self.length} bytes")
        data = os.pread(self.f.fileno(), n, self.base + at)
        if len(data) != n:
            raise self.fail("file is truncated inside the item")
        return data

    def entries(self) -> dict[str, _Entry]:
        if self.length < _EOCD.size:
            raise self.fail(f"item of {self.length} bytes is too short for a torch.save zip")
        head = self.read(0, 4)
        if head != b"PK\x03\x04":
            if self.read(8, 1) == b"{" if self.length > 8 else False:
                raise self.fail(
                    "item is a safetensors blob (FileSystemWriter serialization_format=SAFETENSORS), "
                    "which wdiff does not read (and torch's FileSystemReader does not either)"
                )
            raise self.fail("item is not a torch.save zip")
        end = self.length - _EOCD.size
        sig, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack(self.read(end, _EOCD.size))
        if sig != b"PK\x05\x06":
            raise self.fail("item is not a torch.save zip (no end-of-archive record where its length ends)")
        if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
            sig, _, at, _ = _EOCD64_LOCATOR.unpack(
                self.read(end - _EOCD64_LOCATOR.size, _EOCD64_LOCATOR.size)
            )
            if sig != b"PK\x06\x07":
                raise self.fail("item's ZIP64 end-of-archive locator is missing")
            fields = _EOCD64.unpack(self.read(at, _EOCD64.size))
            if fields[0] != b"PK\x06\x06":
                raise self.fail("item's ZIP64 end-of-archive record is missing")
            count, cd_size, cd_offset = fields[7], fields[8], fields[9]
        if count > MAX_ITEM_ENTRIES or cd_size > MAX_ITEM_ENTRIES * 1024:
            raise self.fail(f"item's zip lists {count} files, not a torch.save of one tensor")
        cd = self.read(cd_offset, cd_size)
        out: dict[str, _Entry] = {}
        pos = 0
        for _ in range(count):
            if pos + _CENTRAL.size > len(cd):
                raise self.fail("item's zip directory is truncated")
            fields = _CENTRAL.unpack_from(cd, pos)
            if fields[0] != b"PK\x01\x02":
                raise self.fail("item's zip directory is damaged")
            method, csize, usize = fields[4], fields[8], fields[9]
            name_len, extra_len, comment_len, header = fields[10], fields[11], fields[12], fields[16]
            name_at = pos + _CENTRAL.size
            name = cd[name_at : name_at + name_len].decode("utf-8", "replace")
            extra = cd[name_at + name_len : name_at + name_len + extra_len]
            usize, csize, header = _zip64_extra(extra, usize, csize, header)
            out[name] = _Entry(header, usize, method)
            pos = name_at + name_len + extra_len + comment_len
        return out

    def data_start(self, name: str, entry: _Entry) -> int:
        """Where an entry's bytes start in the item (past its local header and torch's padding)."""
        if entry.method != 0:
            raise self.fail(f"{name} is compressed in the item's zip; torch.save stores entries uncompressed")
        fields = _LOCAL.unpack(self.read(entry.header, _LOCAL.size))
        if fields[0] != b"PK\x03\x04":
            raise self.fail(f"{name}: no local zip header where the directory says")
        start = entry.header + _LOCAL.size + fields[9] + fields[10]
        if start + entry.size > self.length:
            raise self.fail(f"{name} runs past the end of the item")
        return start


def _zip64_extra(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    """Sizes and offset from a ZIP64 extra field (id 1), for the fields the entry marks 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + n]
        if tag == 1:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if header == 0xFFFFFFFF and values:
                header = values.pop(0)
        pos += 4 + n
    return usize, csize, header


def _chunk_allowlist(path: str) -> dict[tuple[str, str], object]:
    """What a chunk's ``data.pkl`` may name: the tensor rebuild functions, storage types, dtypes."""

    def rebuild(storage: object, offset: object, size: object, stride: object, *rest: object) -> _ChunkTensor:
        if not isinstance(storage, _StorageRef) or not _is_uint(offset):
            raise WdiffError(path, "data.pkl rebuilds a tensor from something other than a storage")
        for dims in (size, stride):
            if not (isinstance(dims, tuple) and all(_is_uint(d) for d in dims)):
                raise WdiffError(path, "data.pkl gives a tensor size or stride that is not a list of sizes")
        return _ChunkTensor(storage, offset, size, stride)  # type: ignore[arg-type]

    def rebuild_v3(storage: object, offset: object, size: object, stride: object, grad: object,
                   hooks: object, dtype: object, *rest: object) -> _ChunkTensor:  # fmt: skip
        # an UntypedStorage (fp8, uint16-64) with the dtype passed last
        if not isinstance(storage, _StorageRef) or not isinstance(dtype, _Dtype) or storage.dtype != "U8":
            raise WdiffError(path, "data.pkl rebuilds a typed tensor from something other than bytes")
        code = dtype.code
        if code not in DTYPES:
            raise WdiffError(path, f"data.pkl holds a tensor of dtype {code}")
        width = DTYPES[code].bits // 8
        typed = _StorageRef(code, storage.key, storage.numel // width)
        return rebuild(typed, offset, size, stride)

    allowed: dict[tuple[str, str], object] = dict(plain_containers(path))
    allowed[("torch._utils", "_rebuild_tensor_v2")] = rebuild
    allowed[("torch._utils", "_rebuild_tensor_v3")] = rebuild_v3
    allowed.update({("torch", n): _Dtype(n) for n in TORCH_DTYPES})
    allowed.update({("torch", n): n for n in STORAGE_DTYPES})
    allowed[("torch.storage", "UntypedStorage")] = "UntypedStorage"
    return allowed


def _storage_ref(pid: object) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise ValueError("a persistent id that is not a storage")
    _, kind, key, _, numel = pid
    code = "U8" if kind == "UntypedStorage" else STORAGE_DTYPES.get(kind) if isinstance(kind, str) else None
    if code is None or not isinstance(key, str) or not _is_uint(numel):
        raise ValueError(f"a storage of an unknown type {kind!r}")
    return _StorageRef(code, key, numel)


@dataclass(frozen=True)
class _ChunkData:
    """Where a chunk's elements are: from byte ``offset`` of the file, row-major if ``row_major``."""

    offset: int
    row_major: bool
    strides: tuple[int, ...]


def _chunk_data(
    f: BinaryIO, file: str, info: StorageInfo, fqn: str, dtype: str, chunk: Chunk, parsed: dict[bytes, object]
) -> _ChunkData:
    """Read the item's zip directory and data.pkl and check them against the metadata.

    ``parsed`` keeps each distinct data.pkl's result for the whole folder: chunks of one shape and dtype
    pickle to the same bytes, so a folder of thousands of items unpickles a few dozen."""
    where = f"{fqn} chunk at {list(chunk.offsets)} (item at byte {info.offset})"

    def fail(problem: str) -> WdiffError:
        return WdiffError(file, f"{where}: {problem}")

    item = _Item(f, info.offset, info.length, fail)
    entries = item.entries()
    pkl_names = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl_names) != 1:
        raise fail("item's zip has no data.pkl: not a torch.save")
    archive = pkl_names[0][: -len("/data.pkl")]
    pkl = entries[pkl_names[0]]
    if pkl.size > MAX_DATA_PKL_BYTES:
        raise fail(f"data.pkl of {pkl.size} bytes is not a tensor's")
    data = item.read(item.data_start(pkl_names[0], pkl), pkl.size)
    order = entries.get(f"{archive}/byteorder")
    if order is not None and order.size <= 16:
        if item.read(item.data_start("byteorder", order), order.size) != b"little":
            raise fail("saved on a big-endian machine; wdiff reads little-endian data")
    if data not in parsed:
        try:
            parsed[data] = restricted_load(data, file, _chunk_allowlist(file), persistent_load=_storage_ref)
        except WdiffError as e:
            raise fail(e.problem) from None
    tensor = parsed[data]
    if not isinstance(tensor, _ChunkTensor):
        raise fail("data.pkl holds something other than one tensor")
    if tensor.storage.dtype != dtype:
        raise fail(f"holds {tensor.storage.dtype} data where the metadata says {dtype}")
    if tensor.size != chunk.sizes or len(tensor.stride) != len(tensor.size):
        raise fail(f"holds a tensor of size {list(tensor.size)} where the metadata says {list(chunk.sizes)}")
    name = f"{archive}/data/{tensor.storage.key}"
    storage = entries.get(name)
    if storage is None:
        raise fail(f"data.pkl names storage {tensor.storage.key!r}, which the item does not hold")
    width = DTYPES[dtype].bits // 8
    numel = math.prod(chunk.sizes)
    if storage.size != tensor.storage.numel * width:
        raise fail(f"storage of {storage.size} bytes where data.pkl says {tensor.storage.numel} elements")
    # the furthest element the view reaches, for any strides
    reach = tensor.storage_offset + sum((s - 1) * st for s, st in zip(tensor.size, tensor.stride)) + 1
    if numel and reach > tensor.storage.numel:
        raise fail("the tensor view runs past its storage")
    start = item.data_start(name, storage)
    row_major = all(
        st == math.prod(tensor.size[d + 1 :]) for d, st in enumerate(tensor.stride) if tensor.size[d] > 1
    )
    return _ChunkData(info.offset + start + tensor.storage_offset * width, row_major, tensor.stride)


# --- chunks as runs of row-major elements ----------------------------------------------------------


def _runs(shape: tuple[int, ...], chunk: Chunk) -> tuple[int, int, int]:
    """``(cut, count, length)``: a chunk is ``count`` runs of ``length`` consecutive row-major elements
    of the whole tensor, one per index of the dims before ``cut`` (the last dim the chunk does not span
    whole: Shard(0) chunks span all later dims, so they are one run)."""
    if 0 in chunk.sizes:
        return 0, 0, 0
    cut = 0
    for d in range(len(shape) - 1, -1, -1):
        if chunk.sizes[d] != shape[d]:
            cut = d
            break
    return cut, math.prod(chunk.sizes[:cut]), math.prod(chunk.sizes[cut:])


def _run_starts(shape: tuple[int, ...], chunk: Chunk, cut: int) -> Iterable[int]:
    """The element index (in the whole tensor) where each run of a chunk starts, in the chunk's order."""
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    base = sum(o * s for o, s in zip(chunk.offsets, strides))
    for index in itertools.product(*(range(n) for n in chunk.sizes[:cut])):
        yield base + sum(i * s for i, s in zip(index, strides))


def _tensor(
    name: str,
    fqn: str,
    entry: TensorEntry,
    meta: DcpMetadata,
    chunk_data: Callable[[Chunk, StorageInfo], tuple[str, _ChunkData]],
    metadata_path: str,
) -> TensorRef | Skipped:
    """One tensor as a ``TensorRef`` (one byte range) or a ``PiecesRef``, or why it is left out."""
    if entry.dtype not in DTYPES:
        return Skipped(name, f"dtype {entry.dtype} is not one wdiff reads")
    width = DTYPES[entry.dtype].bits // 8
    numel = math.prod(entry.shape)
    plans = [(chunk, *_runs(entry.shape, chunk)) for chunk in entry.chunks]
    pieces_total = sum(count for _, _, count, _ in plans)
    cut_chunks = [c for c, _, count, _ in plans if count > 1]

    def scattered() -> Skipped:
        c = cut_chunks[0]
        return Skipped(
            name,
            f"saved in {pieces_total} scattered pieces (chunks of {list(c.sizes)} cut along later dims "
            f"of {list(entry.shape)}): too many small reads",
        )

    if pieces_total > MAX_PIECES:  # before listing them: a crafted file could ask for billions
        return scattered()
    # Every element once: the runs of all chunks, sorted, must follow each other from 0 to numel.
    runs: list[tuple[int, int, Chunk, int]] = []  # (start, length, chunk, run number in the chunk)
    for chunk, cut, count, length in plans:
        if count:  # an empty chunk (a rank with no rows of an uneven Shard(0)) holds no element
            runs.extend(
                (start, length, chunk, k) for k, start in enumerate(_run_starts(entry.shape, chunk, cut))
            )
    runs.sort(key=lambda r: r[0])
    expected = 0
    for start, length, _, _ in runs:
        if start != expected:
            problem = "overlap" if start < expected else "leave a gap"
            raise WdiffError(
                metadata_path, f"tensor {_shown(fqn)}: its chunks {problem} at element {min(start, expected)}"
            )
        expected = start + length
    if expected != numel:
        raise WdiffError(
            metadata_path, f"tensor {_shown(fqn)}: its chunks cover {expected} of {numel} elements"
        )
    if cut_chunks and numel < MIN_PIECE_ELEMENTS * pieces_total:
        return scattered()

    located: dict[Chunk, tuple[str, _ChunkData]] = {}
    for chunk in entry.chunks:
        info = meta.storage.get((fqn, chunk.offsets))
        if info is None:
            raise WdiffError(
                metadata_path, f"tensor {_shown(fqn)}: chunk at {list(chunk.offsets)} has no storage entry"
            )
        if 0 in chunk.sizes:
            continue
        located[chunk] = chunk_data(chunk, info)
        if not located[chunk][1].row_major:
            return Skipped(
                name,
                f"a chunk is saved with strides {list(located[chunk][1].strides)} (transposed or "
                "channels-last), not as row-major runs",
            )
    if not runs:  # no elements: an empty tensor
        file = next((p for p, _ in located.values()), metadata_path)
        return TensorRef(name, entry.dtype, entry.shape, file, 0, 0)
    pieces: list[Piece] = []
    for start, length, chunk, k in runs:
        file, data = located[chunk]
        offset = data.offset + k * length * width
        last = pieces[-1] if pieces else None
        if last is not None and last.path == file and last.offset + last.count * width == offset:
            pieces[-1] = Piece(last.start, last.count + length, file, last.offset)  # consecutive on disk too
        else:
            pieces.append(Piece(start, length, file, offset))
    if len(pieces) == 1:
        return TensorRef(name, entry.dtype, entry.shape, pieces[0].path, pieces[0].offset, numel * width)
    first = pieces[0]
    return PiecesRef(name, entry.dtype, entry.shape, first.path, first.offset, numel * width, tuple(pieces))


# --- files named by the metadata -------------------------------------------------------------------


class _Files:
    """The folder's item files, each checked once: inside the folder, a regular file, kept open."""

    def __init__(self, folder: Path, metadata_path: str) -> None:
        self.folder = folder.resolve()
        self.metadata_path = metadata_path
        self.open: dict[str, tuple[str, BinaryIO, int]] = {}

    def get(self, relative: str) -> tuple[str, BinaryIO, int]:
        if relative in self.open:
            return self.open[relative]
        shown = _shown(relative)
        parts = relative.replace("\\", "/").split("/")
        if not relative or "\0" in relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
            raise WdiffError(self.metadata_path, f"item file {shown} is not a relative path in the folder")
        if ".." in parts or (len(relative) > 1 and relative[1] == ":"):
            raise WdiffError(self.metadata_path, f"item file {shown} leaves the checkpoint folder")
        candidate = self.folder / relative
        try:
            inside = candidate.resolve().is_relative_to(self.folder)
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            raise WdiffError(self.metadata_path, f"item file {shown} is a symlink loop") from None
        if not inside:
            raise WdiffError(
                self.metadata_path, f"item file {shown} leaves the checkpoint folder (a symlink)"
            )
        if not candidate.exists():
            raise WdiffError(self.metadata_path, f"item file {shown} named in the metadata does not exist")
        f = open_regular(candidate)
        entry = (str(candidate), f, os.fstat(f.fileno()).st_size)
        self.open[relative] = entry
        return entry

    def close(self) -> None:
        for _, f, _ in self.open.values():
            f.close()


def read_dcp(folder: str | os.PathLike[str]) -> TorchContents:
    """The model's tensors of a DCP checkpoint folder, located by byte ranges of its ``.distcp`` files.

    Optimizer, scheduler, dataloader and train-state entries are left out silently (they are not the
    model); other non-tensor values and tensors wdiff cannot read are listed in ``skipped``. The step
    is the last number of the folder's name (``step-1000``)."""
    folder = Path(folder)
    metadata_path = str(folder / METADATA_NAME)
    meta = read_metadata(metadata_path)
    prefix, names = model_prefix(n for n, e in meta.entries.items() if isinstance(e, TensorEntry))
    files = _Files(folder, metadata_path)
    parsed: dict[bytes, object] = {}

    def chunk_data(fqn: str, entry: TensorEntry) -> Callable[[Chunk, StorageInfo], tuple[str, _ChunkData]]:
        def locate(chunk: Chunk, info: StorageInfo) -> tuple[str, _ChunkData]:
            path, f, size = files.get(info.relative_path)
            if info.transforms:
                raise WdiffError(
                    path,
                    f"{fqn} is saved through DCP stream extensions {list(info.transforms)} (e.g. zstd "
                    "compression), which wdiff does not decode; save without _extensions to read it",
                )
            if info.offset + info.length > size:
                raise WdiffError(
                    path,
                    f"file is truncated: {fqn} chunk at {list(chunk.offsets)} is bytes {info.offset}-"
                    f"{info.offset + info.length} of a {size}-byte file",
                )
            return path, _chunk_data(f, path, info, fqn, entry.dtype, chunk, parsed)

        return locate

    tensors: dict[str, TensorRef] = {}
    skipped: list[Skipped] = []
    try:
        for fqn in names:
            name = fqn[len(prefix) :]
            entry = meta.entries[fqn]
            assert isinstance(entry, TensorEntry)  # bytes entries (ints, dicts, BytesIO) are not weights
            got = _tensor(name, fqn, entry, meta, chunk_data(fqn, entry), metadata_path)
            if isinstance(got, Skipped):
                skipped.append(got)
            else:
                tensors[name] = got
    finally:
        files.close()
    return TorchContents(
        tensors, tuple(skipped), prefix.removesuffix(".") or None, last_number(folder.resolve().name)
    )
