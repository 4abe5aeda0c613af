"""The colour tables shipped in wdiff/scene/colormaps.npz are matplotlib's, exactly, and colouring
points with them (every --no-render run) does not import matplotlib."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import matplotlib
import numpy as np
import pytest

from wdiff.scene.color import SHIPPED, lookup_table


def _matplotlib_table(name: str) -> np.ndarray:
    return matplotlib.colormaps[name].resampled(256)(np.arange(256), bytes=True)[:, :3]


def test_the_file_holds_exactly_the_shipped_colormaps():
    with resources.files("wdiff.scene").joinpath("colormaps.npz").open("rb") as f, np.load(f) as tables:
        assert sorted(tables.files) == sorted(SHIPPED)
        for name in tables.files:
            assert tables[name].shape == (256, 3) and tables[name].dtype == np.uint8, name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_table_is_matplotlibs(name):
    table = lookup_table(name)
    np.testing.assert_array_equal(table, _matplotlib_table(name))
    assert table.dtype == np.uint8 and not table.flags.writeable


def test_other_colormaps_come_from_matplotlib():
    assert "Greys" not in SHIPPED
    np.testing.assert_array_equal(lookup_table("Greys"), _matplotlib_table("Greys"))
    with pytest.raises(KeyError):  # matplotlib's error for a name it does not know
        lookup_table("no-such-colormap")


def test_colouring_points_does_not_import_matplotlib():
    code = (
        "import sys\nimport numpy as np\nfrom wdiff.scene.color import colorize, lookup_table\n"
        "rgb, cs = colorize(np.geomspace(1e-6, 1.0, 1000))\n"
        "assert rgb[-1].tolist() == lookup_table()[255].tolist()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_point_colours_equal_matplotlibs_on_awkward_values(scale):
    """apply() works on whole arrays in place; every kind of value still gets matplotlib's colour:
    its colormap under LogNorm/Normalize of the value clipped to the scale, the bottom colour for
    zeros and negatives, the flag colour for NaN and +-Inf."""
    from matplotlib.colors import LogNorm, Normalize

    from wdiff.scene.color import FLAG_RGB, ColorScale, apply, color_scale

    rng = np.random.default_rng(11)
    values = np.r_[
        (10 ** rng.uniform(-12, 3, 20_000)),
        [0.0, -0.0, -1e-3, -np.inf, np.inf, np.nan, 1e-45, 1e-40, 3.4e38, 1.0],
    ].astype(np.float32)
    bounds = color_scale(values, scale)
    cmap = matplotlib.colormaps["viridis"]
    for cs in (bounds, ColorScale(1e-6, 1.0, scale), ColorScale(float(values[7]), float(values[8]), scale)):
        if scale == "linear":
            cs = ColorScale(0.0, cs.vmax, scale)
        rgb = apply(values, cs)
        finite = np.isfinite(values)
        norm = LogNorm(cs.vmin, cs.vmax) if scale == "log" else Normalize(cs.vmin, cs.vmax)
        clipped = np.clip(values[finite].astype(np.float64), cs.vmin, cs.vmax)  # wdiff scales in float64
        np.testing.assert_array_equal(rgb[finite], cmap(norm(clipped), bytes=True)[:, :3])
        assert (rgb[~finite] == FLAG_RGB).all()
