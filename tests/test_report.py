"""report.html is self-contained (opens offline), shows every part, and is rebuilt without
recomputing; ``wdiff compare`` gives ratios against numpy and refuses runs that do not match."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from factories import sgd_run, trainer_run

import wdiff
from wdiff.errors import WdiffError

PLANTED = {"frozen": ("layers.1.mlp.weight",), "unused_rows": {"embed.weight": [2, 3]}}
#: The sections of a report with its charts, in order (the 3D view follows when there are renders).
SECTIONS = [
    "What to change",
    "Run",
    "Findings",
    "Training curves",
    "Change per block and interval",
    "Update size against the learning rate",
    "Top movers and frozen parts",
    "Per-row change",
]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += attrs
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def _parse(path) -> _Page:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://|//cdn|ftp://", text), "the report must not reference the network"
    page = _Page()
    page.feed(text)
    assert not ({"script", "link", "iframe", "object", "embed"} & page.tags)
    ids = {value for name, value in page.attrs if name == "id"}
    for name, value in page.attrs:  # every src/href is embedded data or a link inside the page
        if name == "href" and value and value.startswith("#"):
            assert value[1:] in ids, value
        elif name in ("src", "href"):
            assert value and value.startswith("data:image/"), value[:40]
    return page


def _decoded(src: str) -> bytes:
    header, data = src.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/gif;base64")
    return base64.b64decode(data, validate=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One run with the real 3D render, to see the report embed it."""
    checkpoints, steps = sgd_run(blocks=3, **PLANTED)
    root = trainer_run(tmp_path_factory.mktemp("rendered") / "run", checkpoints, steps)
    return wdiff.run(root, root.parent / "out", max_points=20_000)


def test_report_is_self_contained_and_shows_every_part(rendered):
    page = _parse(rendered.path / "report.html")
    assert page.headings[: len(SECTIONS)] == SECTIONS
    assert page.headings[-1] == "3D view"
    pictures = [_decoded(src) for src in page.images]
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pictures)
    assert (rendered.path / "render.png").read_bytes() in pictures  # the render, byte for byte
    text = (rendered.path / "report.html").read_text()
    assert "layers.1.mlp.weight" in text and "frozen" in text and "unchanged_rows" in text
    found = json.loads((rendered.path / "findings.json").read_text())["findings"]
    assert {(f["kind"], f["tensor"]) for f in found} == {
        ("frozen", "layers.1.mlp.weight"),
        ("unchanged_rows", "embed.weight"),
    }


def test_report_embeds_every_render_and_the_gif(rendered, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    shutil.copytree(rendered.path, out)
    shutil.copy(out / "render.png", out / "render_top.png")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(out / "frames.gif", save_all=True, append_images=frames[1:], duration=100)
    wdiff.write_report(out)
    page = _parse(out / "report.html")
    embedded = [_decoded(s) for s in page.images]
    for name in ("render.png", "render_top.png", "frames.gif"):
        assert (out / name).read_bytes() in embedded, name


def test_no_render_report_has_no_pictures_until_wdiff_report_draws_them(tmp_path):
    checkpoints, steps = sgd_run(blocks=3, **PLANTED)
    root = trainer_run(tmp_path / "run", checkpoints, steps)
    res = wdiff.run(root, tmp_path / "out", render=False)
    page = _parse(res.path / "report.html")
    assert not (res.path / "render.png").exists()
    assert page.images == []  # no charts, no 3D view: --no-render draws no picture of any kind
    assert page.headings == [
        "What to change",
        "Run",
        "Findings",
        "Update size against the learning rate",
        "Top movers and frozen parts",
        "Rank of the update",  # the update spectra, on by default for a local run
    ]
    text = (res.path / "report.html").read_text()
    assert text.count("Charts skipped (--no-render)") == 1 and "`wdiff report`" in text
    assert "layers.1.mlp.weight" in text  # the tables are all there
    found = json.loads((res.path / "findings.json").read_text())["findings"]
    assert {(f["kind"], f["tensor"]) for f in found} == {
        ("frozen", "layers.1.mlp.weight"),
        ("unchanged_rows", "embed.weight"),
    }
    tables = {n: (res.path / n).read_bytes() for n in ("findings.json", "metrics.csv", "tensors.csv")}
    p = subprocess.run(
        [sys.executable, "-m", "wdiff", "report", str(res.path), "-q"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    page = _parse(res.path / "report.html")
    assert page.headings[: len(SECTIONS)] == SECTIONS
    assert len(page.images) >= 3 and all(_decoded(src).startswith(b"\x89PNG") for src in page.images)
    assert "Charts skipped" not in (res.path / "report.html").read_text()
    assert {name: (res.path / name).read_bytes() for name in tables} == tables  # same analysis


def test_report_command_rebuilds_without_recomputing(rendered, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(rendered.path, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.suffix != ".html"}
    for name in ("findings.json", "metrics.csv", "tensors.csv", "report.html"):
        (out / name).unlink()
    p = subprocess.run(
        [sys.executable, "-m", "wdiff", "report", str(out)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{out / 'report.html'}: 2 findings"
    assert "frozen" in p.stderr and "layers.1.mlp.weight" in p.stderr  # the table
    for name, (mtime, data) in before.items():  # results untouched, derived files identical
        assert (out / name).stat().st_mtime_ns == mtime or name in (
            "findings.json",
            "metrics.csv",
            "tensors.csv",
        )
        assert (out / name).read_bytes() == data, name
    _parse(out / "report.html")


def test_report_of_a_folder_without_results_is_one_line_error(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "wdiff", "report", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert f"{tmp_path}: no summary.json" in p.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    runs = {}
    for name, lr in (("lr-low", 0.01), ("lr-high", 0.03)):
        checkpoints, steps = sgd_run(blocks=3, lr=lr, seed=1)
        root = trainer_run(base / name, checkpoints, steps)
        runs[name] = (wdiff.run(root, base / f"out-{name}", render=False), checkpoints)
    return base, runs


def test_compare_ratios_match_numpy_and_render_side_by_side(two_runs):
    base, runs = two_runs
    (a, ca), (b, cb) = runs["lr-low"], runs["lr-high"]
    result = wdiff.compare(a.path, b.path, base / "cmp", max_points=20_000)
    for row in result.tensors:
        n = row["tensor"]
        path = [
            sum(np.abs(c2[n].astype(np.float64) - c1[n]).sum() for c1, c2 in zip(c, c[1:])) for c in (ca, cb)
        ]
        np.testing.assert_allclose(row["path_l1_ratio"], path[1] / path[0], rtol=1e-5)
        assert 2.0 < row["path_l1_ratio"] < 4.0  # 3x the learning rate, same noise
    with open(base / "cmp" / "compare.csv", newline="") as f:
        assert [r["tensor"] for r in csv.DictReader(f)] == a.names
    doc = json.loads((base / "cmp" / "compare.json").read_text())
    assert doc["schema"] == 1
    assert {x["block"] for x in doc["blocks"]} == {"embed", "layers.0", "layers.1", "layers.2", "head"}
    page = _parse(base / "cmp" / "report.html")
    picture = (base / "cmp" / "side_by_side.png").read_bytes()
    assert picture in [_decoded(s) for s in page.images]
    from PIL import Image

    assert Image.open(io.BytesIO(picture)).size == (1920, 640)


def test_compare_refuses_runs_of_different_architectures(two_runs, tmp_path):
    base, runs = two_runs
    checkpoints, steps = sgd_run(blocks=2)
    other = wdiff.run(trainer_run(tmp_path / "run", checkpoints, steps), tmp_path / "out", render=False)
    with pytest.raises(
        WdiffError, match="not of the same architecture: 3 tensors only in .*first: layers.2.attn.weight"
    ):
        wdiff.compare(runs["lr-low"][0].path, other.path, tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    env = dict(os.environ)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "wdiff",
            "compare",
            str(runs["lr-low"][0].path),
            str(other.path),
            "-o",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_help_of_the_new_commands():
    for command in ("report", "compare"):
        p = subprocess.run([sys.executable, "-m", "wdiff", command, "--help"], capture_output=True, text=True)
        assert p.returncode == 0 and "Usage" in p.stdout


@pytest.mark.parametrize("panels", [1, 3])
def test_chart_png_is_what_savefig_writes(panels):
    """``figures.png_bytes`` draws a chart once and encodes the canvas itself: the very bytes of
    matplotlib's ``savefig`` (which lays the figure out three times), no "Software" tag."""
    from wdiff.report import figures

    def chart():
        fig = figures.new_figure(6, 1.5 * panels)
        for k, ax in enumerate(fig.subplots(panels, 1, squeeze=False)[:, 0]):
            ax.plot(np.arange(50), np.exp(np.linspace(0, 3 + k, 50)), label="loss")
            ax.set_yscale("log")
            ax.set_ylabel("‖ΔW‖/‖W‖ per step")
            ax.legend(loc="upper right", fontsize=8)
        return fig

    buf = io.BytesIO()
    chart().savefig(buf, format="png", metadata={"Software": None})
    assert figures.png_bytes(chart()) == buf.getvalue()
    assert b"Software" not in buf.getvalue()
