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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from wdiff.errors import WdiffError
from wdiff.naming import last_number
from wdiff.readers import torch as torch_file
from wdiff.readers.base import DTYPES, Piece, PiecesRef, Skipped, TensorRef, encodable, open_regular
from wdiff.readers.pickle import Global, Placeholder, describe, plain_containers, restricted_load
from wdiff.readers.remote import LOCAL_ONLY, PositionedFile, is_url
from wdiff.readers.torch import TORCH_DTYPES, TorchContents

METADATA_NAME = ".metadata"
DISTCP_SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1 << 30  # a 70B model sharded over 1,000 ranks has a .metadata of tens of MB
# Byte ranges per tensor (a chunk cut along a later dim is one range per row) and their average length
# once chunks are cut into rows: torch.py's limits for strided views, for the same reason (compute
# reads every range on its own).
MAX_PIECES = torch_file.MAX_PIECES
MIN_PIECE_ELEMENTS = torch_file.MIN_PIECE
MAX_DATA_PKL_BYTES = 1 << 20  # a chunk's data.pkl is ~150 bytes
_EOCD_SIZE = 22  # a zip's end-of-central-directory record, without comment

# Top-level names of what is saved beside the model: torch.py's (optimizer, optim, lr_scheduler,
# callbacks, loops, rng_state, ...) plus what torchtitan adds (dataloader, train_state) and numbered
# optimizers and schedulers (Lightning's optimizer_0, torchtitan's lr_scheduler_0 inside lists).
NOT_MODEL_KEYS = torch_file.IGNORED_KEYS | {"dataloader", "data_loader", "train_state"}
_NUMBERED_STATE = re.compile(r"(optimizer|optim|lr_scheduler|scheduler)_\d+")
MODEL_PREFIXES = ("app.model.", "model.", "")


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


# --- what .metadata may name ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dtype:
    """A ``torch.<name>`` dtype global: ``code`` is wdiff's spelling, or ``torch.<name>`` when wdiff
    does not read that dtype (complex128, quantized, sub-byte)."""

    name: str

    @property
    def code(self) -> str:
        return TORCH_DTYPES[self.name][0] or f"torch.{self.name}"


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
    allowed.update({("torch", n): _Dtype(n) for n in TORCH_DTYPES})
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
    if not (
        isinstance(value, tuple) and len(value) <= torch_file.MAX_DIMS and all(_is_uint(d) for d in value)
    ):
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

    Weights are the tensor names outside the ``NOT_MODEL_KEYS`` namespaces (also under ``app.``); the prefix
    is the first of ``MODEL_PREFIXES`` every weight has (``""``: the top level, as torchtitan saves)."""
    weights = []
    for name in names:
        first = name.removeprefix("app.").split(".", 1)[0]
        if first not in NOT_MODEL_KEYS and not _NUMBERED_STATE.fullmatch(first):
            weights.append(name)
    for prefix in MODEL_PREFIXES:
        if weights and all(n.startswith(prefix) for n in weights):
            return prefix, weights
    return "", weights


# --- one item: a torch.save zip inside a .distcp file ---------------------------------------------
# An item is read with readers.torch's own zip, data.pkl and tensor-view code (``zip_entries``,
# ``read_record``, ``allowed_globals``, ``locate``), so the rules for a torch.save zip have one owner; only
# the window (an item is a zip inside a bigger file) and the cache of parsed data.pkl bytes are here.


class _Window(PositionedFile):
    """Bytes ``[base, base + length)`` of an open file, as a file of their own: one item's zip, which
    torch.py's zip reader then reads exactly as it reads a whole torch.save file."""

    def __init__(self, f: BinaryIO, base: int, length: int) -> None:
        super().__init__(length)
        self.fd, self.base = f.fileno(), base

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = os.pread(self.fd, end - self.pos, self.base + self.pos)
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)


@dataclass(frozen=True)
class _StorageName:
    """A persistent id of data.pkl, before it is matched with the item's entries (data.pkl bytes repeat
    across items; the entries' offsets do not)."""

    kind: object
    key: object
    numel: object


def _storage_name(pid: object) -> _StorageName:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
        raise ValueError(f"a persistent id {describe(pid)} that is not a torch storage")
    _, kind, key, _location, numel = pid
    return _StorageName(kind, key.decode("ascii", "replace") if isinstance(key, bytes) else key, numel)


def _chunk_ref(
    f: BinaryIO, file: str, info: StorageInfo, fqn: str, chunk: Chunk, parsed: dict[bytes, object]
) -> TensorRef | Skipped:
    """Where one chunk's elements are in ``file``, from its item's zip directory and data.pkl.

    ``parsed`` keeps each distinct data.pkl's result for the whole folder: chunks of one shape and dtype
    pickle to the same bytes, so a folder of thousands of items unpickles a few dozen."""
    where = f"{fqn} chunk at {list(chunk.offsets)} (item at byte {info.offset})"
    window = _Window(f, info.offset, info.length)
    try:
        if window.read(4) != b"PK\x03\x04":
            window.seek(8)
            if window.read(1) == b"{":  # an 8-byte length then JSON: safetensors
                raise WdiffError(
                    file,
                    "item is a safetensors blob (FileSystemWriter serialization_format=SAFETENSORS), "
                    "which wdiff does not read (nor does torch's FileSystemReader)",
                )
            raise WdiffError(file, "item is not a torch.save zip")
        # The zip must fill the item exactly: zipfile would also accept a zip that ends before the
        # item does (trailing bytes) or starts after it (bytes prepended), e.g. the next item's zip
        # inside a too-long range, and that is another tensor's data.
        window.seek(max(info.length - _EOCD_SIZE, 0))
        tail = window.read(_EOCD_SIZE)
        if len(tail) != _EOCD_SIZE or tail[:4] != b"PK\x05\x06" or tail[20:] != b"\0\0":
            raise WdiffError(file, "no end-of-archive record where the item's length ends")
        folder, entries, archive = torch_file.zip_entries(window, file, info.length)
        if archive.infolist()[0].header_offset != 0:
            raise WdiffError(file, "the item's zip does not start at the item's offset")
        if "data.pkl" not in entries:
            raise WdiffError(file, f"item has no {folder}/data.pkl: not a torch.save")
        if "byteorder" in entries:
            order = torch_file.read_record(window, file, archive, folder, entries["byteorder"], 16)
            if order != b"little":
                raise WdiffError(
                    file, f"item's byteorder is {describe(order)}: wdiff reads little-endian data"
                )
        data = torch_file.read_record(window, file, archive, folder, entries["data.pkl"], MAX_DATA_PKL_BYTES)
        if data not in parsed:
            # only what torch.save writes for one tensor; anything else is refused
            allowed = torch_file.allowed_globals(file)
            parsed[data] = restricted_load(data, file, allowed, persistent_load=_storage_name)
        tensor = parsed[data]
        if isinstance(tensor, torch_file.Unread):
            return Skipped(fqn, f"{tensor.reason}: not read")
        if not isinstance(tensor, torch_file.RebuiltTensor) or not isinstance(tensor.storage, _StorageName):
            raise WdiffError(file, f"item holds {describe(tensor)}, not one tensor")
        name = tensor.storage
        entry = entries.get(f"data/{name.key}") if isinstance(name.key, str) else None
        if not isinstance(name.kind, torch_file.StorageType) or type(name.numel) is not int or entry is None:
            raise WdiffError(
                file, f"data.pkl names storage {describe(name.key)}, which the item does not hold"
            )
        if not entry.stored or name.numel * torch_file.TORCH_DTYPES[name.kind.dtype][1] != entry.size:
            raise WdiffError(file, f"storage {describe(name.key)} is not {name.numel} stored elements")
        # the entry's offset in the .distcp file, so the located range is one of that file
        storage = torch_file.Storage(
            name.key, name.kind.dtype, replace(entry, offset=info.offset + entry.offset)
        )
        return torch_file.locate(fqn, replace(tensor, storage=storage), file)
    except WdiffError as e:
        raise WdiffError(file, f"{where}: {e.problem}") from None


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
    locate: Callable[[Chunk, StorageInfo], TensorRef | Skipped],
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

    located: dict[Chunk, TensorRef] = {}  # each chunk's own elements, row-major, in one byte range
    for chunk in entry.chunks:
        if 0 in chunk.sizes:  # holds no element: its item (torch 2.13 writes one) is not needed
            continue
        info = meta.storage.get((fqn, chunk.offsets))
        if info is None:
            raise WdiffError(
                metadata_path, f"tensor {_shown(fqn)}: chunk at {list(chunk.offsets)} has no storage entry"
            )
        got = locate(chunk, info)
        if isinstance(got, Skipped):
            return Skipped(name, got.reason)
        if got.dtype != entry.dtype or got.shape != chunk.sizes:
            raise WdiffError(
                got.path,
                f"{fqn} chunk at {list(chunk.offsets)}: holds {got.dtype} {list(got.shape)} where the "
                f"metadata says {entry.dtype} {list(chunk.sizes)}",
            )
        if isinstance(got, PiecesRef):  # long strided runs: possible, never seen from DCP (it clones)
            return Skipped(name, "a chunk is saved as a strided view, not in row-major order: not read")
        located[chunk] = got
    if not runs:  # no elements: an empty tensor
        file = next((r.path for r in located.values()), metadata_path)
        return TensorRef(name, entry.dtype, entry.shape, file, 0, 0)
    pieces: list[Piece] = []
    for start, length, chunk, k in runs:
        ref = located[chunk]
        offset = ref.offset + k * length * width
        last = pieces[-1] if pieces else None
        if last is not None and last.path == ref.path and last.offset + last.count * width == offset:
            pieces[-1] = Piece(
                last.start, last.count + length, ref.path, last.offset
            )  # consecutive on disk too
        else:
            pieces.append(Piece(start, length, ref.path, offset))
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
        absolute = os.path.isabs(relative) or relative.startswith(("/", "\\"))
        if not relative or "\0" in relative or not encodable(relative) or absolute:
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
    if is_url(folder):
        raise WdiffError(folder, LOCAL_ONLY.format(kind="torch.distributed.checkpoint folders"))
    folder = Path(folder)
    if folder.name == METADATA_NAME and not folder.is_dir():  # the .metadata file given for its folder
        folder = folder.parent
    metadata_path = str(folder / METADATA_NAME)
    meta = read_metadata(metadata_path)
    # bytes entries (ints, dicts, BytesIO) are not weights
    entries = {n: e for n, e in meta.entries.items() if isinstance(e, TensorEntry)}
    prefix, names = model_prefix(entries)
    if not names:
        tops = ", ".join(dict.fromkeys(_shown(n.split(".", 1)[0]) for n in meta.entries))
        only = " (only optimizer or training state)" if entries else ""
        raise WdiffError(
            metadata_path, f"holds no model weights{only}; top-level names: {tops[:200] or 'none'}"
        )
    files = _Files(folder, metadata_path)
    parsed: dict[bytes, object] = {}

    def locator(fqn: str) -> Callable[[Chunk, StorageInfo], TensorRef | Skipped]:
        def locate(chunk: Chunk, info: StorageInfo) -> TensorRef | Skipped:
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
            return _chunk_ref(f, path, info, fqn, chunk, parsed)

        return locate

    tensors: dict[str, TensorRef] = {}
    skipped: list[Skipped] = []
    try:
        for fqn in names:
            name = fqn[len(prefix) :]
            got = _tensor(name, fqn, entries[fqn], meta, locator(fqn), metadata_path)
            if isinstance(got, Skipped):
                skipped.append(got)
            else:
                tensors[name] = got
    except OSError as e:  # an I/O error while reading a header (the checks above name bad bytes)
        raise WdiffError(folder, f"cannot read: {e.strerror or e}") from None
    finally:
        files.close()
    return TorchContents(
        tensors, tuple(skipped), prefix.removesuffix(".") or None, last_number(folder.resolve().name)
    )
