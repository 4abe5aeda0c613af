"""The scene's only input: ``accumulated.safetensors``, read in bounded blocks (or, for results that
store no map, the cells pooled during compute: ``PooledCells``).

Models can be hundreds of GB, so a tensor is never read whole: it is cut into row blocks (and, when
a single row is too long, into column runs of one row) of at most ``chunk_elements`` values, each
read with ``safe_open(...).get_slice(name)[a:b]``, which copies only the requested bytes out of the
file mapping.

safetensors keeps every page it has read mapped (and counted in the process RSS) until the handle is
released, so the handle is dropped and reopened every ``remap_bytes`` read: resident memory then
stays bounded by the block size, not by the model size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safe_open returns BF16 maps as it)
import numpy as np

from wdiff.detail import Grid, grid_dims, read_pooled, to_means
from wdiff.errors import WdiffError
from wdiff.schema import POOLED

#: Values per block read from disk (4 Mi float32 = 16 MiB).
CHUNK_ELEMENTS = 1 << 22
#: Bytes read through one file handle (64 MiB) before it is reopened to release the mapped pages.
REMAP_BYTES = 1 << 26

# Float dtypes safe_open returns as numpy arrays (BF16 as ml_dtypes.bfloat16, imported for it); the
# compute step writes F32, or BF16 (``wdiff.update.map_dtypes``).
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class TensorInfo:
    """Name and stored shape of one tensor, and the 2-D grid the scene draws it as.

    Rows are the first dimension, columns the other dimensions flattened (row-major, so one row of
    the grid is one contiguous run of the file); a 1-D tensor is one row and a scalar is 1 x 1.
    """

    name: str
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return grid_dims(self.shape)[0]

    @property
    def cols(self) -> int:
        return grid_dims(self.shape)[1]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class _Tensors:
    """The tensors a scene source holds, by name: ``path`` names the file in errors."""

    path: str
    _info: dict[str, TensorInfo]

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise WdiffError(self.path, f"no tensor named {name!r} in the results file") from None


class AccumulatedFile(_Tensors):
    """Read-only access to ``accumulated.safetensors``: shapes, and values in bounded blocks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunk_elements: int = CHUNK_ELEMENTS,
        remap_bytes: int = REMAP_BYTES,
    ) -> None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.path = os.fspath(path)
        self.chunk_elements = chunk_elements
        self.remap_bytes = remap_bytes
        self._handle: Any = None
        self._offsets: dict[str, tuple[int, str]] | None = None
        self._pooled: dict[str, tuple[np.ndarray, tuple[int, int], str, int]] | None = None
        self._read_since_open = 0
        handle = self._open()
        self._info: dict[str, TensorInfo] = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            dtype = sl.get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise WdiffError(self.path, f"tensor {name!r} has dtype {dtype}, not float (F32)")
            self._info[name] = TensorInfo(name, tuple(int(d) for d in sl.get_shape()))

    def _open(self) -> Any:
        if self._handle is None:
            from safetensors import SafetensorError, safe_open

            try:
                self._handle = safe_open(self.path, framework="numpy")
            except (OSError, SafetensorError) as exc:
                raise WdiffError(self.path, f"cannot read results file: {exc}") from exc
            self._read_since_open = 0
        return self._handle

    def _account(self, nbytes: int) -> None:
        """Drop the handle once enough has been read through it (see the module docstring)."""
        self._read_since_open += nbytes
        if self._read_since_open >= self.remap_bytes:
            self._handle = None

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> AccumulatedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blocks(self, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(row, col, block)``: a 2-D float32 piece of the tensor's grid, and where.

        Blocks cover the grid exactly once, in row-major order, each at most ``chunk_elements``
        values (or one innermost slice ``shape[2:]`` when that alone is larger). Zero-size tensors
        yield nothing.
        """
        info = self.info(name)
        shape, budget = info.shape, self.chunk_elements
        if info.size == 0:
            return
        if not shape:
            value = self._open().get_tensor(name)
            self._account(4)
            yield 0, 0, np.asarray(value, dtype=np.float32).reshape(1, 1)
            return
        if len(shape) == 1:
            for a in range(0, shape[0], budget):
                b = min(a + budget, shape[0])
                yield 0, a, self._read(name, (slice(a, b),), (1, b - a))
            return
        rows, cols = info.rows, info.cols
        if cols <= budget:
            step = max(1, budget // cols)
            for a in range(0, rows, step):
                b = min(a + step, rows)
                yield a, 0, self._read(name, (slice(a, b),), (b - a, cols))
            return
        # One row is longer than the budget: read runs of it along dimension 1. Row-major order
        # makes indices [c, d) of dimension 1 the grid's contiguous columns [c*inner, d*inner).
        inner = math.prod(shape[2:])
        step = max(1, budget // inner)
        for r in range(rows):
            for c in range(0, shape[1], step):
                d = min(c + step, shape[1])
                yield (
                    r,
                    c * inner,
                    self._read(name, (slice(r, r + 1), slice(c, d)), (1, (d - c) * inner)),
                )

    def pooled(self, name: str, block: tuple[int, int], pool: str = "max") -> tuple[np.ndarray, int]:
        """The tensor's grid pooled into cells of ``block`` elements.

        Returns (cells float32, number of non-finite values). Taken from ``pooled.safetensors`` beside
        the results when the compute step already pooled this tensor with this block and pool kind;
        otherwise read straight from the file by a Numba kernel. Both equal feeding ``blocks()``
        through a ``GridPooler`` (tested).
        """
        from wdiff import kernels
        from wdiff.kernels import pool_line
        from wdiff.readers.safetensors import read_header
        from wdiff.scene._kernels import PIECE, pool_tensor

        ready = self._precomputed(name, block, pool)
        if ready is not None:
            return ready

        if self._offsets is None:
            refs, _ = read_header(self.path)
            self._offsets = {n: (r.offset, r.dtype) for n, r in refs.items()}
        info = self.info(name)
        offset, dtype = self._offsets[name]
        rows, cols = info.rows, info.cols
        shape = (-(-rows // block[0]), -(-cols // block[1]))
        if dtype not in ("F32", "BF16"):  # results files are F32 or BF16; anything else: the general path
            from wdiff.scene.pooling import GridPooler

            pooler = GridPooler(rows, cols, block, pool)  # type: ignore[arg-type]
            for row, col, values in self.blocks(name):
                pooler.add(row, col, values)
            return pooler.result(), pooler.nonfinite
        cells = np.full(shape, -np.inf if pool == "max" else 0.0)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            line = pool_line(rows, cols, pool == "mean")
            buf, raw = np.empty(PIECE, np.float32), np.empty(PIECE, np.int16)
            code = kernels.decoder_code(dtype)
            bad = pool_tensor(
                fd, offset, code, rows, cols, block[0], block[1], pool == "mean", cells, buf, raw, line
            )
        finally:
            os.close(fd)
        if bad < 0:
            raise WdiffError(self.path, f"reading tensor {name!r} failed: the file shrank")
        cells = to_means(Grid(rows, cols, block, mean=pool == "mean"), cells)
        return cells.astype(np.float32), int(bad)

    def _precomputed(self, name: str, block: tuple[int, int], pool: str) -> tuple[np.ndarray, int] | None:
        if self._pooled is None:
            self._pooled = read_pooled(os.path.join(os.path.dirname(self.path), POOLED))
        found = self._pooled.get(name)
        if found is None or found[1] != tuple(block) or found[2] != pool:
            return None
        return found[0], found[3]

    def _read(self, name: str, index: Sequence[slice], grid_shape: tuple[int, int]) -> np.ndarray:
        block = self._open().get_slice(name)[tuple(index)]
        self._account(block.nbytes)
        return np.asarray(block, dtype=np.float32).reshape(grid_shape)


class PooledCells(_Tensors):
    """The scene's source for results that store no accumulated map (``--map-dtype none``): the cells
    the compute step pooled (``pooled.safetensors`` beside where the map would be) and the tensors'
    shapes from the summary. It gives the scene at the budget and pool the run was computed for, and
    nothing finer or other: there are no per-weight values to pool again."""

    def __init__(self, accumulated_path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]]) -> None:
        self.path = os.fspath(accumulated_path)
        self._cells = read_pooled(os.path.join(os.path.dirname(self.path), POOLED))
        self._info = {n: TensorInfo(n, tuple(int(d) for d in s)) for n, s in shapes.items()}

    def __enter__(self) -> PooledCells:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def pooled(self, name: str, block: tuple[int, int], pool: str = "max") -> tuple[np.ndarray, int]:
        """The cells of ``name`` as pooled during compute; a ``WdiffError`` when they were pooled with
        another block or pool kind (the run's own budget is the only one these results can show)."""
        found = self._cells.get(name)
        if found is None or found[1] != tuple(block) or found[2] != pool:
            raise WdiffError(
                self.path,
                "not stored (the run stored no accumulated map): only the scene of the run's own "
                "--max-points and --pool can be drawn; run wdiff again with --map-dtype float32 for others",
            )
        return found[0], found[3]
