"""ONNX models: initializers located by byte offset, in the .onnx file itself or in external data.

The graph is parsed with the ``onnx`` package, from a copy of the model without its weight bytes
(external files are never touched by it). Where each initializer's bytes are:

- ``raw_data`` inside the .onnx file: the protobuf message is a sequence of (tag, value) fields, so a
  short walk over the file's wire format (ModelProto field 7 ``graph`` -> GraphProto field 5
  ``initializer`` -> TensorProto field 9 ``raw_data``) gives the absolute offset of every initializer's
  bytes (``_without_raw_data``); the k-th ``initializer`` field is ``graph.initializer[k]``. The same
  walk copies the model without those bytes, and onnx parses that copy: weights are never loaded into
  memory. Compute then ``pread``s them like safetensors data.
- typed fields (``float_data``, ``int32_data`` holding FLOAT16/BFLOAT16/FLOAT8 bit patterns,
  ``double_data``, ...): varint-encoded, so not readable in place. They are small by construction
  (protobuf's 2 GB limit; big models use external data), so they are decoded with
  ``onnx.numpy_helper`` and written once to a content-addressed file in wdiff's cache folder, which
  compute reads like any other file (``materialise``).
- external data (``data_location = EXTERNAL``): ``location``/``offset``/``length`` are checked the way
  the onnx library checks them (GHSA-538c-55jv-c5g9 and the onnx 1.23 C++ ``_open_external_data``):
  no absolute path, no ``..``, no symlink anywhere on the path, no hard link, a regular file, offset and
  length inside the file, and length == prod(dims) x itemsize. The bytes are never read here.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
import stat
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from wdiff.errors import WdiffError
from wdiff.readers.base import DTYPES, TensorRef, open_input, open_regular
from wdiff.readers.remote import LOCAL_ONLY, is_url

# onnx TensorProto.DataType -> wdiff dtype code (docs/formats.md). Kinds with no entry (STRING,
# COMPLEX128, the 4-bit kinds, ...) are not listed as tensors.
ONNX_DTYPES = {
    1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16",
    11: "F64", 12: "U32", 13: "U64", 14: "C64", 16: "BF16", 17: "F8_E4M3", 18: "F8_E4M3FNUZ",
    19: "F8_E5M2", 20: "F8_E5M2FNUZ", 24: "F8_E8M0",
}  # fmt: skip

_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
CACHE_ENV = "WDIFF_CACHE"  # where decoded typed-field tensors are kept (default: a per-user temp folder)


@dataclass(frozen=True)
class Use:
    """One place an initializer is consumed: node ``node`` (index in the topologically sorted
    ``graph.node``) of type ``op`` takes it as input ``input``."""

    op: str
    input: int
    node: int


@dataclass(frozen=True)
class OnnxRef(TensorRef):
    """An ONNX initializer: where its bytes are, plus its place in the graph (for matching across a
    sequence of exports whose made-up names differ)."""

    uses: tuple[Use, ...] = ()
    order: int = 0  # position in graph.initializer


def looks_like_onnx(path: str | os.PathLike[str]) -> bool:
    """Sniff a serialized ModelProto: field 1 ``ir_version`` (varint, tag 0x08) with a plausible
    version, followed by another ModelProto field tag."""
    try:
        with open_regular(path) as f:
            head = f.read(3)
    except WdiffError:
        return False
    # tags of ModelProto fields 2-8, 14, 20, 25 (producer_name ... opset_import, metadata, functions)
    return len(head) == 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _MODEL_TAGS


_MODEL_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA}


# --- protobuf wire format: just enough to find byte ranges ------------------------------------------


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap | bytes, pos: int, end: int):
    """Yield (field number, wire type, field start, value start, value end) of one message in
    buf[pos:end]; the field (tag, length prefix and value) spans buf[field start:value end]."""
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, after = _varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unsupported wire type {wire}")
        if after > end:
            raise ValueError("field runs past the end of its message")
        yield number, wire, field_start, pos, after
        pos = after


def _length_delimited(number: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _without_raw_data(path: str) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The model's bytes with every top-level initializer's ``raw_data`` left out, and the (offset,
    length) of each initializer's raw_data in the file, in order (None: it has none).

    The weights are thus never copied into memory (``onnx.load`` would parse them all); only the
    pages holding tags and the non-weight fields are touched. Parent messages get new length
    prefixes; everything else is copied byte for byte, so ``onnx`` parses the same graph.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b"", []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if hasattr(mmap, "MADV_RANDOM"):  # no read-ahead: touch only the pages holding tags
                buf.madvise(mmap.MADV_RANDOM)
            model = bytearray()
            ranges: list[tuple[int, int] | None] = []
            for number, wire, field, start, end in _fields(buf, 0, size):
                if number != 7 or wire != 2:  # not ModelProto.graph: copied as it is
                    model += buf[field:end]
                    continue
                graph = bytearray()
                for g_number, g_wire, g_field, g_start, g_end in _fields(buf, start, end):
                    if g_number != 5 or g_wire != 2:  # not GraphProto.initializer
                        graph += buf[g_field:g_end]
                        continue
                    tensor = bytearray()
                    raw = None
                    for t_number, t_wire, t_field, t_start, t_end in _fields(buf, g_start, g_end):
                        if t_number == 9 and t_wire == 2:  # TensorProto.raw_data (the last one wins)
                            raw = (t_start, t_end - t_start)
                        else:
                            tensor += buf[t_field:t_end]
                    ranges.append(raw)
                    graph += _length_delimited(5, bytes(tensor))
                model += _length_delimited(7, bytes(graph))
            return bytes(model), ranges


# --- external data --------------------------------------------------------------------------------


def _external_ref(model_path: Path, tensor, code: str, shape: tuple[int, ...]) -> tuple[str, int, int]:
    """Check one external-data entry like the onnx library does; return (file, offset, nbytes)."""
    what = f"initializer {tensor.name!r}: an external data entry"
    info = {_text(model_path, e.key, what): _text(model_path, e.value, what) for e in tensor.external_data}
    location = info.get("location", "")
    name = tensor.name
    where = f"initializer {name!r}: external data location {location!r}"
    if not location:
        raise WdiffError(model_path, f"initializer {name!r}: external data has no location")
    if "\0" in location:
        raise WdiffError(model_path, f"{where} contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        raise WdiffError(model_path, f"{where} is an absolute path")
    normal = os.path.normpath(location)  # "sub/../w.bin" is "w.bin", as onnx sees it
    if normal == ".." or normal.startswith(".." + os.sep):
        raise WdiffError(model_path, f"{where} leaves the model's folder ('..')")
    base = model_path.parent
    current = base
    for part in Path(normal).parts:
        current = current / part
        if current.is_symlink():
            raise WdiffError(model_path, f"{where} goes through a symlink ({current})")
    try:  # never blocks on a pipe; refuses what is not a regular file (wdiff.readers.base)
        fd = open_input(current, nofollow=True)
    except WdiffError as e:
        why = e.problem.removeprefix("cannot read: ")
        raise WdiffError(model_path, f"{where}: cannot open: {why}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_nlink > 1:
        raise WdiffError(model_path, f"{where} is a hard link ({st.st_nlink} links)")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else st.st_size - offset
    except ValueError:
        raise WdiffError(model_path, f"{where}: offset/length are not integers") from None
    if offset < 0 or length < 0:
        raise WdiffError(model_path, f"{where}: negative offset {offset} or length {length}")
    if offset + length > st.st_size:
        raise WdiffError(
            model_path,
            f"{where}: offset {offset} + length {length} runs past the end of the {st.st_size}-byte file",
        )
    expected = math.prod(shape) * DTYPES[code].bits // 8
    if length != expected:
        raise WdiffError(
            model_path,
            f"{where}: length {length} but {code} shape {list(shape)} needs {expected} bytes",
        )
    return str(current), offset, length


# --- typed fields -----------------------------------------------------------------------------------


def cache_folder() -> Path:
    """Where decoded typed-field tensors are written (``$WDIFF_CACHE``, else a per-user temp folder)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"wdiff-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"


def materialise(data: bytes, origin: str) -> str:
    """Write ``data`` once to a file in the cache folder named by its content and ``origin`` (the
    model and initializer it comes from); return its path.

    The name keeps the file (and so its size and modification time, which the incremental check
    fingerprints) the same from run to run. ``origin`` keeps two initializers with equal values apart:
    one shared file would make them look like one tied weight. A temporary file renamed into place
    means a concurrent run never sees a half-written file.
    """
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        # a shared temp folder: another user could have made it (or a symlink) to feed us other bytes
        raise WdiffError(folder, f"cache folder is not a folder of this user; set {CACHE_ENV}")
    digest = hashlib.sha256(origin.encode("utf-8", "surrogatepass") + b"\0" + data).hexdigest()
    target = folder / f"onnx-{digest[:40]}.bin"
    try:
        with open_regular(target) as f:
            if f.read(len(data) + 1) == data:  # small by construction: checking costs little
                return str(target)
    except (OSError, WdiffError):
        pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".onnx-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


def _typed_bytes(model_path: Path, tensor, code: str, shape: tuple[int, ...]) -> bytes:
    """Little-endian raw bytes of a tensor stored in typed fields, decoded by onnx itself."""
    import numpy as np
    from onnx import numpy_helper

    try:
        array = numpy_helper.to_array(tensor)
    except Exception as e:  # onnx raises ValueError/TypeError/... on inconsistent fields
        raise WdiffError(model_path, f"initializer {tensor.name!r}: cannot decode: {e}") from None
    if array.shape != shape:
        raise WdiffError(model_path, f"initializer {tensor.name!r}: data does not fill shape {list(shape)}")
    if array.dtype.itemsize * 8 != DTYPES[code].bits:
        raise WdiffError(model_path, f"initializer {tensor.name!r}: decoded as {array.dtype}, not {code}")
    return np.ascontiguousarray(array).tobytes()  # little-endian machines, like the kernels


# --- the reader -------------------------------------------------------------------------------------


def _text(path: Path, value: object, what: str) -> str:
    """protobuf hands back bytes for a string field holding invalid UTF-8 (found by fuzzing)."""
    if not isinstance(value, str):
        raise WdiffError(path, f"{what} is not valid UTF-8")
    return value


def _uses(path: Path, graph, initializers: set[str]) -> tuple[dict[str, list[Use]], dict[str, str]]:
    """Where every value is consumed, and the names that are Identity copies of an initializer.

    The TorchScript exporter deduplicates initializers with equal values (two layers that start
    identical, zero biases): the copy disappears from the initializers and comes back as
    ``Identity(kept) -> copy's name`` (``enc.layers.1.norm2.bias = Identity(enc.layers.0....bias)``,
    ``onnx::MatMul_417 = Identity(onnx::MatMul_376)``). Such an Identity is an alias, not a use:
    the copy's name is returned as a tensor of its own (output name -> initializer name), with the
    copy's consumers as its uses.
    """
    uses: dict[str, list[Use]] = {}
    copies: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        op = _text(path, node.op_type, f"the op type of node {k}")
        names = [_text(path, n, f"an input name of node {k}") for n in node.input]
        outputs = [_text(path, n, f"an output name of node {k}") for n in node.output]
        if op == "Identity" and not node.domain and len(names) == 1 and len(outputs) == 1:
            source = copies.get(names[0], names[0])  # chains of copies lead to the initializer
            if source in initializers and outputs[0] not in initializers and outputs[0]:
                copies[outputs[0]] = source
                continue
        for i, name in enumerate(names):
            if name:
                uses.setdefault(name, []).append(Use(op, i, k))
    return uses, copies


def read_onnx(path: str | os.PathLike[str]) -> dict[str, OnnxRef]:
    """All initializers of an ONNX model, by name, located by byte offset (the fuzzing entry point).

    Raises WdiffError (one line naming the file) for anything that does not parse or does not check.
    """
    if is_url(path):
        raise WdiffError(path, LOCAL_ONLY.format(kind="ONNX models"))
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        blob, raw_ranges = _without_raw_data(str(path))
        model = onnx.load_model_from_string(blob)
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    except (DecodeError, ValueError, RuntimeError) as e:
        raise WdiffError(path, f"not a valid ONNX model: {' '.join(str(e).split())[:200]}") from None
    if not model.HasField("graph"):
        raise WdiffError(path, "not a valid ONNX model: it has no graph")
    graph = model.graph
    if len(raw_ranges) != len(graph.initializer):
        raise WdiffError(path, "the ONNX graph's initializers could not be located in the file")
    uses, copies = _uses(path, graph, {str(t.name) for t in graph.initializer})
    tensors: dict[str, OnnxRef] = {}
    for k, (tensor, raw) in enumerate(zip(graph.initializer, raw_ranges)):
        name = _text(path, tensor.name, f"the name of initializer {k}")
        code = ONNX_DTYPES.get(tensor.data_type)
        if code is None:
            continue  # STRING, COMPLEX128, 4-bit kinds: nothing wdiff computes
        if name in tensors:
            raise WdiffError(path, f"initializer {name!r} is defined twice")
        if any(d < 0 for d in tensor.dims):
            raise WdiffError(path, f"initializer {name!r}: negative dimension in {list(tensor.dims)}")
        shape = tuple(int(d) for d in tensor.dims)
        nbytes = math.prod(shape) * DTYPES[code].bits // 8
        if tensor.data_location == _EXTERNAL:
            file, offset, length = _external_ref(path, tensor, code, shape)
        elif raw is not None:
            file, offset, length = str(path), raw[0], raw[1]
            if length != nbytes:
                raise WdiffError(
                    path,
                    f"initializer {name!r}: raw_data has {length} bytes but {code} shape "
                    f"{list(shape)} needs {nbytes}",
                )
        else:
            data = _typed_bytes(path, tensor, code, shape)
            try:
                file, offset, length = materialise(data, f"{path.resolve()}\0{k}"), 0, len(data)
            except OSError as e:
                where = f"cannot write the decoded initializer {name!r} to {cache_folder()}"
                raise WdiffError(path, f"{where}: {e.strerror or e} (set {CACHE_ENV})") from None
        tensors[name] = OnnxRef(name, code, shape, file, offset, length, tuple(uses.get(name, ())), k)
    for j, (copy, source) in enumerate(copies.items()):  # deduplicated initializers, see _uses
        if source in tensors:
            order = len(graph.initializer) + j
            tensors[copy] = replace(tensors[source], name=copy, uses=tuple(uses.get(copy, ())), order=order)
    return tensors
