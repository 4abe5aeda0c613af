"""Results on disk: ``accumulated.safetensors`` laid out before compute writes into it, the JSON
wdiff writes, and ``Results``, a finished results folder read back (checked by ``wdiff.schema``, which
names the files and owns the shape of ``summary.json``). Everything downstream (scene, report,
notebooks) reads these files, never checkpoints.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wdiff import timeline
from wdiff.checks import NO_MAP
from wdiff.errors import WdiffError
from wdiff.schema import ACCUMULATED, FRAMES, MAP_DTYPES, NEURON_CHANGE, Summary, map_stored, read_results
from wdiff.timeline import INTERVAL_COLUMNS, LOG_KEYS

if TYPE_CHECKING:
    import pandas
    import xarray


@dataclass(frozen=True)
class MapSlot:
    """Where one tensor's accumulated map is: its results file, the byte offset of element 0, and how
    it is stored (``"F32"``, or ``"BF16"``: accumulated in float32, stored rounded to the nearest even)."""

    path: str
    offset: int
    dtype: str = "F32"

    @property
    def itemsize(self) -> int:
        return MAP_DTYPES[self.dtype]


@dataclass(frozen=True)
class OutputLayout:
    """Where each tensor's values live in ``accumulated.safetensors``, and how they are stored."""

    header: bytes
    offsets: dict[str, int]  # absolute byte offset of each tensor's data
    size: int  # total file size
    dtypes: dict[str, str]  # each tensor's storage dtype, a key of MAP_DTYPES

    def slot(self, path: str, name: str) -> MapSlot:
        """Where tensor ``name`` goes in this layout's file at ``path``."""
        return MapSlot(path, self.offsets[name], self.dtypes[name])


def layout_accumulated(
    tensors: Iterable[tuple[str, Sequence[int]]], dtypes: Mapping[str, str] | None = None
) -> OutputLayout:
    """Plan a safetensors file of the tensors in the given order (header padded to 8 bytes), each
    stored as ``dtypes[name]`` (float32 where not given)."""
    entries: dict[str, Any] = {}
    relative: dict[str, int] = {}
    stored: dict[str, str] = {}
    pos = 0
    for name, shape in tensors:
        stored[name] = dtype = (dtypes or {}).get(name, "F32")
        nbytes = MAP_DTYPES[dtype] * math.prod(shape)
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        relative[name] = pos
        pos += nbytes
    entries["__metadata__"] = {"format": "pt", "producer": "wdiff", "content": "accumulated |dW|"}
    if "BF16" in stored.values():
        entries["__metadata__"]["rounding"] = "BF16 tensors: summed in float32, stored to nearest even"
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the official writer pads with spaces to a multiple of 8
    header = len(text).to_bytes(8, "little") + text
    base = len(header)
    return OutputLayout(header, {k: base + v for k, v in relative.items()}, base + pos, stored)


def create_accumulated(path: str | os.PathLike[str], layout: OutputLayout) -> None:
    """Write the header and size the file; compute tasks then fill the data with ``pwrite``.

    The file's blocks are reserved up front (``preallocate``): a full disk is refused here, in one
    line, before anything is read, and the map's writes then cost 40% less time than into a sparse file
    (ext4 no longer reserves each page's block as it is first written: measured 0.10 s against 0.17 s
    per GB written in 64 KiB pieces, see docs/performance.md).
    """
    try:
        with open(path, "wb") as f:
            f.write(layout.header)
            f.truncate(layout.size)
            preallocate(f.fileno(), layout.size)
    except OSError as e:
        need = f"{layout.size:,} bytes"
        hint = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # what would make the map fit
            hint = " (--map-dtype bfloat16 stores it in half the bytes, --map-dtype none stores no map)"
            if "F32" not in layout.dtypes.values():
                hint = " (--map-dtype none stores no map)"
        raise WdiffError(path, f"cannot reserve {need} for the results: {e.strerror}{hint}") from None


def preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of the first ``size`` bytes of file ``fd`` (Linux ``fallocate``, mode 0).

    Raises OSError when the disk is full; does nothing where the file system cannot (``EOPNOTSUPP``),
    or off Linux. Not ``os.posix_fallocate``: where fallocate is unsupported, glibc emulates it by
    writing a byte into every block, which would write the whole map twice.
    """
    fallocate = _libc_fallocate()
    if fallocate is None or size <= 0:
        return
    if fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))


@functools.cache
def _libc_fallocate() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null so every JSON reader can load the summary."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """``data`` as the JSON wdiff writes: NaN and Infinity as null (strict readers need that)."""
    try:
        return _indented(data, "\n") + "\n"
    except _Unusual:  # what the fast path does not know: the standard encoder (or its error)
        return json.dumps(_finite_or_none(data), indent=1, allow_nan=False) + "\n"


class _Unusual(Exception):
    pass


_NUMBERS = frozenset((int, float))
_STR = frozenset((str,))


def _indented(value: Any, newline: str) -> str:
    """``json.dumps(_finite_or_none(value), indent=1)``, the same characters, for str keys and
    str/int/float/bool/None/list/tuple/dict values (anything else raises _Unusual).

    The standard encoder with ``indent`` is pure Python: a summary of 100,000 tensors (75 MB) took
    3.5 s to encode and 0.9 s more to replace NaN first. Here a list of numbers is joined in one go."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else "null"
    if kind is int:
        return repr(value)
    if kind is dict:
        if not value:
            return "{}"
        if not _STR.issuperset(map(type, value)):
            raise _Unusual
        inner = newline + " "
        items = [_string(k) + ": " + _indented(v, inner) for k, v in value.items()]
        return "{" + inner + ("," + inner).join(items) + newline + "}"
    if kind is list or kind is tuple:
        if not value:
            return "[]"
        inner = newline + " "
        if _NUMBERS.issuperset(map(type, value)):  # no bool, no subclass: repr is what json writes
            text = ("," + inner).join(map(repr, value))
            if "n" in text:  # nan or inf: null
                text = ("," + inner).join([_indented(v, inner) for v in value])
        else:
            text = ("," + inner).join([_indented(v, inner) for v in value])
        return "[" + inner + text + newline + "]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):  # numpy.float64 is one: json writes float.__repr__
        return float.__repr__(value) if math.isfinite(value) else "null"
    raise _Unusual  # int and str subclasses, dict and list subclasses, anything json may refuse


_string = json.encoder.encode_basestring_ascii  # what json.dumps uses (ensure_ascii)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    Path(path).write_text(json_text(data))


@dataclass(frozen=True)
class Results:
    """A finished ``wdiff`` output folder, for notebooks: the summary and the accumulated maps."""

    path: Path
    summary: Summary

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> Results:
        """The results in ``out``, checked (``wdiff.schema.read_results``): anything that is not wdiff's
        results, a summary that is not its shape, or maps that do not hold its tensors is one
        ``WdiffError`` line naming the file and the problem."""
        return cls(*read_results(out))

    @property
    def names(self) -> list[str]:
        """Computed tensors, network order."""
        return list(self.summary["tensors"])

    def accumulated(self, name: str) -> np.ndarray:
        """The accumulated change map of one tensor (float32, the tensor's shape; a map stored as BF16,
        ``wdiff.update.map_dtypes``, widened exactly). A ``WdiffError`` when the run stored no map."""
        return _float32(_get(self._map(), name))

    def _map(self) -> Path:
        """accumulated.safetensors, or a ``WdiffError`` line when the run stored no map."""
        if not map_stored(self.summary):
            raise WdiffError(
                self.path / ACCUMULATED,
                "not stored: the run wrote no map (--map-dtype none, or the default for a map over 2 GiB); "
                "run it again with --map-dtype float32 for it",
            )
        return self.path / ACCUMULATED

    def neuron_change(self, name: str) -> np.ndarray:
        """The per-neuron change of one tensor: its accumulated map summed over each row, one float64
        per row of the first dimension (a row of a weight matrix is one output neuron; of an
        embedding, one token; of a conv kernel, one filter; a vector's rows are its elements). Read
        from ``rows.safetensors``."""
        return _get(self.path / NEURON_CHANGE, name)

    def neuron_change_of(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """``neuron_change`` of many tensors, reading ``rows.safetensors``'s header once: a run of
        100,000 tensors would otherwise parse it 100,000 times (quadratic in the tensor count)."""
        return _get_many(self.path / NEURON_CHANGE, names)

    def rows(self, name: str) -> np.ndarray:
        """Deprecated: ``neuron_change`` (the old name; "rows" also names a tensor's first dimension
        and table rows)."""
        warnings.warn("Results.rows is deprecated: use Results.neuron_change", DeprecationWarning, 2)
        return self.neuron_change(name)

    def accumulated_of(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """``accumulated`` of many tensors, one open of the file (see ``neuron_change_of``)."""
        return {n: _float32(a) for n, a in _get_many(self._map(), names).items()}

    def map_dtype(self, name: str) -> str:
        """How the accumulated map of one tensor is stored: "F32" or "BF16" (``wdiff.update.map_dtypes``),
        or "none" when the run stored no map."""
        from wdiff.readers.safetensors import read_header

        if not map_stored(self.summary):
            return NO_MAP
        refs, _ = read_header(self.path / ACCUMULATED)
        return refs[name].dtype

    def frames(self, name: str) -> np.ndarray:
        """Each interval's change |W(t+1) - W(t)| of one tensor, pooled into the cells of its frame
        grid: float32 (intervals, cell rows, cell cols). Only when the run was made with frames."""
        return _get(self.path / FRAMES, name)

    def frame_info(self) -> dict[str, Any]:
        """How the frames were pooled: {"pool": "max" | "mean", "blocks": {name: [rows, cols]}}."""
        from wdiff.detail import frame_info

        return frame_info(self.path / FRAMES)

    def table(self) -> list[dict[str, Any]]:
        """One row per tensor with the scalar metrics: easy to pass to ``pandas.DataFrame``."""
        rows = []
        for name, t in self.summary["tensors"].items():
            row = {"tensor": name}
            row.update({k: v for k, v in t.items() if not isinstance(v, (list, dict))})
            rows.append(row)
        return rows

    def metrics_frame(self) -> pandas.DataFrame:
        """One row per tensor per interval, as ``metrics.csv``: ``tensor``, ``block``, ``interval``,
        ``step_start``, ``step_end``, ``step_gap``, the interval's change ``l1`` = sum |ΔW| and
        ``l2`` = ‖ΔW‖, both per training step, ``update_ratio`` = ‖ΔW‖/‖W(t)‖, ``weight_l2`` and
        ``rotation`` (against W(0)) at the interval's end, ``nonfinite`` there, and the training log
        joined to the interval (``loss``, ``learning_rate``, ``grad_norm``, ``eval_loss``). Unknown
        values are NaN; steps are integers (floats with NaN when some checkpoint has no step).
        Needs pandas (``pip install 'wdiff[notebook]'``)."""
        pandas = _optional("pandas", "metrics_frame")
        columns = _interval_columns(self.summary)
        return pandas.DataFrame({name: columns[name] for name in INTERVAL_COLUMNS})

    def metrics_dataset(self) -> xarray.Dataset:
        """The values of ``metrics_frame`` as an xarray Dataset with dims ``(tensor, interval)``: each
        per-tensor metric a variable over both, the training log (``loss`` ...) over ``interval``;
        coordinates ``tensor``, ``interval``, ``block`` (per tensor), ``step_start``, ``step_end``,
        ``step_gap`` (per interval). Needs xarray (``pip install 'wdiff[notebook]'``)."""
        xarray = _optional("xarray", "metrics_dataset")
        columns = _interval_columns(self.summary)
        tensors = self.names
        shape = (len(tensors), len(columns["interval"]) // max(len(tensors), 1))
        per_tensor = {
            name: (("tensor", "interval"), columns[name].reshape(shape))
            for name in INTERVAL_COLUMNS[
                INTERVAL_COLUMNS.index("l1") : INTERVAL_COLUMNS.index("nonfinite") + 1
            ]
        }
        per_interval = {name: ("interval", columns[name][: shape[1]]) for name in LOG_KEYS}
        coords = {
            "tensor": tensors,
            "interval": columns["interval"][: shape[1]],
            "block": ("tensor", columns["block"][:: shape[1]].astype(str)),
            **{k: ("interval", columns[k][: shape[1]]) for k in ("step_start", "step_end", "step_gap")},
        }
        return xarray.Dataset({**per_tensor, **per_interval}, coords=coords)


def _optional(package: str, method: str) -> Any:
    """``package`` imported, or one ``WdiffError`` line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise WdiffError(None, f"Results.{method} needs {package}: pip install 'wdiff[notebook]'") from None


def _interval_columns(summary: dict[str, Any]) -> dict[str, np.ndarray]:
    """``timeline.interval_rows`` as one numpy array per column: names and blocks as objects,
    ``interval`` and ``nonfinite`` int64, steps int64 (float64 with NaN when one is unknown), every
    other column float64 with NaN for None."""
    rows = timeline.interval_rows(summary)
    columns: dict[str, np.ndarray] = {}
    for name in INTERVAL_COLUMNS:
        values = [r[name] for r in rows]
        if name in ("tensor", "block"):
            columns[name] = np.array(values, dtype=object)
        elif name in ("interval", "nonfinite", "step_start", "step_end", "step_gap") and None not in values:
            columns[name] = np.array(values, dtype=np.int64)
        else:
            columns[name] = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return columns


def _float32(values: np.ndarray) -> np.ndarray:
    """A map as float32: a BF16 one (ml_dtypes.bfloat16, as safetensors returns it) widened, exactly."""
    return values if values.dtype == np.float32 else values.astype(np.float32)


def _get(path: Path, name: str) -> np.ndarray:
    """One tensor of a results file (FileNotFoundError naming the file when the run did not write it)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safe_open returns BF16 maps as it)
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in these results")
    with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name)


def _get_many(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Tensors of one results file by name, one open and one header parse for all of them."""
    import ml_dtypes  # noqa: F401  (see _get)
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in these results")
    with safe_open(path, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in names}


def write_neuron_change(path: str | os.PathLike[str], change: dict[str, np.ndarray]) -> None:
    """``rows.safetensors``: each tensor's per-neuron change, float64."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(r, np.float64) for name, r in change.items()}, str(path))
