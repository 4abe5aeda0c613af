"""The default ``map_dtype="auto"``: the accumulated map is stored in float32 up to
``wdiff.update.MAP_AUTO_BYTES`` and not at all above, unless a map was asked for OUT's same tensors.

What is checked: a small run stores its float32 map as before; with the limit lowered below the run's
map (no 2 GiB runs in a test) the run stores none and every other output is that of the float32 run;
earlier float32 results of the same tensors are kept and extended in float32 when float32 was asked
for (``summary["map_choice"]``), not when the default chose it, nor those of other tensors; ``watch``
keeps float32 whatever the size; the CLI says what the default left out and the report says how much
it would take; ``auto`` is refused where only a stored dtype may be.
"""

from __future__ import annotations

import json

import pytest
from factories import random_sequence, trainer_run
from kinds import assert_same_but_the_map

import wdiff
from wdiff import update
from wdiff.checks import OptionError
from wdiff.errors import WdiffError
from wdiff.schema import check_summary

SHAPES = {"emb": (97, 33), "attn.w": (40, 40), "norm": (33,)}
MAP_BYTES = 4 * (97 * 33 + 40 * 40 + 33)  # 19,336
OPTIONS = {"render": False, "max_points": 600, "chunk_elements": 500, "spectrum": False}


@pytest.fixture
def small_limit(monkeypatch):
    """A limit just below these runs' float32 map, as 2 GiB is below a 1B model's."""
    monkeypatch.setattr(update, "MAP_AUTO_BYTES", MAP_BYTES - 1)


def test_a_map_within_the_limit_is_stored_in_float32(tmp_path, monkeypatch):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 3, seed=1), [1, 2, 3])
    monkeypatch.setattr(update, "MAP_AUTO_BYTES", MAP_BYTES)  # at the limit: stored
    res = wdiff.run(root, tmp_path / "out", **OPTIONS)
    assert res.summary["map_dtype"] == "float32"
    assert {res.map_dtype(n) for n in res.names} == {"F32"}
    assert res.accumulated("emb").shape == (97, 33)


def test_a_map_over_the_limit_is_not_stored_and_the_rest_is_the_same(tmp_path, small_limit):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 4, dtype="BF16", seed=2), [1, 2, 3, 4])
    auto = wdiff.run(root, tmp_path / "auto", **OPTIONS)
    assert auto.summary["map_dtype"] == "none"
    assert not (tmp_path / "auto" / "accumulated.safetensors").exists()
    with pytest.raises(WdiffError, match="run it again with --map-dtype float32"):
        auto.accumulated("emb")
    asked = wdiff.run(root, tmp_path / "f32", map_dtype="float32", **OPTIONS)  # asked for: stored
    assert asked.summary["map_dtype"] == "float32"
    assert_same_but_the_map(asked, auto)
    assert wdiff.run(root, tmp_path / "auto", **OPTIONS).summary["update"] == "up to date"


def test_the_default_keeps_a_float32_map_of_the_same_tensors_and_extends_it(tmp_path, small_limit):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 4, seed=3), [1, 2, 3, 4])
    (root / "checkpoint-4").rename(tmp_path / "checkpoint-4")  # not written yet
    out = tmp_path / "out"
    asked = wdiff.run(root, out, map_dtype="float32", **OPTIONS)
    assert (asked.summary["map_dtype"], asked.summary["map_choice"]) == ("float32", "float32")
    assert wdiff.run(root, out, **OPTIONS).summary["update"] == "up to date"
    (tmp_path / "checkpoint-4").rename(root / "checkpoint-4")  # training went on
    grown = wdiff.run(root, out, **OPTIONS)
    assert grown.summary["update"] == "incremental from 3" and grown.summary["map_dtype"] == "float32"
    assert grown.summary["map_choice"] == "float32"  # inherited: still asked for, for the next run
    again = wdiff.run(root, out, incremental=False, **OPTIONS)  # --full: computed again, kept as asked
    assert (again.summary["update"], again.summary["map_dtype"]) == ("full", "float32")
    batch = wdiff.run(root, tmp_path / "batch", map_dtype="float32", **OPTIONS)
    for name in batch.names:
        assert (grown.accumulated(name) == batch.accumulated(name)).all(), name


def test_a_float32_map_the_default_chose_is_not_kept_above_the_limit(tmp_path, monkeypatch):
    """As the parts of a run committed in parts before its last (stored in float32 for the next part
    to extend) when the run is interrupted and started again."""
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 4, seed=8), [1, 2, 3, 4])
    (root / "checkpoint-4").rename(tmp_path / "checkpoint-4")
    out = tmp_path / "out"
    monkeypatch.setattr(update, "MAP_AUTO_BYTES", MAP_BYTES)
    first = wdiff.run(root, out, **OPTIONS)
    assert (first.summary["map_dtype"], first.summary["map_choice"]) == ("float32", "auto")
    (tmp_path / "checkpoint-4").rename(root / "checkpoint-4")
    monkeypatch.setattr(update, "MAP_AUTO_BYTES", MAP_BYTES - 1)
    again = wdiff.run(root, out, **OPTIONS)
    assert (again.summary["map_dtype"], again.summary["map_choice"]) == ("none", "auto")
    assert again.summary["update"] == "incremental from 3"  # float32 results extended into none


def test_the_default_does_not_keep_a_map_of_other_tensors_nor_a_run_without_one(tmp_path, small_limit):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 3, seed=4), [1, 2, 3])
    other = trainer_run(tmp_path / "other", random_sequence({"emb": (97, 33)}, 3, seed=4), [1, 2, 3])
    out = tmp_path / "out"
    wdiff.run(other, out, map_dtype="float32", **OPTIONS)  # another model's results in OUT
    assert wdiff.run(root, out, **OPTIONS).summary["map_dtype"] == "none"
    wdiff.run(root, tmp_path / "none", map_dtype="none", **OPTIONS)
    assert wdiff.run(root, tmp_path / "none", **OPTIONS).summary["update"] == "up to date"
    (out / "summary.json").write_text("{not json")  # unreadable earlier results: the size decides
    assert wdiff.run(root, out, **OPTIONS).summary["map_dtype"] == "none"


def test_watch_stores_float32_whatever_the_size(tmp_path, small_limit):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 3, seed=5), [1, 2, 3])
    res = wdiff.watch(root, tmp_path / "w", poll=0.1, until=lambda: True, **OPTIONS)
    assert res is not None and res.summary["map_dtype"] == "float32"
    asked = wdiff.watch(root, tmp_path / "w2", map_dtype="auto", poll=0.1, until=lambda: True, **OPTIONS)
    assert asked is not None and asked.summary["map_dtype"] == "float32"


def test_the_cli_says_what_the_default_left_out(tmp_path, small_limit):
    from typer.testing import CliRunner

    from wdiff.cli import app

    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 3, seed=6), [1, 2, 3])
    out = tmp_path / "out"
    args = ["run", str(root), "-o", str(out), "--no-render", "--no-spectrum", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["map_dtype"] == "none"  # --json says it too
    limit = f"{(MAP_BYTES - 1) / 2**30:g} GiB"
    assert (
        f"accumulated map not stored: 19.3 KB in float32, over the {limit} a run stores by default "
        "(--map-dtype float32 stores it)"
    ) in result.output
    report = (out / "report.html").read_text()
    assert "not stored (19.3 KB in float32: --map-dtype float32 stores it)" in report
    result = CliRunner().invoke(app, ["run", str(root), "-o", str(tmp_path / "asked"), "--no-render",
                                      "--no-spectrum", "--map-dtype", "none"])  # fmt: skip
    assert result.exit_code == 0 and "accumulated map not stored" not in result.output  # asked for


def test_auto_is_what_is_asked_never_what_is_stored(tmp_path):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 2, seed=7), [1, 2])
    with pytest.raises(OptionError, match="map_dtype.*auto, float32, bfloat16, none"):
        wdiff.run(root, tmp_path / "out", map_dtype="float16", **OPTIONS)
    res = wdiff.run(root, tmp_path / "out", map_dtype="auto", **OPTIONS)
    summary = json.loads((res.path / "summary.json").read_text())
    summary["map_dtype"] = "auto"
    with pytest.raises(ValueError, match="map_dtype"):
        check_summary(summary)
    summary["map_dtype"], summary["map_choice"] = "float32", "float16"
    with pytest.raises(ValueError, match="map_choice"):
        check_summary(summary)
