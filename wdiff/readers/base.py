"""What every reader hands to the rest of wdiff: where a tensor's bytes are and how to decode them.

A reader answers "which tensors, with what dtype and shape, where" cheaply from headers; the bytes are
read only inside compute, chunk by chunk, by offset.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import ml_dtypes
import numpy as np

from wdiff.errors import WdiffError

MAX_JSON_BYTES = 1 << 30  # index and trainer-state files: real ones are kilobytes to tens of MB


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file read-only, refusing anything but a regular file before a byte is read.

    A named pipe would block ``open`` forever and a device never ends, so the open does not wait
    (O_NONBLOCK, no effect on regular files) and the kind is checked on the open descriptor.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
        raise WdiffError(path, f"cannot read: {kind}, not a regular file")
    return os.fdopen(fd, "rb")


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file from a checkpoint folder, or raise a one-line error naming it.

    Python's json module on purpose: HF writes these files with ``json.dumps``, bare NaN included.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise WdiffError(path, f"{what} of {size} bytes is over the {MAX_JSON_BYTES >> 20} MiB limit")
        try:
            return json.loads(f.read().decode("utf-8"))
        except OSError as e:
            raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise WdiffError(path, f"{what} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class DType:
    """A checkpoint dtype: its size, the numpy type of its raw storage and how wdiff decodes it."""

    code: str  # the safetensors spelling: "BF16", "F8_E4M3", ...
    bits: int
    storage: str  # numpy dtype of the raw elements as stored ("<f4", "<u2", "u1", ...)
    decoded: np.dtype | None  # numpy/ml_dtypes type whose values the raw bits encode; None: not a float

    @property
    def is_float(self) -> bool:
        """Whether wdiff computes weight change for this dtype (real floating point, byte-sized)."""
        return self.decoded is not None


def _dtypes() -> dict[str, DType]:
    table = [
        DType("F64", 64, "<f8", np.dtype("<f8")),
        DType("F32", 32, "<f4", np.dtype("<f4")),
        DType("F16", 16, "<u2", np.dtype("<f2")),
        DType("BF16", 16, "<u2", np.dtype(ml_dtypes.bfloat16)),
        DType("F8_E4M3", 8, "u1", np.dtype(ml_dtypes.float8_e4m3fn)),
        DType("F8_E5M2", 8, "u1", np.dtype(ml_dtypes.float8_e5m2)),
        DType("F8_E4M3FNUZ", 8, "u1", np.dtype(ml_dtypes.float8_e4m3fnuz)),
        DType("F8_E5M2FNUZ", 8, "u1", np.dtype(ml_dtypes.float8_e5m2fnuz)),
        DType("F8_E8M0", 8, "u1", np.dtype(ml_dtypes.float8_e8m0fnu)),
        # Listed so headers validate, left out of the computation (integers, flags, complex, sub-byte).
        DType("BOOL", 8, "u1", None),
        DType("U8", 8, "u1", None),
        DType("I8", 8, "i1", None),
        DType("I16", 16, "<i2", None),
        DType("U16", 16, "<u2", None),
        DType("I32", 32, "<i4", None),
        DType("U32", 32, "<u4", None),
        DType("I64", 64, "<i8", None),
        DType("U64", 64, "<u8", None),
        DType("C64", 64, "<c8", None),
        DType("F4", 4, "u1", None),
        DType("F6_E2M3", 6, "u1", None),
        DType("F6_E3M2", 6, "u1", None),
    ]
    return {d.code: d for d in table}


DTYPES: dict[str, DType] = _dtypes()


@dataclass(frozen=True)
class TensorRef:
    """One tensor of one checkpoint: name, dtype, shape and where its bytes come from.

    The plain source (``source == "bytes"``): the row-major elements lie in one byte range of one file,
    ``nbytes`` from ``offset`` of ``path`` (safetensors, ONNX raw and external data, PyTorch storages).
    Subclasses are the other sources: ``PiecesRef`` (several byte ranges, in element order) and
    ``wdiff.readers.lora.LoraRef`` (computed: a LoRA product). Compute has one path per source kind.
    """

    source: ClassVar[str] = "bytes"

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str  # the file holding the bytes
    offset: int  # absolute byte offset of the first element in ``path``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> DType:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Piece:
    """``count`` consecutive elements (row-major) of a tensor, from element ``start``, stored from byte
    ``offset`` of ``path``."""

    start: int
    count: int
    path: str
    offset: int


@dataclass(frozen=True)
class PiecesRef(TensorRef):
    """A tensor whose row-major elements lie in several byte ranges, in element order, covering it
    exactly (torch.distributed.checkpoint shards, strided PyTorch views). ``path``/``offset`` are the
    first piece's, ``nbytes`` counts the bytes of every piece."""

    source: ClassVar[str] = "pieces"

    pieces: tuple[Piece, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A tensor (or a checkpoint) left out, and why, in words a user reads."""

    name: str
    reason: str


@dataclass(frozen=True)
class Contents:
    """What a reader found in one checkpoint: its tensors, what it saw but could not read, and for a
    pickled checkpoint where the weights were (``state_key``) and the training step it records."""

    tensors: dict[str, TensorRef]
    skipped: tuple[Skipped, ...] = ()
    state_key: str | None = None
    step: int | None = None
