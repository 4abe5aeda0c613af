"""The corpus, output side: hostile or unlucky output folders and results folders.

What is checked, through the real commands (``cli.main`` in this process, or ``python -m wdiff`` where
the exit code or a time limit matters), on folders the tests make:

- OUT is results only when it holds wdiff's marker (``.wdiff-results``); a folder holding anything
  else is refused in one line and left byte for byte as it was, whatever its ``summary.json`` says;
  files in OUT the marker does not list are never deleted, moved or overwritten;
- OUT may be a mount point (a real bind mount in a private mount namespace), a symlink, or have a
  245-character name; an OUT whose parent is a file is one line, exit code 2;
- a SIGKILL at every step of putting results in place (counted with an audit hook in the child)
  leaves a state the next writer turns into the old results or the new ones, complete;
- ``report``, ``compare`` and ``view`` read only regular files inside OUT and refuse a summary of
  the wrong shape in one line; ``view`` without a usable display exits 2 within seconds;
- a tensor name made to break HTML leaves ``scene.html`` working and ``report.html`` intact in
  headless Chromium;
- fuzzing: random OUT contents, and mutated summaries (200 cases each here, 10,000 with ``-m slow``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, save, trainer_run
from test_corpus import SHAPES, tree_hash, wdiff_run

from wdiff import api
from wdiff.errors import WdiffError
from wdiff.marker import MARKER, contents, is_wdiff_name, read_marker
from wdiff.outdir import Staging, base_name
from wdiff.results import Results

QUICK = 200
LONG = 10_000
HERE = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this tree's wdiff in children


def wdiff(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=timeout,
        env={**(env or os.environ), "PYTHONPATH": HERE["PYTHONPATH"]},
    )  # fmt: skip


def one_line_error(p: subprocess.CompletedProcess, named: Path | str, needle: str) -> None:
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"wdiff: error: {named}"), p.stderr
    assert needle in p.stderr, p.stderr


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    return trainer_run(root / "run", random_sequence(SHAPES, 3, seed=5), steps=[1, 2, 3])


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_folder) -> Path:
    out = tmp_path_factory.mktemp("results") / "out"
    api.run(run_folder, out, render=False, max_points=64)
    return out


def _args(run: Path, out: Path) -> list[str]:
    return [str(run), "-o", str(out), "--no-render", "--max-points", "64"]


def _assert_results(out: Path) -> None:
    marker = read_marker(out)
    assert marker is not None
    res = Results.load(out)
    assert res.names == list(SHAPES)
    assert all((out / name).is_file() for name in marker.files)


# --- 1. results are recognised by the marker, never by a file name ---------------------------------


USER_SUMMARIES = {
    "any JSON": '{"title": "my experiment"}',
    "wdiff-looking": json.dumps({"wdiff_version": "0.1.0", "tensors": {}, "checkpoints": []}),
    "not JSON": "summary of my thesis",
}


@pytest.mark.parametrize("kind", sorted(USER_SUMMARIES))
def test_a_users_summary_json_does_not_make_a_folder_results(tmp_path, monkeypatch, capsys, run_folder, kind):
    """The data-loss case of issue 17: a folder with a summary.json next to the user's files."""
    out = tmp_path / "home"
    out.mkdir()
    (out / "summary.json").write_text(USER_SUMMARIES[kind])
    (out / "thesis.tex").write_text("years of work")
    (out / "accumulated.safetensors").write_bytes(b"mine")
    before = tree_hash(out)
    code, stdout, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, out))
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"wdiff: error: {out}: ") and "holds files wdiff did not write" in stderr
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_every_run_writes_a_marker_listing_exactly_its_files(tmp_path, run_folder):
    out = tmp_path / "out"
    api.run(run_folder, out, render=False, max_points=64)
    marker = read_marker(out)
    assert marker is not None and marker.wdiff_version
    assert sorted(marker.files) == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert all(is_wdiff_name(name) for name in marker.files)  # WDIFF_FILES knows every name written


def test_the_users_files_in_results_survive_every_rerun(tmp_path, monkeypatch, capsys, run_folder, results):
    out = tmp_path / "out"
    shutil.copytree(results, out, symlinks=True)
    (out / "notes.md").write_text("lr 1e-4 looked better")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG mine")
    (out / "link-to-run").symlink_to(run_folder)
    mine = {name: tree_hash(out / name) for name in ("notes.md", "plots")}
    for _ in range(2):  # in place, and again over in-place results
        code, _, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, out))
        assert code == 0, stderr
        _assert_results(out)
        assert {name: tree_hash(out / name) for name in mine} == mine
        assert os.readlink(out / "link-to-run") == str(run_folder)
        assert not (set(mine) | {"link-to-run"}) & set(read_marker(out).files)  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no staging folder left
    assert not [p for p in out.iterdir() if p.name.startswith(".wdiff-") and p.name != MARKER]


@pytest.mark.parametrize("name", ["render.png", "render-side.png", "mesh.ply"])
def test_a_users_file_with_a_name_wdiff_writes_is_refused(tmp_path, monkeypatch, capsys, run_folder, results,
                                                         name):  # fmt: skip
    """A file of the user's, not in the marker, at a name wdiff writes (``render.png``: the earlier
    ``--no-render`` results have none): refused before any work, nothing touched."""
    out = tmp_path / "out"
    shutil.copytree(results, out)
    (out / name).write_bytes(b"my own picture")
    before = tree_hash(out)
    args = [str(run_folder), "-o", str(out), "--max-points", "64"]
    code, stdout, stderr = wdiff_run(monkeypatch, capsys, *args)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"wdiff: error: {out / name}: is not a file wdiff wrote"), stderr
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_results_of_wdiff_before_the_marker_are_still_replaced(tmp_path, monkeypatch, capsys, run_folder,
                                                               results):  # fmt: skip
    """Decided: results without the marker are results when they hold nothing but the names wdiff
    writes and a summary.json with ``wdiff_version`` and ``tensors``; anything more is refused."""
    out = tmp_path / "out"
    shutil.copytree(results, out)
    (out / MARKER).unlink()
    code, _, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, out))
    assert code == 0, stderr
    _assert_results(out)
    (out / MARKER).unlink()
    (out / "notes.md").write_text("mine")
    before = tree_hash(out)
    code, _, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, out))
    assert code == 2 and "holds files wdiff did not write" in stderr
    assert tree_hash(out) == before


BAD_MARKERS = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "another format": lambda text: text.replace('"wdiff-results"', '"other"'),
    "a newer schema": lambda text: text.replace('"schema": 1', '"schema": 2'),
    "a file outside": lambda text: text.replace('"files": [', '"files": [\n  "../x",'),
    "not JSON": lambda text: "\x00\xff",
}


@pytest.mark.parametrize("case", sorted(BAD_MARKERS) + ["a symlink", "a folder"])
def test_an_invalid_marker_is_no_marker(tmp_path, monkeypatch, capsys, run_folder, results, case):
    out = tmp_path / "out"
    shutil.copytree(results, out)
    (out / "notes.md").write_text("mine")
    marker = out / MARKER
    if case == "a symlink":
        shutil.copy(marker, tmp_path / "elsewhere")
        marker.unlink()
        marker.symlink_to(tmp_path / "elsewhere")
    elif case == "a folder":
        marker.unlink()
        marker.mkdir()
    else:
        marker.write_text(BAD_MARKERS[case](marker.read_text()))
    before = tree_hash(out)
    code, _, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, out))
    assert code == 2 and stderr.count("\n") == 1 and "holds files wdiff did not write" in stderr, stderr
    assert tree_hash(out) == before


def test_a_user_file_dropped_into_out_during_the_run_is_kept(tmp_path, results):
    """Between the check under the lock and the exchange: the file lands in the previous results'
    folder, and is moved back into the new OUT before that folder is removed."""
    out = tmp_path / "out"
    shutil.copytree(results, out)
    with Staging(out) as staging:
        assert staging.folder is not None and not staging.in_place
        for p in results.iterdir():
            if p.name != MARKER:
                shutil.copyfile(p, staging.folder / p.name)
        (out / "written-meanwhile.txt").write_text("mine")
        staging.commit()
    assert (out / "written-meanwhile.txt").read_text() == "mine"
    _assert_results(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 2. OUT is a mount point --------------------------------------------------------------------


def _bind_mount_works(tmp: Path) -> bool:
    if not (shutil.which("unshare") and shutil.which("mount")):
        return False
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    p = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {tmp / 'a'} {tmp / 'b'}"], capture_output=True,
        timeout=30,
    )  # fmt: skip
    shutil.rmtree(tmp / "a")
    shutil.rmtree(tmp / "b")
    return p.returncode == 0


def test_out_that_is_a_mount_point_is_written_in_place(tmp_path, run_folder):
    """A real bind mount (a Docker volume's shape) in a private mount namespace: renaming OUT fails with
    EBUSY there, which is what made every run into such an OUT fail. Two runs (the first into the
    empty mount, the second over its results and a user's file); each exit 0, results complete,
    the user's file kept, nothing left inside or beside OUT. OUT is a bind mount of ``volume``."""
    if not _bind_mount_works(tmp_path):
        pytest.skip("needs unshare -m and mount --bind (root in a user or mount namespace)")
    volume, out = tmp_path / "volume", tmp_path / "out"
    volume.mkdir()
    out.mkdir()
    args = " ".join(_args(run_folder, out))
    python = f"{sys.executable} -m wdiff run {args}"
    script = (
        f"mount --bind {volume} {out} && "
        f"python3 -c 'import os,sys; os.rename(sys.argv[1], sys.argv[1] + \"x\")' {out} 2>/dev/null; "
        f"[ -d {out} ] || exit 9; "  # EBUSY: the rename above must have failed
        f"{python} && echo mine > {out}/notes.md && {python}"
    )
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       env=HERE)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" or "Traceback" not in p.stderr
    _assert_results(volume)  # what the mount showed is in the volume
    assert (volume / "notes.md").read_text() == "mine\n"
    assert not [p.name for p in volume.iterdir() if p.name.startswith(".wdiff-") and p.name != MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "volume"]
    assert list(out.iterdir()) == []  # outside the namespace, OUT is the empty mount point


KILL_CHILD = """
import os, shutil, signal, sys
from pathlib import Path
from wdiff.outdir import Staging

out, new, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
staging = Staging(out)
for f in sorted(new.iterdir()):
    shutil.copyfile(f, staging.folder / f.name)
count = 0

def hook(event, args):
    global count
    if event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.unlink"):
        count += 1
        if count > k:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
staging.commit()
staging.close()
sys.addaudithook(lambda *a: None)
print("done", flush=True)
"""


def _generation(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("mode", ["whole folder", "file by file"])
def test_a_kill_at_any_step_of_the_swap_leaves_old_or_new_results(tmp_path, mode):
    """SIGKILL before each rename and removal of ``commit`` (counted by an audit hook in a real child
    process), then a real next writer: OUT holds the old generation or the new one, every file of
    it, and the user's file; nothing is left beside or inside OUT."""
    old = {"summary.json": "old", "accumulated.safetensors": "old map", "render-back.png": "old only"}
    new = {"summary.json": "new", "accumulated.safetensors": "new map", "scene.html": "new only"}
    _generation(tmp_path / "new", new)
    child = tmp_path / "child.py"
    child.write_text(KILL_CHILD)
    outcomes = []
    for k in range(60):
        root = tmp_path / f"k{k}"
        root.mkdir()
        out = root / "out"
        _generation(tmp_path / f"old{k}", old)
        with Staging(out) as staging:  # the old generation, committed by wdiff: it has a marker
            for name in old:
                shutil.copyfile(tmp_path / f"old{k}" / name, staging.folder / name)  # type: ignore[operator]
            staging.commit()
        if mode == "file by file":
            (out / "notes.md").write_text("mine")
        p = subprocess.run([sys.executable, str(child), str(out), str(tmp_path / "new"), str(k)],
                           capture_output=True, text=True, timeout=60, env=HERE)  # fmt: skip
        finished = p.stdout.strip() == "done"
        assert finished or p.returncode == -signal.SIGKILL, p.stderr
        Staging(out).close()  # the next writer: recovers, then gives up without writing
        ours = {p.name: p.read_text() for p in out.iterdir() if p.name not in (MARKER, "notes.md")}
        assert ours in (old, new), (k, ours)
        marker = read_marker(out)
        assert marker is not None and sorted(marker.files) == sorted(ours)
        if mode == "file by file":
            assert (out / "notes.md").read_text() == "mine"
        assert sorted(p.name for p in root.iterdir()) == ["out"], (k, list(root.iterdir()))
        outcomes.append("new" if ours == new else "old")
        if finished:
            break
    assert finished and "old" in outcomes and "new" in outcomes[:-1], outcomes


# --- 3. names ---------------------------------------------------------------------------------------


def test_a_245_character_out_name_works(tmp_path, monkeypatch, capsys, run_folder):
    out = tmp_path / ("r" * 245)
    for _ in range(2):
        code, _, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, out))
        assert code == 0, stderr
        _assert_results(out)
    assert len(os.fsencode(f".{base_name(out)}.wdiff-tmp-XXXXXXXX")) <= 255
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_symlinked_out_is_written_through_and_leaves_no_link_behind(tmp_path, monkeypatch, capsys,
                                                                      run_folder):  # fmt: skip
    real = tmp_path / "disk" / "results"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    for _ in range(2):
        code, _, stderr = wdiff_run(monkeypatch, capsys, *_args(run_folder, link))
        assert code == 0, stderr
        assert link.is_symlink() and os.readlink(link) == str(real)
        _assert_results(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["results"]


def test_out_whose_parent_is_a_file_is_one_line(tmp_path, run_folder):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "out"
    p = wdiff("run", *_args(run_folder, out))
    one_line_error(p, out, f"{tmp_path / 'notes.txt'} is not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- 4. reading results back: regular files inside OUT, summaries of the right shape ---------------


def test_report_never_follows_a_symlinked_picture_out_of_the_folder(tmp_path, results):
    import base64

    out = tmp_path / "out"
    shutil.copytree(results, out)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG private bytes outside the results " * 8)
    (out / "render.png").symlink_to(secret)
    (out / "render-back.png").symlink_to("/etc/passwd")
    p = wdiff("report", str(out))
    assert p.returncode == 0, p.stderr
    page = (out / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes())[:40].decode() not in page
    assert "render.png" not in page and "render-back.png" not in page


@pytest.mark.parametrize("name", ["summary.json", "accumulated.safetensors", "rows.safetensors"])
def test_report_refuses_results_whose_files_are_symlinks(tmp_path, results, name):
    out = tmp_path / "out"
    shutil.copytree(results, out)
    (out / name).rename(tmp_path / name)
    (out / name).symlink_to(tmp_path / name)
    one_line_error(wdiff("report", str(out)), out / name, "not a regular file")


def _edit_summary(out: Path, edit) -> None:
    path = out / "summary.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


SUMMARY_EDITS = {
    "tensors is a list": (lambda s: s.update(tensors=[1, 2]), "tensors: expected an object"),
    "shape of strings": (
        lambda s: s["tensors"]["layers.0.w"].update(shape=["4", "3"]),
        'tensors["layers.0.w"].shape[0]: expected an integer',
    ),
    "steps as strings": (lambda s: s["checkpoints"][0].update(step="one"), "checkpoints[0].step"),
    "one checkpoint": (lambda s: s.update(checkpoints=s["checkpoints"][:1]), "at least two checkpoints"),
    "l2 too short": (lambda s: s["tensors"]["layers.1.b"]["l2"].pop(), 'tensors["layers.1.b"].l2'),
    "numel missing": (lambda s: s["tensors"]["layers.1.b"].pop("numel"), "numel: expected a value"),
    "log history of strings": (
        lambda s: s.update(trainer_state={"log_history": ["loss went down"]}),
        "trainer_state.log_history[0]: expected an object",
    ),
    "bare NaN": (lambda s: s["tensors"]["layers.1.b"].update(net_l2=float("nan")), "a finite number or null"),
    "tensor not in the map": (
        lambda s: s["tensors"].update(ghost=dict(s["tensors"]["layers.1.b"])),
        "does not hold tensor 'ghost'",
    ),
}


@pytest.mark.parametrize("case", sorted(SUMMARY_EDITS))
def test_report_and_compare_refuse_a_summary_of_the_wrong_shape_in_one_line(tmp_path, results, case):
    edit, needle = SUMMARY_EDITS[case]
    out = tmp_path / "out"
    shutil.copytree(results, out)
    _edit_summary(out, edit)
    named = out / ("accumulated.safetensors" if case == "tensor not in the map" else "summary.json")
    one_line_error(wdiff("report", str(out)), named, needle)
    p = wdiff("compare", str(results), str(out), "-o", str(tmp_path / "cmp"), "--no-render")
    one_line_error(p, named, needle)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("case", ["empty folder", "user's folder", "a file", "summary is a list"])
def test_report_on_a_folder_that_is_not_results_is_one_line(tmp_path, results, case):
    out = tmp_path / "out"
    needle = "not wdiff results"
    if case == "empty folder":
        out.mkdir()
        needle = "no summary.json here"
    elif case == "user's folder":
        out.mkdir()
        (out / "summary.json").write_text("{}")
        (out / "thesis.tex").write_text("mine")
    elif case == "a file":
        out.write_text("mine")
        needle = "not a folder"
    else:
        shutil.copytree(results, out)
        (out / "summary.json").write_text("[]")
        needle = "the summary: expected an object"
    before = tree_hash(out)
    p = wdiff("report", str(out))
    one_line_error(p, out / "summary.json" if case == "summary is a list" else out, needle)
    assert tree_hash(out) == before


# --- 5. script injection ------------------------------------------------------------------------------

HOSTILE = {
    "a.<!--<script>": (3, 2),
    "b.</script><script>document.title='pwned'</script>": (2,),
    "c.&amp;\u2028\u2029<b>x</b>": (2, 2),
}
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    seq = random_sequence(HOSTILE, 3, seed=3)
    paths = [save(root / f"step-{k}.safetensors", c) for k, c in enumerate(seq)]
    out = root / "out"
    api.run(paths, out, max_points=64)
    return out


def test_hostile_tensor_names_stay_inside_the_json_block(hostile):
    page = (hostile / "scene.html").read_text()
    start = page.index('<script type="application/json" id="wdiff-data">')
    block = page[start : page.index("</script>", start)]
    assert "<" not in block[block.index(">") + 1 :] and "\u2028" not in block
    assert page.count("<script") - page.count("// Data comes from the <script") == 2  # data, viewer


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium and chromium-driver")
def test_hostile_tensor_names_in_headless_chromium(hostile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--window-size=800,600", "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get((hostile / "scene.html").as_uri())
        for _ in range(100):
            if driver.execute_script("return document.body.dataset.status") == "drawn":
                break
            time.sleep(0.1)
        assert driver.execute_script("return document.body.dataset.status") == "drawn"
        names = driver.execute_script(
            "return JSON.parse(document.getElementById('wdiff-data').textContent).tensors.map(t => t.name)"
        )
        assert sorted(names) == sorted(HOSTILE)
        assert driver.execute_script("return document.scripts.length") == 2
        assert driver.title != "pwned"
        driver.get((hostile / "report.html").as_uri())
        assert driver.execute_script("return document.scripts.length") == 0
        text = driver.execute_script("return document.body.innerText")
        assert driver.title != "pwned" and all(name.split("\u2028")[0] in text for name in HOSTILE)
        sections = driver.execute_script("return [...document.querySelectorAll('h2')].map(e=>e.textContent)")
        assert sections[:3] == ["What to change", "Run", "Findings"] and "3D view" in sections
    finally:
        driver.quit()


# --- 6. view without a usable display ---------------------------------------------------------------


@pytest.mark.parametrize("env", [{"DISPLAY": ":99"}, {"WAYLAND_DISPLAY": "wayland-9"}])
def test_view_without_a_usable_display_exits_2_within_seconds(results, env):
    if env.get("DISPLAY") and os.path.exists("/tmp/.X11-unix/X99"):
        pytest.skip("an X server is running on :99 here")
    clean = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    start = time.monotonic()
    p = wdiff("view", str(results), env={**clean, **env}, timeout=60)
    elapsed = time.monotonic() - start
    one_line_error(p, results, "no display")
    assert "scene.html" in p.stderr and elapsed < 10, elapsed


# --- 7. fuzzing -------------------------------------------------------------------------------------


def _snapshot(path: Path) -> str:
    """What a user's entry is: kind and bytes, or a link's target (never followed)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "link:" + os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return "dir:" + tree_hash(path)
    return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()


WDIFF_NAMES = ["summary.json", "accumulated.safetensors", "report.html", "render-back.png", "scene.html",
               ".report.html.12.0a1b2c3d.tmp", "rows.safetensors"]  # fmt: skip
USER_NAMES = ["notes.md", "data", "README", ".hidden", "summary.json.bak", "render-x.png", "ünï cödé", "a b"]
NEW = {"summary.json": "new summary", "accumulated.safetensors": "new map", "scene.html": "new page"}


def _random_marker(rng: random.Random, files: list[str]) -> tuple[str, bool]:
    """Marker text and whether it is valid."""
    from wdiff.marker import marker_text

    text = marker_text(files, f"{rng.getrandbits(32):08x}")
    damage = rng.choice(["none", "none", "truncate", "format", "schema", "files", "bytes", "type"])
    if damage == "none":
        return text, True
    if damage == "truncate":
        return text[: rng.randrange(len(text))], False
    if damage == "format":
        return text.replace("wdiff-results", "wdiff-result"), False
    if damage == "schema":
        schema = rng.choice(['"schema": "1"', '"schema": 1.0', '"schema": true'])
        return text.replace('"schema": 1', schema), False
    if damage == "files":
        bad = rng.choice(['"../x", ', '"", ', "1, ", '".wdiff-journal", '])
        return text.replace('"files": [', '"files": [' + bad), False
    if damage == "type":
        return rng.choice(["[]", "null", '"wdiff-results"', "{}"]), False
    raw = bytearray(text.encode())
    raw[rng.randrange(len(raw))] = rng.randrange(128)
    return raw.decode(), _marker_is_valid(raw.decode(), files)


def _marker_is_valid(text: str, files: list[str]) -> bool:
    """The generator's own judgement of a damaged marker (valid only if it still lists ``files``)."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(data, dict) and data.get("format") == "wdiff-results" and type(data.get("schema")) is int
        and data["schema"] == 1 and isinstance(data.get("generation"), str)
        and isinstance(data.get("wdiff_version"), str) and data.get("files") == sorted(files)
    )  # fmt: skip


def _make_entry(rng: random.Random, folder: Path, name: str, outside: Path) -> None:
    kind = rng.choice(["file", "file", "file", "dir", "link-in", "link-out", "dangling"])
    path = folder / name
    if kind == "file":
        path.write_bytes(rng.randbytes(rng.randrange(40)))
    elif kind == "dir":
        path.mkdir()
        (path / "inner.txt").write_text(str(rng.random()))
    elif kind == "link-in":
        path.symlink_to(name + ".target")
    elif kind == "link-out":
        path.symlink_to(outside)
    else:
        path.symlink_to(folder / "nothing-here")


def _summary_variant(rng: random.Random) -> str:
    return rng.choice([
        json.dumps({"wdiff_version": "0.0.9", "tensors": {}}), json.dumps({"tensors": {}}), "{}", "[]", "",
        json.dumps({"wdiff_version": 1, "tensors": {}}), '{"wdiff_version": "0.1.0", "tensors": {', "NaN",
    ])  # fmt: skip


def _out_case(rng: random.Random, root: Path) -> None:
    """Random pre-existing OUT (and leftovers beside it); a commit of NEW; then the checks."""
    out = root / "out"
    outside = root / "outside.txt"
    outside.write_text("outside")
    shape = rng.choice(["missing", "empty", "contents", "contents", "contents", "file", "symlink"])
    target_dir = out
    if shape == "file":
        out.write_text("mine")
    elif shape == "symlink":
        target_dir = root / "real"
        target_dir.mkdir()
        out.symlink_to(target_dir)
    elif shape != "missing":
        out.mkdir()
    protected: dict[str, str] = {}
    if shape in ("contents", "symlink"):
        wdiff_files = rng.sample(WDIFF_NAMES, rng.randrange(len(WDIFF_NAMES) + 1))
        user_files = rng.sample(USER_NAMES, rng.randrange(4))
        for name in wdiff_files:
            if name == "summary.json" and rng.random() < 0.5:
                (target_dir / name).write_text(_summary_variant(rng))
            else:
                _make_entry(rng, target_dir, name, outside)
        for name in user_files:
            _make_entry(rng, target_dir, name, outside)
        listed = [n for n in wdiff_files if rng.random() < 0.9]
        valid = False
        if rng.random() < 0.8:
            text, valid = _random_marker(rng, listed)
            (target_dir / MARKER).write_text(text)
        if rng.random() < 0.05:
            (target_dir / ".wdiff-journal").write_text(rng.choice(["{}", "", '{"staging": ".wdiff-tmp-x"}']))
            valid = False
        # the user's: what no valid marker lists, and without one, every name wdiff does not write
        for entry in os.listdir(target_dir):
            if entry in (MARKER, ".wdiff-journal"):
                continue
            # (a leftover of wdiff's atomic writes, ``.report.html.PID.XXXXXXXX.tmp``, is wdiff's)
            leftover = entry.startswith(".") and is_wdiff_name(entry) and (target_dir / entry).is_file()
            if (valid and entry not in listed and not leftover) or (not valid and not is_wdiff_name(entry)):
                protected[entry] = _snapshot(target_dir / entry)
    beside = {}
    if rng.random() < 0.3:  # leftovers of killed runs, and a user's look-alike without a stamp
        stale = root / f".out.wdiff-tmp-{rng.choice(['k1ll3d', 'abcdefgh'])}"
        stale.mkdir()
        (stale / "summary.json").write_text("half")
        if rng.random() < 0.5:
            (stale / ".wdiff-staging").write_text("1")
        else:
            (stale / "precious.txt").write_text("mine")
            beside[stale.name] = _snapshot(stale)
    before_out = _snapshot(out) if os.path.lexists(out) else None
    try:
        with Staging(out) as staging:
            assert staging.folder is not None
            for name, text in NEW.items():
                (staging.folder / name).write_text(text)
            staging.commit()
    except WdiffError as e:
        assert "\n" not in str(e)
        if shape in ("contents", "symlink") and "another wdiff" not in str(e):
            allowed = ("is not a file wdiff wrote", "is damaged")
            assert contents(target_dir) is None or any(a in str(e) for a in allowed), str(e)
        assert (_snapshot(out) if os.path.lexists(out) else None) == before_out
        ok = False
    else:
        ok = True
        assert shape != "file"
        marker = read_marker(target_dir)
        assert marker is not None and sorted(marker.files) == sorted(NEW), marker
        assert {n: (target_dir / n).read_text() for n in NEW} == NEW
        if shape == "symlink":
            assert out.is_symlink()
        leftovers = [p for p in os.listdir(target_dir) if p.startswith(".wdiff-") and p != MARKER]
        assert not leftovers, leftovers
    for entry, snap in protected.items():  # whatever the outcome: the user's entries as they were
        if ok or shape != "file":
            path = target_dir / entry
            assert os.path.lexists(path), (entry, "deleted")
            assert _snapshot(path) == snap, (entry, "changed")
    for entry, snap in beside.items():
        assert os.path.lexists(root / entry) and _snapshot(root / entry) == snap
        assert (root / entry / "precious.txt").read_text() == "mine"


def _fuzz_out(tmp_path: Path, cases: int, seed: int) -> None:
    rng = random.Random(seed)
    for case in range(cases):
        root = tmp_path / f"c{case}"
        root.mkdir()
        state = rng.getstate()
        try:
            _out_case(rng, root)
        except AssertionError as e:
            rng.setstate(state)
            raise AssertionError(f"seed {seed} case {case}: {e}") from e
        shutil.rmtree(root)


def test_fuzz_out_folders_quick(tmp_path):
    _fuzz_out(tmp_path, QUICK, 17)


@pytest.mark.slow
def test_fuzz_out_folders_long(tmp_path):
    seed = int(os.environ.get("WDIFF_FUZZ_SEED", random.randrange(2**32)))
    print(f"seed {seed}")
    _fuzz_out(tmp_path, LONG, seed)


def _mutate(rng: random.Random, value, depth: int = 0):
    """One random change somewhere in a JSON value: a node replaced by a value of another type, a key
    dropped or added, a list cut or grown."""
    replacements = [None, True, -1, 0, 2**70, 1e308, -0.0, "x", "", [], {}, [1, "a"], {"a": None},
                    float("nan"), float("inf"), 3.5, ["4", "3"], [0], [2**63], "</script>"]  # fmt: skip
    if depth > 0 and rng.random() < 0.25:
        return rng.choice(replacements)
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        roll = rng.random()
        copy = dict(value)
        if roll < 0.15:
            del copy[key]
        elif roll < 0.2:
            copy[rng.choice(["extra", "step", "shape", key + "x"])] = rng.choice(replacements)
        else:
            copy[key] = _mutate(rng, value[key], depth + 1)
        return copy
    if isinstance(value, list) and value:
        roll = rng.random()
        copy = list(value)
        if roll < 0.15:
            copy.pop(rng.randrange(len(copy)))
        elif roll < 0.25:
            copy.append(rng.choice(replacements + copy))
        else:
            i = rng.randrange(len(copy))
            copy[i] = _mutate(rng, copy[i], depth + 1)
        return copy
    return rng.choice(replacements)


def _summary_fuzz(tmp_path: Path, results: Path, cases: int, seed: int, compare_every: int) -> dict[str, int]:
    from wdiff.report import compare, write_report

    rng = random.Random(seed)
    original = json.loads((results / "summary.json").read_text())
    out = tmp_path / "out"
    shutil.copytree(results, out)
    tally = {"report": 0, "refused": 0, "compare": 0}
    for case in range(cases):
        summary = original
        for _ in range(rng.choice([1, 1, 2, 3])):
            summary = _mutate(rng, summary)
        text = json.dumps(summary)
        if rng.random() < 0.1:  # and the bytes themselves
            cut = rng.randrange(len(text))
            text = (
                text[:cut] + rng.choice(["", "}", "\x00", "\ud800", "]]]"]) + text[cut + rng.randrange(3) :]
            )
        (out / "summary.json").write_text(text, errors="surrogatepass")
        try:
            write_report(out, charts=False)
            tally["report"] += 1
        except WdiffError as e:
            assert "\n" not in str(e) and str(e).startswith(str(out)), str(e)
            tally["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"seed {seed} case {case}: {type(e).__name__}: {e}\n{text[:2000]}") from e
        if case % compare_every == 0:
            cmp = tmp_path / "cmp"
            try:
                compare(results, out, cmp, render=False)
                tally["compare"] += 1
            except WdiffError as e:
                assert "\n" not in str(e)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"compare, seed {seed} case {case}: {type(e).__name__}: {e}") from e
            shutil.rmtree(cmp, ignore_errors=True)
    return tally


def test_fuzz_summary_quick(tmp_path, results):
    tally = _summary_fuzz(tmp_path, results, QUICK, 11, compare_every=20)
    assert tally["report"] > 10 and tally["refused"] > 50, tally


@pytest.mark.slow
def test_fuzz_summary_long(tmp_path, results):
    seed = int(os.environ.get("WDIFF_FUZZ_SEED", random.randrange(2**32)))
    tally = _summary_fuzz(tmp_path, results, LONG, seed, compare_every=10)
    print(f"seed {seed}: {tally}")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda spec: spec.pop("k"), "update_spectrum.k"),  # found by test_fuzz_summary_long: KeyError
        (lambda spec: spec.update(k=-1), "update_spectrum.k"),
        (lambda spec: spec.update(lora={"r": 4}), "update_spectrum.lora.rank_used"),
        (lambda spec: spec.update(lora={"r": 4, "rank_used": 2, "rank_for_energy": [1]}), "lora.rank_for"),
    ],
)
def test_a_damaged_update_spectrum_is_refused_in_one_line(tmp_path, results, change, field):
    from wdiff.report import write_report

    out = tmp_path / "out"
    shutil.copytree(results, out)
    summary = json.loads((out / "summary.json").read_text())
    spec = next(t["update_spectrum"] for t in summary["tensors"].values() if "update_spectrum" in t)
    change(spec)
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(WdiffError) as e:
        write_report(out, charts=False)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(out)) and field in line, line


def test_a_report_is_written_from_a_summary_with_a_lone_surrogate_and_huge_norms(tmp_path, results):
    """Found by test_fuzz_summary_long: a JSON ``\\ud800`` in a string (UTF-8 cannot hold it) and a
    norm of 1e308 (squared: beyond float64) ended the report with UnicodeEncodeError and OverflowError."""
    from wdiff.report import write_report

    out = tmp_path / "out"
    shutil.copytree(results, out)
    summary = json.loads((out / "summary.json").read_text())
    summary["created"] = "\ud800 2026"
    entry = next(iter(summary["tensors"].values()))
    entry["interval_l2"][-1] = entry["l2"][-1] = 1e308
    (out / "summary.json").write_text(json.dumps(summary))
    write_report(out, charts=False)
    page = (out / "report.html").read_text()
    assert "\\ud800 2026" in page


def test_a_summary_of_a_newer_schema_is_refused_in_one_line(earlier_results, tmp_path):
    """summary.json says its schema; one written by a newer wdiff is refused, never half read, and one
    without the key (written before it existed) is of the first schema."""
    from wdiff.schema import SUMMARY_SCHEMA, check_summary, read_summary

    summary = json.loads((earlier_results / "summary.json").read_text())
    assert summary["schema"] == SUMMARY_SCHEMA
    del summary["schema"]
    assert check_summary(summary) is summary
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary | {"schema": SUMMARY_SCHEMA + 1}))
    with pytest.raises(WdiffError, match=r"summary.json: not wdiff's summary: schema: expected at most 1 "):
        read_summary(path)


def test_a_full_disk_is_refused_before_anything_is_read(tmp_path):
    """OUT on a real 1 MiB tmpfs (a private mount namespace) and a run whose map needs 2 MiB: the map's
    blocks are reserved when it is created, so the run stops there with one line naming the file and
    the cause, exit 2, and nothing is left on the disk afterwards (no half-written results)."""
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save(run / f"checkpoint-{step}" / "model.safetensors",
             {"w": np.full((512, 1024), step, np.float32)})  # fmt: skip
    disk = tmp_path / "disk"
    disk.mkdir()
    command = f"{sys.executable} -m wdiff run {run} -o {disk}/out -q --no-render"
    script = f'mount -t tmpfs -o size=1m tmpfs {disk} && {command}; echo "exit=$?" >&2; ls -A {disk} >&2'
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       env=HERE)  # fmt: skip
    if "exit=" not in p.stderr:
        pytest.skip(f"needs unshare -m and a tmpfs mount (root): {p.stderr.strip()}")
    error, status, *left = p.stderr.splitlines()
    assert status == "exit=2", p.stderr
    assert error.startswith(f"wdiff: error: {disk}/.out.wdiff-tmp-"), error  # the results' staging folder
    assert error.split(": ")[2].endswith("/accumulated.safetensors"), error
    assert "cannot reserve 2,097," in error and "for the results: No space left on device" in error, error
    assert error.endswith(
        "(--map-dtype bfloat16 stores it in half the bytes, --map-dtype none stores no map)"
    ), error
    assert "Traceback" not in p.stderr and left == [], p.stderr  # no OUT, no staging folder left
