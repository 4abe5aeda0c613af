"""wdiff.export.tensorboard: event files read back with TensorBoard's own loader (EventAccumulator) and
a real ``tensorboard`` server; values against summary.json with numpy, a grown run appended once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, trainer_run

from wdiff import api
from wdiff.errors import WdiffError
from wdiff.export.tensorboard import STATE, export
from wdiff.scene.options import SceneOptions

STEPS = [10, 20, 30, 40, 50]
SHAPES = {
    "model.embed.weight": (7, 5),
    "model.layers.0.mlp.weight": (6, 5),
    "model.layers.0.norm.bias": (5,),  # starts at 0: no relative change, no rotation
    "model.layers.1.mlp.weight": (6, 5),
    "model.layers.1.frozen.weight": (4, 3),  # never changes: a `frozen` finding
}
BLOCKS = {"model.embed": ["model.embed.weight"]}
BLOCKS["model.layers.0"] = ["model.layers.0.mlp.weight", "model.layers.0.norm.bias"]
BLOCKS["model.layers.1"] = ["model.layers.1.mlp.weight", "model.layers.1.frozen.weight"]
SMALL = SceneOptions(frames=True, size=(320, 240), html=False)


def _sequence() -> list[dict[str, np.ndarray]]:
    seq = random_sequence(SHAPES, len(STEPS), seed=3)
    seq[0]["model.layers.0.norm.bias"][:] = 0
    for c in seq:
        c["model.layers.1.frozen.weight"] = seq[0]["model.layers.1.frozen.weight"]
    return seq


def _accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _files(logdir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in logdir.iterdir()}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A run of 3 checkpoints computed and exported, then grown to 5, computed and exported again."""
    root = tmp_path_factory.mktemp("grown")
    run = trainer_run(root / "run", _sequence(), STEPS)
    later = root / "later"
    later.mkdir()
    for step in STEPS[3:]:  # moved out and back: the same files (fingerprints) when the run grows
        (run / f"checkpoint-{step}").rename(later / f"checkpoint-{step}")
    out, logdir = root / "out", root / "logs" / "run"
    api.run(run, out, scene=SMALL)
    first = export(out, logdir)
    files_first = _files(logdir)
    for step in STEPS[3:]:
        (later / f"checkpoint-{step}").rename(run / f"checkpoint-{step}")
    res = api.run(run, out, scene=SMALL)
    second = export(out, logdir)
    return {"out": out, "logdir": logdir, "first": first, "second": second, "files_first": files_first,
            "summary": res.summary, "run": run}  # fmt: skip


def _expected(summary: dict, blocks: dict[str, list[str]] = BLOCKS) -> dict[str, dict[int, float]]:
    """Every scalar series from summary.json alone (docs/integrations.md), None values left out."""
    t = summary["tensors"]
    steps = np.array([c["step"] for c in summary["checkpoints"]], dtype=np.float64)
    gaps = np.diff(steps)
    want: dict[str, dict[int, float]] = {}

    def put(tag: str, at: np.ndarray, values) -> None:
        series = {int(s): float(v) for s, v in zip(at, values) if v is not None and np.isfinite(v)}
        if series:
            want[tag] = series

    for name, m in t.items():
        interval_l2 = np.array(m["interval_l2"], dtype=np.float64)
        l2 = np.array(m["l2"], dtype=np.float64)
        put(f"tensor.l2_per_step/{name}", steps[1:], interval_l2 / gaps)
        put(f"tensor.update_ratio/{name}", steps[1:], [a / b if b else None for a, b in zip(interval_l2, l2)])
        distance = np.array(m["distance_l2"], dtype=np.float64)
        put(f"tensor.relative_change/{name}", steps, distance / l2[0] if l2[0] else [None] * len(steps))
        put(f"tensor.rotation/{name}", steps, m["rotation"])
        put(f"tensor.weight_l2/{name}", steps, l2)
    for block, names in [*blocks.items(), ("", list(t))]:
        dw = np.sqrt(sum(np.array(t[n]["interval_l2"]) ** 2 for n in names))
        w = np.sqrt(sum(np.array(t[n]["l2"][:-1]) ** 2 for n in names))
        l1 = sum(np.array(t[n]["interval_l1"]) for n in names)
        prefix = f"block.{{}}/{block}" if block else "model/{}"
        put(prefix.format("update_ratio_per_step"), steps[1:], dw / w / gaps)
        put(prefix.format("l1_per_step"), steps[1:], l1 / gaps)
    return want


def test_values_and_steps_equal_the_summary(grown):
    acc = _accumulator(grown["logdir"])
    want = _expected(grown["summary"])
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    assert "tensor.rotation/model.layers.0.norm.bias" not in want  # W(0) = 0: no value, no series
    assert len(want["tensor.weight_l2/model.embed.weight"]) == 5
    assert len(want["block.update_ratio_per_step/model.layers.1"]) == 4
    for tag, series in want.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(series), tag  # each step once, in order
        # simple_value is a float32: equal to float32 precision
        np.testing.assert_allclose([e.value for e in events], list(series.values()), rtol=2e-7, err_msg=tag)
    description = acc.SummaryMetadata("tensor.update_ratio/model.embed.weight").summary_description
    assert "||dW|| / ||W(t)||" in description


def test_images_are_the_frames_at_their_steps_and_the_render_at_the_last(grown):
    import imageio.v3 as iio

    acc = _accumulator(grown["logdir"])
    out = grown["out"]
    frames = acc.Images("frames/change_per_interval")
    assert [e.step for e in frames] == STEPS[1:]  # interval t at the step that ends it
    # frames of the first export are the film as it was then; the two new ones are today's film
    film = iio.imread(out / "frames.gif", index=None)[..., :3]
    for event, picture in zip(frames[2:], film[2:]):
        decoded = iio.imread(event.encoded_image_string, extension=".png")
        assert (event.height, event.width) == picture.shape[:2]
        np.testing.assert_array_equal(decoded, picture)
    renders = acc.Images("render/render.png")
    assert [e.step for e in renders] == [30, 50]  # one per export, at its last step
    assert renders[-1].encoded_image_string == (out / "render.png").read_bytes()
    assert sorted(acc.Tags()["images"]) == ["frames/change_per_interval", "render/render.png"]


def test_texts_say_the_run_the_findings_and_what_to_change(grown):
    acc = _accumulator(grown["logdir"])
    texts = {tag: acc.Tensors(tag) for tag in ("wdiff/run", "wdiff/findings", "wdiff/what_to_change")}
    for events in texts.values():
        assert [e.step for e in events] == [30, 50]
    last = {tag: events[-1].tensor_proto.string_val[0].decode() for tag, events in texts.items()}
    findings = json.loads((grown["out"] / "findings.json").read_text())["findings"]
    assert any(f["kind"] == "frozen" and f["tensor"] == "model.layers.1.frozen.weight" for f in findings)
    table = last["wdiff/findings"].splitlines()
    assert table[0] == "| # | kind | tensor | steps | message |" and len(table) == 2 + len(findings)
    for line, f in zip(table[2:], findings):
        assert f"| {f['kind']} | {f['tensor']} |" in line
    assert "frozen.weight" in last["wdiff/what_to_change"] and last["wdiff/what_to_change"].count("\n1. ")
    assert "5 tensors over 5 checkpoints (steps 10 .. 50)" in last["wdiff/run"]
    layout = acc.Tensors("custom_scalars__config__")
    assert len(layout) == 1  # written once, by the first export


def test_a_grown_run_appends_only_its_new_checkpoints(grown):
    first, second, logdir = grown["first"], grown["second"], grown["logdir"]
    assert first.steps == [10, 20, 30] and second.steps == [40, 50] and second.checkpoints == 5
    # the first event file was kept as it was; the second export added one file
    kept = {name: size for name, size in grown["files_first"].items() if name != STATE}
    assert len(kept) == 1 and all(_files(logdir)[name] == size for name, size in kept.items())
    events = sorted(p.name for p in logdir.glob("events.out.tfevents.*"))
    assert (
        len(events) == 2 and events[0].endswith(".wdiff-00000003") and events[1].endswith(".wdiff-00000005")
    )
    acc = _accumulator(logdir)
    # W(0) = 0: no ratio to the weights at the first checkpoint (nor relative change nor rotation at all)
    partial = {"tensor.update_ratio/model.layers.0.norm.bias": STEPS[2:]}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        per_interval = tag.startswith(("model/", "block.", "tensor.l2_per_step", "tensor.update_ratio"))
        assert steps == partial.get(tag, STEPS[1:] if per_interval else STEPS), tag
    # unchanged results: nothing written, not even an empty file
    before = _files(logdir)
    again = export(grown["out"], logdir)
    assert again.path is None and again.steps == [] and _files(logdir) == before
    state = json.loads((logdir / STATE).read_text())
    assert [c["step"] for c in state["checkpoints"]] == STEPS


def test_results_of_another_run_are_refused(grown, tmp_path):
    logdir = tmp_path / "logs"
    shutil.copytree(grown["logdir"], logdir)
    before = _files(logdir)
    other = trainer_run(tmp_path / "other", random_sequence({"w": (3, 3)}, 3, seed=1), [10, 25, 30])
    api.run(other, tmp_path / "out", render=False)
    with pytest.raises(
        WdiffError,
        match="another run .its checkpoint 1 was step 10, these results. is step 10 with other weight files",
    ):
        export(tmp_path / "out", logdir)
    assert _files(logdir) == before


def _wdiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=300)


def test_cli_run_option_and_command(grown, tmp_path):
    logdir = tmp_path / "tb"
    p = _wdiff(
        "run", str(grown["run"]), "-o", str(tmp_path / "out"), "--no-render", "--tensorboard", str(logdir)
    )
    assert p.returncode == 0, p.stderr
    assert f"{logdir}: 5 new checkpoints (steps 10 .. 50): " in p.stderr
    tags = _accumulator(logdir).Tags()
    assert (
        "block.update_ratio_per_step/model.layers.0" in tags["scalars"] and tags["images"] == []
    )  # no render

    # committed every 2 new checkpoints (as remote inputs are every 16): exported after each commit
    logdir = tmp_path / "tb-commits"
    p = _wdiff("run", str(grown["run"]), "-o", str(tmp_path / "out-commits"), "--no-render",
               "--commit-every", "2", "--tensorboard", str(logdir))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (
        ": 3 new checkpoints (steps 10 .. 30): " in p.stderr
        and ": 2 new checkpoints (steps 40 .. 50): " in p.stderr
    )
    assert sorted(f.name[-15:] for f in logdir.glob("events.*")) == [".wdiff-00000003", ".wdiff-00000005"]
    assert [e.step for e in _accumulator(logdir).Scalars("tensor.weight_l2/model.embed.weight")] == STEPS

    p = _wdiff("tensorboard", str(grown["out"]), str(tmp_path / "tb2"))
    assert p.returncode == 0, p.stderr
    want = _expected(grown["summary"])
    count = sum(map(len, want.values()))
    assert (
        p.stdout
        == f"{tmp_path / 'tb2'}: 5 new checkpoints (steps 10 .. 50): {count} scalars, 5 images, 3 texts\n"
    )
    p = _wdiff("tensorboard", str(grown["out"]), str(tmp_path / "tb2"))
    assert p.returncode == 0 and p.stdout == f"{tmp_path / 'tb2'}: up to date (5 checkpoints)\n"


def test_a_file_as_logdir_is_one_line_before_any_work(grown, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for args in (
        ["tensorboard", str(grown["out"]), str(file)],
        ["tensorboard", str(grown["out"]), str(file / "sub")],
        ["run", str(grown["run"]), "-o", str(tmp_path / "out"), "--tensorboard", str(file)],
    ):
        p = _wdiff(*args)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"wdiff: error: {file}"), p.stderr
        assert "TensorBoard log folder" in lines[0]
    assert not (tmp_path / "out").exists() and file.read_text() == "mine"  # refused before computing


def test_importing_the_exporter_does_not_import_tensorboard():
    code = (
        "import json, sys, wdiff.export, wdiff.export.tensorboard, wdiff.export.wandb, wdiff.cli\n"
        "print(json.dumps(list(sys.modules)))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(p.stdout)}
    assert not loaded & {"tensorboard", "wandb", "torch", "tensorflow"}


def test_a_real_tensorboard_server_serves_the_tags(grown):
    """``tensorboard --logdir`` (the entry point beside this Python) on the export's parent folder."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("tensorboard")
    logroot = grown["logdir"].parent
    server = subprocess.Popen(
        [str(exe), "--logdir", str(logroot), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.load(r)

    try:
        deadline = time.monotonic() + 90
        tags = {}
        while time.monotonic() < deadline and "run" not in tags:
            assert server.poll() is None, "tensorboard exited"
            try:
                tags = get("/data/plugin/scalars/tags")
            except OSError:
                time.sleep(0.5)
        assert sorted(tags["run"]) == sorted(_expected(grown["summary"]))
        images = get("/data/plugin/images/tags")["run"]
        assert images["frames/change_per_interval"]["samples"] == 1
        layout = get("/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles == [
            "wdiff: blocks",
            "wdiff: model.embed",
            "wdiff: model.layers.0",
            "wdiff: model.layers.1",
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
