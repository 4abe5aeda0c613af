"""Colours for the accumulated change: one global perceptual colormap, log scale by default.

Accumulated change spans orders of magnitude (frozen embeddings next to hot attention heads), so the
default maps log10 of the value between robust bounds: a low percentile of the positive values (so a
few near-zero cells do not squash the scale), at most a decade below their median (so typical change
sits mid-scale and a part that never moved stands out), and the maximum. Zeros and values below the low bound
take the bottom colour; NaN/Inf take a flag colour that is not in the colormap. Colours are looked
up in the colormap's own 256-entry table with matplotlib's rounding, so the points match the colour
bar exactly; the tables of the common colormaps ship with wdiff (``SHIPPED``), so colouring points
does not import matplotlib.

``viridis`` is the default: its bright end reads well against the dark background of the render, and
it stays ordered for colour-blind readers and in greyscale.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np

Scale = Literal["log", "linear"]
SCALES: tuple[str, ...] = ("log", "linear")
NORMALIZE: tuple[str, ...] = ("global", "tensor", "relative")
CMAP = "viridis"
#: NaN/Inf points: magenta, which viridis never produces.
FLAG_RGB = (255, 0, 255)
#: Percentile of the positive finite values used as the bottom of the log scale ...
LOW_PERCENTILE = 1.0
#: ... or this many decades below their median, whichever is lower: typical change then sits mid-scale,
#: so a part that did not move (the bottom colour) stands out from one that moved little.
BELOW_MEDIAN = 1.0
_LUT_SIZE = 256


@dataclass(frozen=True)
class ColorScale:
    """How values became colours, for the colour bar and the legend."""

    vmin: float
    vmax: float
    scale: Scale
    cmap: str = CMAP
    flag_rgb: tuple[int, int, int] = FLAG_RGB
    #: "global": colours show the value itself; "tensor": the value over its tensor's maximum;
    #: "relative": the value over its tensor's size, the RMS of its weights at the first checkpoint.
    normalize: str = "global"
    #: Per-tensor divisors (index = tensor index): maxima ("tensor") or RMS of W(0) ("relative").
    peaks: tuple[float, ...] = ()
    #: What the values are (the colour bar says it).
    quantity: str = "accumulated |ΔW|"

    @property
    def label(self) -> str:
        """The colour bar's label: the quantity, the scale and global or per tensor."""
        if self.normalize == "tensor":
            return f"{self.quantity} / its tensor's max ({self.scale}, per tensor)"
        if self.normalize == "relative":
            return f"{self.quantity} / RMS of its tensor's W(0) ({self.scale})"
        return f"{self.quantity} ({self.scale}, global)"

    @property
    def legend(self) -> str:
        """How colours were chosen, in words."""
        which = {
            "tensor": "per tensor (each against its own max)",
            "relative": "relative (each against the RMS of its weights)",
        }.get(self.normalize, "global")
        return f"colour: {self.scale} scale, {which}"

    def relative(self, values: np.ndarray, tensor_index: np.ndarray) -> np.ndarray:
        """The values the colours show: as they are, or over their tensor's maximum or size."""
        if self.normalize not in ("tensor", "relative"):
            return values
        peaks = np.asarray(self.peaks, dtype=np.float64)[tensor_index]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(peaks > 0, values / np.where(peaks > 0, peaks, 1.0), 0.0)
        out[~np.isfinite(values)] = values[~np.isfinite(values)]  # NaN/Inf keep their flag colour
        return out.astype(np.float32)


def tensor_peaks(values: np.ndarray, tensor_index: np.ndarray, count: int) -> tuple[float, ...]:
    """The largest finite value of each of ``count`` tensors (0 for a tensor without one)."""
    peaks = np.zeros(count, dtype=np.float64)
    finite = np.isfinite(values)
    np.maximum.at(peaks, tensor_index[finite], values[finite].astype(np.float64))
    return tuple(float(p) for p in peaks)


def size_peaks(sizes: Sequence[float | None] | None, count: int) -> tuple[float, ...]:
    """What ``normalize="relative"`` divides ``count`` tensors by: their sizes (the RMS of each one's
    W(0), in tensor order), 0 where unknown or not finite (such a tensor keeps the bottom colour)."""
    if sizes is None or len(sizes) != count:
        raise ValueError("normalize='relative' needs the RMS of every tensor's W(0) (sizes)")
    return tuple(float(s) if s is not None and math.isfinite(s) else 0.0 for s in sizes)


def scene_scale(
    values: np.ndarray,
    tensor_index: np.ndarray,
    count: int,
    scale: Scale = "log",
    normalize: str = "global",
    quantity: str = "accumulated |ΔW|",
    sizes: Sequence[float] | None = None,
) -> ColorScale:
    """The colour scale of a scene's values (``count`` tensors): global, per tensor, or relative to
    each tensor's size (``sizes``: the RMS of each tensor's W(0), in tensor order; needed then)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    peaks: tuple[float, ...] = ()
    if normalize == "tensor":
        peaks = tensor_peaks(values, tensor_index, count)
    elif normalize == "relative":
        peaks = size_peaks(sizes, count)
    base = replace(ColorScale(0.0, 1.0, scale, normalize=normalize, peaks=peaks), quantity=quantity)
    cs = color_scale(base.relative(values, tensor_index), scale)
    return replace(base, vmin=cs.vmin, vmax=cs.vmax)


def color_scale(values: np.ndarray, scale: Scale = "log", cmap: str = CMAP) -> ColorScale:
    """Bounds for ``values``: log between a low percentile of the positive values (at most a decade
    below their median) and the max;
    linear from 0 (no change) to the max. Non-finite values are ignored; degenerate inputs get a
    one-decade (log) or unit (linear) range so the colour bar stays drawable."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    finite = values[np.isfinite(values)]
    if scale == "log":
        positive = finite[finite > 0]
        if positive.size == 0:
            return ColorScale(0.1, 1.0, scale, cmap)
        vmax = float(positive.max())
        vmin = float(np.percentile(positive, LOW_PERCENTILE))
        vmin = min(vmin, float(np.median(positive)) / 10.0**BELOW_MEDIAN)
        if not vmin < vmax:
            vmin = vmax / 10.0
        return ColorScale(vmin, vmax, scale, cmap)
    vmax = float(finite.max()) if finite.size else 0.0
    return ColorScale(0.0, vmax if vmax > 0 else 1.0, scale, cmap)


def normalize(values: np.ndarray, cs: ColorScale) -> np.ndarray:
    """Position of each value on the scale, clipped to [0, 1] (NaN for non-finite values)."""
    # Whole-array arithmetic in place (the same float64 operations on every value that keeps its
    # result, so the same bits as computing on the selected values only): a million points take
    # 10 ms instead of 20 without the gathers and scatters of boolean indexing.
    t = values.astype(np.float64)
    finite = np.isfinite(t)
    if cs.scale == "log":
        lo, hi = np.log10(cs.vmin), np.log10(cs.vmax)
        positive = finite & (t > 0)
        with np.errstate(divide="ignore", invalid="ignore"):  # zeros and negatives: overwritten below
            np.log10(t, out=t)
        t -= lo
        t /= hi - lo
        t[~positive] = 0.0  # zeros (and negatives, which should not occur) sit at the bottom
    else:
        t -= cs.vmin
        t /= cs.vmax - cs.vmin
    t[~finite] = np.nan
    np.clip(t, 0.0, 1.0, out=t)
    return t


#: Colormaps whose tables ship in ``colormaps.npz`` (made from matplotlib by
#: ``scripts/make_colormaps.py``): colouring points with them needs no matplotlib, whose import is the
#: largest fixed cost of a run that draws no picture. Any other matplotlib name still works.
SHIPPED: tuple[str, ...] = ("viridis", "plasma", "inferno", "magma", "cividis", "turbo")


@functools.cache
def lookup_table(cmap: str = CMAP) -> np.ndarray:
    """The colormap's 256 colours as uint8 (256, 3) (read-only, cached): from the shipped tables,
    or from matplotlib for a colormap that is not shipped."""
    if cmap in SHIPPED:
        from importlib import resources

        with resources.files("wdiff.scene").joinpath("colormaps.npz").open("rb") as f, np.load(f) as tables:
            table = tables[cmap]
    else:
        import matplotlib

        colormap = matplotlib.colormaps[cmap].resampled(_LUT_SIZE)
        table = colormap(np.arange(_LUT_SIZE), bytes=True)[:, :3]
    table.flags.writeable = False
    return table


def apply(values: np.ndarray, cs: ColorScale) -> np.ndarray:
    """uint8 (N, 3) colours of ``values`` on the scale ``cs``."""
    t = normalize(values, cs)
    bad = np.isnan(t)
    t[bad] = 0.0
    # matplotlib's rule (Colormap.__call__): index floor(t * N), with t == 1 going to N - 1.
    t *= _LUT_SIZE
    index = t.astype(np.intp)
    np.minimum(index, _LUT_SIZE - 1, out=index)
    rgb = lookup_table(cs.cmap).take(index, axis=0)
    rgb[bad] = cs.flag_rgb
    return rgb


class Colors(NamedTuple):
    """Point colours and the scale that made them (unpacks as ``rgb, scale = colorize(v)``)."""

    rgb: np.ndarray  # uint8 (N, 3)
    scale: ColorScale


def colorize(values: np.ndarray, scale: Scale = "log", cmap: str = CMAP) -> Colors:
    """Colours for ``values`` on a global scale taken from the values themselves."""
    cs = color_scale(values, scale, cmap)
    return Colors(apply(values, cs), cs)


def point_colors(values: np.ndarray, tensor_index: np.ndarray, cs: ColorScale) -> np.ndarray:
    """uint8 (N, 3) colours of a scene's points on ``cs`` (global or per tensor)."""
    return apply(cs.relative(values, tensor_index), cs)
