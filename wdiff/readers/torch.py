"""``torch.save`` files (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``), read without torch and without
running pickle code.

A ``torch.save`` file (torch >= 1.6) is an uncompressed ZIP: ``ARCHIVE/data.pkl`` is a protocol-2 pickle
of the saved object in which every tensor is a call of ``torch._utils._rebuild_tensor_v2`` (or kin) on a
storage named by a persistent id, and ``ARCHIVE/data/<key>`` holds that storage's raw bytes. wdiff reads
``data.pkl`` with ``wdiff.readers.pickle.restricted_load``, turning each tensor into a byte range of the
file (``TensorRef``), finds the model's state dict in what was saved (a bare state dict, or one wrapped
by Lightning, DeepSpeed or a training script), and never reads a storage here: compute reads the bytes.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from wdiff.errors import WdiffError
from wdiff.readers.base import (
    Contents,
    Piece,
    PiecesRef,
    Skipped,
    TensorRef,
    first_bytes,
    open_regular,
    size_of,
)
from wdiff.readers.pickle import (
    MAX_PICKLE_BYTES,
    RUNS_CODE,
    Global,
    Placeholder,
    describe,
    plain_containers,
    restricted_load,
    with_placeholders,
)

# torch dtype (its name after ``torch.``) -> (wdiff dtype code or None if wdiff does not read it, bytes
# per element). Sub-byte and quantized dtypes have no byte-per-element layout wdiff can decode.
TORCH_DTYPES: dict[str, tuple[str | None, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
    "float8_e8m0fnu": ("F8_E8M0", 1),
    "bool": ("BOOL", 1),
    "uint8": ("U8", 1),
    "int8": ("I8", 1),
    "int16": ("I16", 2),
    "uint16": ("U16", 2),
    "int32": ("I32", 4),
    "uint32": ("U32", 4),
    "int64": ("I64", 8),
    "uint64": ("U64", 8),
    "complex64": ("C64", 8),
    "complex128": (None, 16),
    "complex32": (None, 4),
    "float4_e2m1fn_x2": (None, 1),  # two values per byte: torch's shape counts bytes, wdiff's F4 values
    "qint8": (None, 1),
    "quint8": (None, 1),
    "qint32": (None, 4),
    "quint4x2": (None, 1),
    "quint2x4": (None, 1),
    "bits8": (None, 1),
    "bits16": (None, 2),
    "bits1x8": (None, 1),
    "bits2x4": (None, 1),
    "bits4x2": (None, 1),
    **{f"{sign}int{n}": (None, 1) for sign in ("", "u") for n in range(1, 8)},
}

# Legacy typed storage classes (torch/storage.py ``_dtype_to_storage_type_map``); dtypes added since
# are saved as ``UntypedStorage`` with the dtype passed to ``_rebuild_tensor_v3``.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

# Where a wrapped checkpoint keeps the model's weights, tried in this order at every level (so
# ``{"model": {"module": sd}}`` is found as ``model.module``): Lightning, common training scripts,
# DeepSpeed (``module``). Only a key whose value holds tensors counts.
STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "weights")
# Training state saved beside the weights: never taken for the model.
IGNORED_KEYS = frozenset(
    {
        "optimizer", "optimizers", "optimizer_states", "optimizer_state", "optimizer_state_dict", "optim",
        "opt", "lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "scaler", "grad_scaler",
        "amp", "loops", "callbacks", "rng_state", "rng_states", "hyper_parameters", "hparams",
    }
)  # fmt: skip
STEP_KEYS = ("global_step", "global_steps", "step", "iteration")  # global_steps: DeepSpeed

INT64 = 1 << 63  # torch sizes, strides and offsets are int64: bigger ones are damage
MAX_DIMS = 64
MAX_DEPTH = 64  # nesting of dicts searched for weights
MAX_PIECES = 65_536  # a strided view is read as contiguous runs only when they are few and long
MIN_PIECE = 64  # elements per run on average

LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
LEGACY_HINT = (
    "is a legacy (pre-1.6, non-zip) torch.save file, which wdiff does not read; resave it once with a "
    "torch that reads it: python -c \"import torch; torch.save(torch.load('IN', weights_only=True), 'OUT')\" "
    "(or save it as safetensors)"
)
BIG_ENDIAN_HINT = (
    "was saved on a big-endian machine (byteorder 'big'), which wdiff does not read; load and resave it "
    'with torch on a little-endian machine (torch.load swaps the bytes): python -c "import torch; '
    "torch.save(torch.load('IN', weights_only=True), 'OUT')\""
)
ZERO3_HINT = (
    "holds DeepSpeed ZeRO-3 partitions (the module's tensors are empty; the weights are split across "
    "zero_pp_rank_*_optim_states.pt): run DeepSpeed's zero_to_fp32.py once, then point wdiff at its output"
)
_TORCH_RECORDS = (
    "data.pkl",
    "byteorder",
    "version",
    ".format_version",
    ".storage_alignment",
    "constants.pkl",
)


# What the PyTorch readers return: every reader's ``Contents``. ``tensors``: the model's weights by
# state-dict name (PiecesRef for strided views); ``skipped``: tensors found but not read, with the
# reason; ``state_key``: where the weights were found (None: the top object, else e.g. "model.module");
# ``step``: the training step stored in the file (global_step/step/iteration/global_steps), if an int.
TorchContents = Contents


# ---- sniffing -------------------------------------------------------------------------------------------


def looks_like_torch_zip(path: str | os.PathLike[str]) -> bool:
    """A ZIP whose first entry is a torch record (``ARCHIVE/data.pkl``, ``ARCHIVE/data/0``, ...)."""
    head = first_bytes(path, 30 + 512)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return False
    (n,) = struct.unpack("<H", head[26:28])
    name = head[30 : 30 + n].decode("utf-8", "replace")
    archive, slash, record = name.partition("/")
    return bool(archive and slash) and (record in _TORCH_RECORDS or record.startswith(("data/", ".data/")))


def looks_like_legacy_torch(path: str | os.PathLike[str]) -> bool:
    """The pre-1.6 format: a pickle whose first value is torch's magic number (protocol 2: right after
    ``PROTO``; protocol 4 puts a FRAME before it)."""
    head = first_bytes(path, 32)
    return head[:1] == b"\x80" and b"\x8a\x0a" + LEGACY_MAGIC in head


# ---- the zip archive ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZipEntry:
    """One entry of a torch.save zip archive, as ``zip_entries`` located it."""

    name: str  # inside the archive folder: "data.pkl", "data/0"
    offset: int  # absolute offset of the entry's first data byte
    size: int  # uncompressed size
    stored: bool  # ZIP_STORED (no compression, no encryption): a byte range of the file


def zip_entries(f: BinaryIO, path: str, file_size: int) -> tuple[str, dict[str, ZipEntry], zipfile.ZipFile]:
    """The archive folder name and its entries, located from the central directory and each local
    header (torch pads the local header's extra field so that data starts 64-byte aligned)."""
    try:
        archive = zipfile.ZipFile(f)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            NotImplementedError, UnicodeDecodeError, OverflowError, IndexError, KeyError) as e:  # fmt: skip
        raise WdiffError(path, f"not a valid torch.save zip archive: {_why(e)}") from None
    if not infos:
        raise WdiffError(path, "not a valid torch.save zip archive: it has no entries")
    # torch's reader (caffe2 PyTorchStreamReader) takes the folder of the first entry as the archive's.
    folder, slash, _ = infos[0].filename.partition("/")
    if not slash:
        raise WdiffError(
            path, f"not a torch.save archive: first entry {_quote(infos[0].filename)} is in no folder"
        )
    entries: dict[str, ZipEntry] = {}
    for info in infos:
        top, slash, name = info.filename.partition("/")
        if top != folder or not slash:
            continue  # torch only looks up records under the archive folder
        if name in entries:
            raise WdiffError(path, f"zip archive has two entries named {_quote(info.filename)}")
        if info.header_offset < 0:
            raise WdiffError(path, f"zip entry {_quote(info.filename)} has a negative offset")
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise WdiffError(
                path, f"zip entry {_quote(info.filename)}: no local header at offset {info.header_offset}"
            )
        n, m = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + n + m
        stored = (
            info.compress_type == zipfile.ZIP_STORED
            and not info.flag_bits & 0x1  # encrypted
            and info.compress_size == info.file_size
        )
        if start + info.compress_size > file_size:
            raise WdiffError(
                path,
                f"zip entry {_quote(info.filename)} runs past the end of the file (data at {start}, "
                f"{info.compress_size} bytes, file {file_size} bytes): truncated?",
            )
        entries[name] = ZipEntry(name, start, info.file_size, stored)
    return folder, entries, archive


def read_record(
    f: BinaryIO, path: str, archive: zipfile.ZipFile, folder: str, entry: ZipEntry, limit: int
) -> bytes:
    """A small record (data.pkl, byteorder): stored ones read by offset; a compressed one (a re-zipped
    file) is inflated by zipfile up to ``limit`` bytes, checking its CRC."""
    if entry.size > limit:
        raise WdiffError(
            path, f"{folder}/{entry.name} of {entry.size} bytes is over the {limit >> 20} MiB limit"
        )
    if entry.stored:
        f.seek(entry.offset)
        data = f.read(entry.size)
        if len(data) != entry.size:
            raise WdiffError(path, f"{folder}/{entry.name} is truncated")
        return data
    try:
        with archive.open(f"{folder}/{entry.name}") as member:
            data = member.read(limit + 1)
    except Exception as e:  # BadZipFile (CRC), zlib.error, LZMAError, NotImplementedError, RuntimeError
        raise WdiffError(path, f"cannot read {folder}/{entry.name}: {_why(e)}") from None
    if len(data) > limit:
        raise WdiffError(path, f"{folder}/{entry.name} inflates past the {limit >> 20} MiB limit")
    return data


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:110] + "..."


def _quote(name: str) -> str:
    return describe(name)


# ---- what data.pkl's globals become ---------------------------------------------------------------------


@dataclass(frozen=True)
class _DType:
    name: str  # torch's: "float32"


@dataclass(frozen=True)
class StorageType:
    """A storage class a pickle names (``torch.FloatStorage``), standing for its element dtype."""

    name: str  # "FloatStorage", "UntypedStorage"
    dtype: str  # torch dtype of its elements ("uint8" for untyped storages, as torch.load uses)


@dataclass(frozen=True, eq=False)
class Storage:
    """A storage the pickle's ``persistent_load`` asked for: its record key, dtype and zip entry."""

    key: str
    dtype: str
    entry: ZipEntry


@dataclass(frozen=True, eq=False)
class RebuiltTensor:
    """``_rebuild_tensor*``'s arguments, checked when the tensor's name is known (see ``locate``)."""

    storage: object
    storage_offset: object
    size: object
    stride: object
    dtype: object  # a _DType, or None: the storage's dtype
    metadata: object  # conj/neg bits: a view whose stored values are not its values


@dataclass(frozen=True)
class Unread:
    """A tensor wdiff does not read (sparse, quantized, nested, meta, a subclass), and why."""

    reason: str


def _tensor(storage, storage_offset, size, stride, requires_grad=None, backward_hooks=None, metadata=None):
    return RebuiltTensor(storage, storage_offset, size, stride, None, metadata)


def _tensor_v1(storage, storage_offset, size, stride):
    return RebuiltTensor(storage, storage_offset, size, stride, None, None)


def _tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return RebuiltTensor(storage, storage_offset, size, stride, dtype, metadata)


def _parameter(data, requires_grad=None, backward_hooks=None, state=None):
    return data  # an nn.Parameter holds its tensor's bytes


def _device_copy(data, dtype=None, device=None, requires_grad=None):
    # ``_rebuild_device_tensor_from_cpu_tensor``: a CPU tensor moved to a device at load; a dtype change
    # would alter the values, so only an unchanged dtype is the stored tensor.
    if isinstance(data, RebuiltTensor) and (dtype is None or dtype == data.dtype or data.dtype is None):
        return RebuiltTensor(data.storage, data.storage_offset, data.size, data.stride, dtype, data.metadata)
    return Unread("a device tensor rebuilt with a dtype conversion")


_REBUILDS = (_tensor, _tensor_v1, _tensor_v3, _parameter, _device_copy)


def _unread(reason: str) -> Callable[..., Unread]:
    return lambda *args, **kwargs: Unread(reason)


def _from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: a tensor subclass (or a tensor with Python attributes)
    rebuilt by ``func(*args)``; plain tensors and parameters keep their bytes."""
    if func not in _REBUILDS or not isinstance(args, tuple):
        return Unread(f"rebuilt by {describe(func)}")
    made = func(*args)
    if isinstance(new_type, Global) and str(new_type) in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        return made
    return Unread(f"a tensor subclass ({describe(new_type)})")


def _size(*args: object) -> tuple[object, ...]:
    # torch.Size((2, 3)): REDUCE passes the dims as one tuple/list
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def allowed_globals(path: str) -> dict[tuple[str, str], object]:
    """Every global a torch.save pickle may name, and what it becomes."""
    allowed: dict[tuple[str, str], object] = dict(plain_containers(path))
    for name in TORCH_DTYPES:
        allowed[("torch", name)] = _DType(name)
    for storage, dtype in STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda"):  # torch.load maps any "*Storage" name by its class name
            allowed[(module, storage)] = StorageType(storage, dtype)
    for module in ("torch.storage", "torch"):
        allowed[(module, "UntypedStorage")] = StorageType("UntypedStorage", "uint8")
    rebuilds = {
        "_rebuild_tensor": _tensor_v1,
        "_rebuild_tensor_v2": _tensor,
        "_rebuild_tensor_v3": _tensor_v3,
        "_rebuild_parameter": _parameter,
        "_rebuild_parameter_with_state": _parameter,
        "_rebuild_device_tensor_from_cpu_tensor": _device_copy,
        "_rebuild_sparse_tensor": _unread("a sparse tensor"),
        "_rebuild_nested_tensor": _unread("a nested tensor"),
        "_rebuild_qtensor": _unread("a quantized tensor"),
        "_rebuild_meta_tensor_no_storage": _unread("a meta tensor (no data)"),
        "_rebuild_wrapper_subclass": _unread("a tensor subclass without storage"),
        "_rebuild_device_tensor_from_numpy": _unread("a device tensor saved as a numpy array"),
        "_rebuild_xla_tensor": _unread("a device tensor saved as a numpy array"),
    }
    for name, factory in rebuilds.items():
        allowed[("torch._utils", name)] = factory
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = _from_type
    allowed[("torch.tensor", "_rebuild_from_type_v2")] = _from_type  # torch.load's old module name
    allowed[("torch", "Size")] = _size
    for module, name in [("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "device"),
                         ("torch.serialization", "_get_layout")]:  # fmt: skip
        allowed[(module, name)] = Global(module, name)
    return allowed


# ---- the reader -----------------------------------------------------------------------------------------


def read_torch(path: str | os.PathLike[str]) -> TorchContents:
    """The model weights in a ``torch.save`` file, as byte ranges of it; see the module notes."""
    path = os.fspath(path)
    folder, entries, data = _open(path)
    return _load(data, path, folder, entries)


def _open(path: str) -> tuple[str, dict[str, ZipEntry], bytes]:
    """The archive folder, its entries and ``data.pkl``; refuses what is not a readable torch.save zip."""
    try:
        with open_regular(path) as f:
            size = size_of(f)
            head = f.read(32)
            if head[:1] == b"\x80" and b"\x8a\x0a" + LEGACY_MAGIC in head:
                raise WdiffError(path, LEGACY_HINT)
            if head[:4] != b"PK\x03\x04":
                raise WdiffError(path, "not a torch.save file (no zip archive, no legacy torch pickle)")
            folder, entries, archive = zip_entries(f, path, size)
            if "constants.pkl" in entries and "code/" in {n[:5] for n in entries}:
                raise WdiffError(
                    path,
                    "is a TorchScript archive (torch.jit.save), which wdiff does not read; save the model's "
                    "state_dict() with torch.save or safetensors instead",
                )
            if "data.pkl" not in entries:
                raise WdiffError(path, f"not a torch.save archive: no {folder}/data.pkl")
            if "byteorder" in entries:
                order = read_record(f, path, archive, folder, entries["byteorder"], 16)
                if order == b"big":
                    raise WdiffError(path, BIG_ENDIAN_HINT)
                if order != b"little":
                    raise WdiffError(path, f"{folder}/byteorder is {describe(order[:16])}, not little or big")
            data = read_record(f, path, archive, folder, entries["data.pkl"], MAX_PICKLE_BYTES)
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    return folder, entries, data


def _load(data: bytes, path: str, folder: str, entries: dict[str, ZipEntry]) -> TorchContents:
    """Unpickle ``data.pkl`` (storages located in ``entries``) and find the weights in it."""
    storages: dict[str, Storage] = {}

    def persistent_load(pid: object) -> Storage:
        # ("storage", storage_type, key, location, numel); torch.load reuses one storage per key
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise WdiffError(
                path, f"data.pkl has a persistent id {describe(pid)} that is not a torch storage"
            )
        _, kind, key, _location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(kind, StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise WdiffError(path, f"data.pkl names storage {describe(key)} with a malformed persistent id")
        if key in storages:
            return storages[key]
        entry = entries.get(f"data/{key}")
        if entry is None:
            raise WdiffError(path, f"storage {folder}/data/{_short(key)} named in data.pkl is missing")
        if not entry.stored:
            raise WdiffError(
                path,
                f"storage {folder}/data/{_short(key)} is compressed or encrypted (torch.save stores "
                "storages uncompressed; was the file re-zipped?)",
            )
        itemsize = TORCH_DTYPES[kind.dtype][1]
        if numel < 0 or numel * itemsize != entry.size:
            raise WdiffError(
                path,
                f"storage {folder}/data/{_short(key)} holds {entry.size} bytes, but data.pkl gives it "
                f"{describe(numel)} {kind.dtype} elements",
            )
        storages[key] = Storage(key, kind.dtype, entry)
        return storages[key]

    allowed = with_placeholders(allowed_globals(path), prefixes=[""], refused=RUNS_CODE)
    obj = restricted_load(data, path, allowed, persistent_load)
    return _contents(obj, path)


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:32] + "..."


def _holds_tensors(obj: object, depth: int = 0, seen: set[int] | None = None) -> bool:
    if isinstance(obj, (RebuiltTensor, Unread)):
        return True
    if not isinstance(obj, dict) or depth > MAX_DEPTH:
        return False
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    return any(_holds_tensors(v, depth + 1, seen) for k, v in obj.items() if k not in IGNORED_KEYS)


def _find_state(obj: object, path: str) -> tuple[dict[object, object], str | None]:
    """The state dict and where it was: a dict with tensors among its values, else the first of
    ``STATE_KEYS`` holding tensors (searched again inside it), else the dict itself if its non-training
    entries hold tensors in nested dicts."""
    if isinstance(obj, Placeholder):
        kind = f"{obj.module}.{obj.name}"
        hint = (
            " (a whole pickled model: save model.state_dict() instead)"
            if "_parameters" in obj.attributes()
            else ""
        )
        raise WdiffError(path, f"holds a {_short(kind)} object, not a state dict of tensors{hint}")
    if not isinstance(obj, dict):
        raise WdiffError(path, f"holds {describe(obj)}, not a state dict of tensors")
    if set(obj) == {"state", "param_groups"}:
        raise WdiffError(path, "is an optimizer state (optimizer.state_dict()), not model weights")
    where: list[str] = []
    current: dict[object, object] = obj
    for _ in range(MAX_DEPTH):
        if any(isinstance(v, (RebuiltTensor, Unread)) for v in current.values()):
            break
        inner = next(
            (k for k in STATE_KEYS if isinstance(current.get(k), dict) and _holds_tensors(current[k])), None
        )
        if inner is None:
            break
        where.append(inner)
        current = current[inner]  # type: ignore[assignment]
    if not _holds_tensors(current):
        keys = ", ".join(_short(str(k)) for k in list(obj)[:12] if isinstance(k, (str, int)))
        only = (
            " (only optimizer or training state)"
            if any(_holds_tensors(obj.get(k)) for k in IGNORED_KEYS)
            else ""
        )
        raise WdiffError(path, f"holds no model weights{only}; top-level keys: {keys or 'none'}")
    return current, ".".join(where) or None


def _step(obj: object) -> int | None:
    if not isinstance(obj, dict):
        return None
    for key in STEP_KEYS:
        value = obj.get(key)
        if type(value) is int and value >= 0:
            return value
    return None


def _contents(obj: object, path: str) -> TorchContents:
    state, state_key = _find_state(obj, path)
    tensors: dict[str, TensorRef] = {}
    skipped: list[Skipped] = []
    seen: set[int] = set()

    def walk(d: dict[object, object], prefix: str, depth: int) -> None:
        if id(d) in seen or depth > MAX_DEPTH:
            return
        seen.add(id(d))
        for key, value in d.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                continue
            if depth == 0 and state_key is None and key in IGNORED_KEYS and isinstance(value, dict):
                continue  # training state beside nested weights, not weights
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".", depth + 1)
            elif isinstance(value, (RebuiltTensor, Unread)):
                if name in tensors or any(s.name == name for s in skipped):
                    skipped.append(
                        Skipped(name, "a second tensor with this name (a key with dots and a nested dict)")
                    )
                    continue
                got = locate(name, value, path)
                if isinstance(got, Skipped):
                    skipped.append(got)
                else:
                    tensors[name] = got

    walk(state, "", 0)
    contents = TorchContents(tensors, tuple(skipped), state_key, _step(obj))
    _refuse_zero3(obj, contents, path)
    return contents


def _refuse_zero3(obj: object, contents: TorchContents, path: str) -> None:
    """DeepSpeed ZeRO-3's ``mp_rank_00_model_states.pt`` keeps empty stand-ins in ``module`` and the
    real shapes in ``param_shapes``; its weights are partitioned over the optimizer-state files."""
    if not isinstance(obj, dict) or "ds_version" not in obj or not contents.tensors:
        return
    shapes = obj.get("param_shapes")
    for group in shapes if isinstance(shapes, list) else ():
        for name, shape in group.items() if isinstance(group, dict) else ():
            ref = contents.tensors.get(name) if isinstance(name, str) else None
            if ref is not None and ref.numel == 0 and isinstance(shape, tuple) and 0 not in shape:
                raise WdiffError(path, ZERO3_HINT)


def _ints(value: object, what: str, name: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise WdiffError(path, f"tensor {_quote(name)}: {what} is {describe(value)}, not a list of sizes")
    if not all(type(x) is int and 0 <= x < INT64 for x in value):
        raise WdiffError(path, f"tensor {_quote(name)}: {what} {_shown_ints(value)} is not a list of sizes")
    return tuple(value)  # type: ignore[arg-type]


def _shown_ints(value: tuple[object, ...] | list[object]) -> str:
    return "[" + ", ".join(describe(x) for x in value[:8]) + (", ...]" if len(value) > 8 else "]")


def locate(name: str, t: RebuiltTensor | Unread, path: str) -> TensorRef | Skipped:
    """Where a tensor's elements are in the file: one byte range if it is C-contiguous, contiguous
    runs (``PiecesRef``) for a strided view made of few long runs; anything else is ``Skipped``."""
    if isinstance(t, Unread):
        return Skipped(name, f"{t.reason}: not read")
    storage = t.storage
    if not isinstance(storage, Storage):
        raise WdiffError(path, f"tensor {_quote(name)} is rebuilt from {describe(storage)}, not a storage")
    if t.dtype is None:
        dtype = storage.dtype
    elif isinstance(t.dtype, _DType):
        dtype = t.dtype.name
    else:
        raise WdiffError(path, f"tensor {_quote(name)}: dtype {describe(t.dtype)} is not a torch dtype")
    code, itemsize = TORCH_DTYPES[dtype]
    if code is None:
        return Skipped(name, f"dtype torch.{dtype} is not read")
    if isinstance(t.metadata, dict) and any(t.metadata.get(k) for k in ("neg", "conj")):
        return Skipped(
            name, "a lazily negated or conjugated view (its stored values are not its values): not read"
        )
    if type(t.storage_offset) is not int or not 0 <= t.storage_offset < INT64:
        raise WdiffError(
            path, f"tensor {_quote(name)}: storage offset {describe(t.storage_offset)} is not a size"
        )
    shape = _ints(t.size, "shape", name, path)
    stride = _ints(t.stride, "stride", name, path)
    if len(stride) != len(shape):
        raise WdiffError(
            path, f"tensor {_quote(name)}: shape {list(shape)} and stride {list(stride)} differ in length"
        )
    entry = storage.entry
    base = entry.offset + t.storage_offset * itemsize
    if 0 in shape:  # no elements: nothing to read, wherever the view points
        return TensorRef(name, code, shape, path, entry.offset, 0)
    # Elements the view reaches, in the storage's elements: the extent must fit the stored bytes.
    last = t.storage_offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if (last + 1) * itemsize > entry.size:
        raise WdiffError(
            path,
            f"tensor {_quote(name)} (shape {list(shape)}, stride {list(stride)}, offset {t.storage_offset}) "
            f"reaches past the {entry.size} bytes of its storage {entry.name}",
        )
    numel = math.prod(shape)
    dims = [(n, s) for n, s in zip(shape, stride) if n != 1]  # a size-1 dimension's stride is never used
    run, expected = 1, 1
    while dims and dims[-1][1] == expected:  # the trailing dimensions that are contiguous
        n, _ = dims.pop()
        run *= n
        expected *= n
    if not dims:
        return TensorRef(name, code, shape, path, base, numel * itemsize)
    count = numel // run
    if count > MAX_PIECES or run < MIN_PIECE:
        return Skipped(
            name,
            f"a strided view (shape {list(shape)}, stride {list(stride)}) in {count} runs of {run} "
            "elements: too fragmented to read; save a .contiguous() copy to include it",
        )
    # Start of every run, in row-major order of the outer dimensions (in storage elements).
    starts = np.zeros(1, dtype=np.int64)
    for n, s in dims:
        starts = (starts[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    pieces = tuple(
        Piece(i * run, run, path, base + int(start) * itemsize) for i, start in enumerate(starts.tolist())
    )
    return PiecesRef(name, code, shape, path, pieces[0].offset, numel * itemsize, pieces=pieces)
