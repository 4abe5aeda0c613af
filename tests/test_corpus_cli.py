"""The corpus of the command line itself: what reaches the terminal, how every kind of ending looks.

Everything here runs the real ``python -m wdiff`` (a subprocess: real exit codes, real stderr, a real
SIGINT, a real terminal through a pty):

- text from outside (tensor names, OUT and input paths, error messages) holding rich markup, emoji
  codes, newlines, terminal escape sequences, C1 controls, bidi overrides or undecodable bytes is
  printed literally with control characters as escapes: no crash, one line stays one line, and the
  terminal is never driven by a name;
- Ctrl-C during ``wdiff run``: ``wdiff: interrupted``, exit code 130, nothing left beside OUT;
- usage errors of every command: exactly one line, exit code 2;
- every numeric option (and the scheduler) is checked before any work: one line naming the flag;
  the library names the parameter;
- ``read_bytes`` in ``summary.json`` and the progress are the checkpoints' bytes on every scheduler.
"""

from __future__ import annotations

import json
import math
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factories import MALFORMED, random_sequence, save, trainer_run

import wdiff
from wdiff import api, checks
from wdiff.errors import WdiffError
from wdiff.terminal import visible
from wdiff.watcher import watch

ROOT = Path(__file__).resolve().parents[1]  # cwd of every subprocess: this worktree's wdiff is imported

# Names that would drive a terminal or rich if printed as they are: markup (MarkupError or a colour),
# an emoji code, a newline (an error split in two), CSI and OSC escape sequences (clear the screen,
# set the window title), a one-byte C1 CSI, a right-to-left override, DEL and a bell.
HOSTILE = {
    "markup": "a[/red]b[bold]c",
    "emoji": "w:smile:",
    "newline": "line\nbreak",
    "csi": "x\x1b[2J\x1b[31mred",
    "osc": "t\x1b]0;PWNED\x07",
    "c1": "c1\x9b2J",
    "bidi": "rtl\u202egnp.exe",
    "del": "del\x7f\x08",
}
RAW = ["\x1b", "\x9b", "\u202e", "\x07", "\x7f", "\x08", "PWNED\x07"]


def wdiff_cli(*args: str | bytes, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m wdiff ARGS`` as bytes in and out (an undecodable name must pass untouched)."""
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], capture_output=True, cwd=ROOT, timeout=timeout, **kwargs
    )


def _no_raw_controls(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    for raw in RAW:
        assert raw not in text, f"{raw!r} reached the terminal: {text!r}"


def _hostile_run(tmp: Path) -> Path:
    """An HF run whose tensors carry every hostile name: all but one change (one is frozen: it is a
    finding, so its name is in the table on stderr), and one is missing from the first checkpoint
    (a warning names it)."""
    shapes = {name: (3, 2) for name in HOSTILE.values()}
    seq = random_sequence({**shapes, "late[/]\x1b[1m": (2,)}, 3, seed=4)
    seq[0].pop("late[/]\x1b[1m")
    for c in seq[1:]:
        c[HOSTILE["markup"]] = seq[0][HOSTILE["markup"]]  # frozen
    return trainer_run(tmp / "run", seq, steps=[1, 2, 3])


# --- what reaches the terminal --------------------------------------------------------------------


def test_visible_escapes_every_control_and_nothing_else():
    assert visible("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert visible("\x00\x1b[31m\x7f\x85\x9b") == "\\x00\\x1b[31m\\x7f\\x85\\x9b"
    assert visible("\u2028\u2029\u202a\u202e\u2066\u2069") == "\\u2028\\u2029\\u202a\\u202e\\u2066\\u2069"
    assert visible("caf\udce9\ud800") == "caf\\udce9\\ud800"  # an undecodable byte, a lone surrogate
    printable = "[/red] :smile: café 模型 ü\u200b\\n 🙂"
    assert visible(printable) == printable  # markup is the console's business; printable text stays
    for text in [*HOSTILE.values(), "caf\udce9"]:
        once = visible(text)
        assert once.isprintable() and visible(once) == once  # one line, and idempotent
        once.encode("utf-8")  # always printable to a UTF-8 terminal (no lone surrogate)


def test_wdiff_error_is_one_safe_line_and_keeps_the_path():
    e = WdiffError("dir/bad\n\x1b[2J.safetensors", "tensor 'a\x1b]0;x\x07': broken\nagain")
    assert str(e) == "dir/bad\\n\\x1b[2J.safetensors: tensor 'a\\x1b]0;x\\x07': broken again"
    assert e.path == "dir/bad\n\x1b[2J.safetensors"  # the caller still gets the real path


def test_hostile_tensor_names_and_out_path_print_literally(tmp_path):
    """Markup in a tensor name or in OUT crashed with MarkupError (for OUT after the results were
    written: exit code 1); escape sequences in them drove the terminal."""
    run = _hostile_run(tmp_path)
    out = tmp_path / "out[/red]\x1b]0;PWNED\x07\nx"
    p = wdiff_cli("run", str(run), "-o", str(out), "--no-render", "--max-points", "256")
    assert p.returncode == 0, p.stderr
    assert (out / "summary.json").is_file()
    _no_raw_controls(p.stdout + p.stderr)
    stdout, stderr = p.stdout.decode(), p.stderr.decode()
    assert stdout.count("\n") == 1 and stdout.startswith(visible(out) + ": 8 tensors over 3 checkpoints")
    assert "warning: late[/]\\x1b[1m: missing from 1 checkpoint(s)" in stderr
    assert "a[/red]b[bold]c" in stderr  # the frozen tensor, in the findings table, as it is named
    assert f"report: {visible(out)}/report.html" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(HOSTILE.values()) <= set(summary["tensors"])  # the files keep the real names


def test_a_terminal_is_never_driven_by_a_name(tmp_path):
    """The same on a real terminal (a pty): progress bar, colours, the findings table. rich writes
    its own escape sequences there; none comes from a name, and the run completes."""
    run = _hostile_run(tmp_path)
    out = tmp_path / "o\x1b]0;PWNED\x07[/red]"
    master, slave = pty.openpty()
    args = [sys.executable, "-m", "wdiff", "run", str(run), "-o", str(out), "--no-render", "--max-points=256"]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"},
    )  # fmt: skip
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0, screen.decode(errors="replace")
    text = screen.decode("utf-8", "replace")
    assert "PWNED\x07" not in text and "\x1b]0;PWNED" not in text  # the name never set the title
    assert "\\x1b]0;PWNED\\x07" in text and "[/red]" in text  # it was shown, escaped, literally
    assert "\x9b" not in text and "\u202e" not in text


def test_an_error_naming_a_hostile_file_is_one_line(tmp_path):
    """A file name with a newline split the error in two; one with escapes drove the terminal."""
    good = save(tmp_path / "good.safetensors", random_sequence({"w": (2, 2)}, 1)[0])
    bad = tmp_path / "bad\n\x1b[2J\x1b]0;PWNED\x07[red]\x9b.safetensors"
    bad.write_bytes(MALFORMED["truncated"])
    p = wdiff_cli("run", str(good), str(bad), "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 2 and p.stdout == b""
    _no_raw_controls(p.stderr)
    assert p.stderr.count(b"\n") == 1
    assert p.stderr.decode().startswith(f"wdiff: error: {visible(bad)}: ")


def test_an_undecodable_out_name_is_printed_with_escapes(tmp_path):
    """A file name that is not UTF-8 reaches Python as lone surrogates, which stdout cannot encode."""
    run = trainer_run(tmp_path / "run", random_sequence({"w": (3, 2)}, 2), steps=[1, 2])
    out = os.fsencode(tmp_path) + b"/out\xff\xfe"
    p = wdiff_cli("run", str(run), "-o", out, "--no-render", "-q")
    assert p.returncode == 0, p.stderr
    assert os.path.isfile(out + b"/summary.json")
    assert p.stdout.decode().startswith(f"{tmp_path}/out\\udcff\\udcfe: 1 tensors over 2 checkpoints")


def test_a_bad_option_value_with_escapes_is_one_line(tmp_path):
    p = wdiff_cli("run", str(tmp_path), "-o", str(tmp_path / "o"), "--views", "top,\x1b]0;PWNED\x07\nx")
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1, p.stderr
    _no_raw_controls(p.stderr)
    assert p.stderr.startswith(b"wdiff: error: --views must be one of ")


# --- Ctrl-C --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory) -> Path:
    """A run whose compute lasts seconds: 67 MB in tasks of 512 elements (about 8,000 tasks)."""
    root = tmp_path_factory.mktemp("slow")
    seq = random_sequence({"layers.0.w": (2048, 1024), "layers.1.w": (1024, 2048)}, 4, seed=3)
    return trainer_run(root / "run", seq, steps=[1, 2, 3, 4])


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
@pytest.mark.parametrize("group", [False, True], ids=["to wdiff", "to the process group"])
def test_ctrl_c_during_a_run_says_interrupted(tmp_path, slow_run, scheduler, group):
    """SIGINT once the scan line is out (compute has started): ``wdiff: interrupted``, exit 130,
    no traceback, no results and nothing left beside OUT, no process left over. ``group``: to the
    whole process group, as a terminal's Ctrl-C sends it (the worker processes get it too)."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wdiff", "run", str(slow_run), "-o", str(out), "--no-render"]
    args += ["--chunk-mb", "0.002", "--max-points", "4096", "--scheduler", scheduler]
    # in its own process group: a terminal's group, and where to look for processes it leaves
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    scanned = proc.stderr.readline()
    assert scanned.startswith(b"4 checkpoints (steps 1 .. 4)"), scanned + proc.stderr.read()
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted: make it slower"
    t0 = time.monotonic()
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    waited = time.monotonic() - t0
    assert proc.returncode == 130, stderr
    assert stderr == b"wdiff: interrupted\n" and stdout == b"", stderr.decode()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary folder, no lock file
    for _ in range(100):  # worker processes and Dask's resource tracker end within a few seconds
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the interrupted run are still alive")
    print(f"{scheduler}: exited {waited:.2f} s after SIGINT")


# --- usage errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "IN"], "Missing option '-o' / '--out'. (see 'wdiff run --help')"),
        (["run", "IN", "-o", "OUT", "--bogus"], "No such option: --bogus"),
        (["run", "IN", "-o", "OUT", "--max-points"], "Option '--max-points' requires an argument"),
        (["run", "IN", "-o", "OUT", "--max-points", "many"], "Invalid value for '--max-points': 'many'"),
        (["run", "IN", "-o", "OUT", "--chunk-mb", "lots"], "Invalid value for '--chunk-mb'"),
        (["run", "-o", "OUT"], "Missing argument"),
        (["run"], "Missing argument"),
        (["watch", "IN"], "Missing option '-o' / '--out'. (see 'wdiff watch --help')"),
        (["watch", "IN", "-o", "OUT", "--poll", "often"], "Invalid value for '--poll'"),
        (["report"], "Missing argument 'out'. (see 'wdiff report --help')"),
        (["report", "OUT", "--bogus"], "No such option: --bogus"),
        (["compare", "OUT", "OUT"], "Missing option '-o' / '--out'. (see 'wdiff compare --help')"),
        (["compare", "OUT"], "Missing argument"),
        (["view"], "Missing argument 'out'. (see 'wdiff view --help')"),
        (["view", "OUT", "extra"], "Got unexpected extra argument"),
        (["bogus"], "No such command 'bogus'. (see 'wdiff --help')"),
        (["--bogus"], "No such option: --bogus"),
        (["run", "IN", "-o", "OUT", "--bo\x1b]0;PWNED\x07"], "No such option: --bo\\x1b]0;PWNED\\x07"),
    ],
)
def test_every_usage_error_is_one_line(tmp_path, args, needle):
    """click and typer drew a four-line box; docs/cli.md promises ``wdiff: error: ...``, exit 2."""
    args = [a.replace("IN", str(tmp_path)).replace("OUT", str(tmp_path / "out")) for a in args]
    p = wdiff_cli(*args)
    assert p.returncode == 2 and p.stdout == b"", p.stderr
    _no_raw_controls(p.stderr)
    stderr = p.stderr.decode()
    assert stderr.count("\n") == 1 and stderr.startswith("wdiff: error: ") and needle in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_help_version_and_no_arguments_are_unchanged():
    p = wdiff_cli("run", "--help")
    assert p.returncode == 0 and b"--chunk-mb" in p.stdout
    p = wdiff_cli("--version")
    assert p.returncode == 0 and p.stdout == f"wdiff {wdiff.__version__}\n".encode()
    p = wdiff_cli()
    assert p.returncode == 2 and b"Usage: wdiff" in p.stdout + p.stderr


# --- option ranges -------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("--chunk-mb", "nan", "--chunk-mb must be a number above 0 and at most 1048576, got nan"),
    ("--chunk-mb", "inf", "--chunk-mb must be a number above 0"),
    ("--chunk-mb", "0", "--chunk-mb must be a number above 0"),
    ("--chunk-mb", "-4", "--chunk-mb must be a number above 0"),
    ("--chunk-mb", "1e30", "--chunk-mb must be a number above 0 and at most 1048576"),
    ("--workers", "-1", "--workers must be an integer from 1 to 1024, got -1"),
    ("--workers", "0", "--workers must be an integer from 1 to 1024, got 0"),
    ("--workers", "100000", "--workers must be an integer from 1 to 1024"),
    ("--max-points", "0", "--max-points must be an integer from 1 to 1000000000000, got 0"),
    ("--max-points", "-5", "--max-points must be an integer from 1"),
    ("--max-points", str(10**400), "--max-points must be an integer from 1 to 1000000000000"),
    ("--html-points", "-1", "--html-points must be an integer from 0 to 1000000000000, got -1"),
    ("--size", "100x100", "--size 100x100: width 320..8192 and height 240..8192 pixels"),
    ("--size", "99999x800", "width 320..8192"),
    ("--size", "²x800", "--size must look like 1280x800"),
    ("--size", "-1280x800", "--size must look like 1280x800"),
    ("--size", "1280", "--size must look like 1280x800"),
    ("--views", "", "--views needs at least one view"),
    ("--views", "top,sky", "--views must be one of oblique, back, side, top, front; got 'sky'"),
    ("--views", "top,top", "--views names a view twice"),
    ("--pool", "median", "--pool must be one of"),
    ("--scheduler", "bogus", "'bogus' is an unknown scheduler: use threads, processes, sync, local:N"),
    ("--scheduler", "local:0", "'local:0': N in local:N must be a positive integer, at most 1024"),
    ("--scheduler", "local:x", "N in local:N must be a positive integer"),
    ("--scheduler", "local:99999", "N in local:N must be a positive integer"),
    ("--scheduler", "tcp://", "is an unknown scheduler"),
    ("--scheduler", "tcp://host:99999", "is an unknown scheduler"),
    ("--scheduler", "ftp://host:8786", "is an unknown scheduler"),
    ("--scheduler", "host name:8786", "is an unknown scheduler"),
    ("--scheduler", "", "is an unknown scheduler"),
]


# every case through `run`; through `watch` (the same options, checked by the same code) one per flag
_FIRST = {flag: (flag, value, needle) for flag, value, needle in reversed(BAD_OPTIONS)}
OPTION_CASES = [("run", *case) for case in BAD_OPTIONS] + [("watch", *case) for case in _FIRST.values()]


@pytest.mark.parametrize("command, flag, value, needle", OPTION_CASES)
def test_every_option_is_range_checked_before_any_work(tmp_path, command, flag, value, needle):
    """The input does not exist: an error about the option proves it was checked before the scan
    (``wdiff watch`` would otherwise wait for checkpoints forever)."""
    p = wdiff_cli(command, str(tmp_path / "missing"), "-o", str(tmp_path / "out"), flag, value, timeout=60)
    assert p.returncode == 2 and p.stdout == b"", p.stderr
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wdiff: error: {flag}") and needle in lines[0], lines
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "0", "0.01", "nan", "inf", "1e9"])
def test_watch_poll_is_range_checked(tmp_path, value):
    """``--poll -1`` busy-looped; NaN or inf never woke up (or crashed threading)."""
    p = wdiff_cli("watch", str(tmp_path), "-o", str(tmp_path / "out"), "--poll", value, timeout=60)
    assert p.returncode == 2, p.stderr
    expected = f"wdiff: error: --poll must be a number from 0.1 to 86400, got {float(value)}\n"
    assert p.stderr.decode() == expected


def test_a_budget_too_small_for_the_tensors_names_the_flag(tmp_path):
    """Found by the library after the scan (it needs the tensor count): the CLI still says the flag."""
    run = trainer_run(tmp_path / "run", random_sequence({"a": (4, 4), "b": (4,), "c": (2,)}, 2), [1, 2])
    p = wdiff_cli("run", str(run), "-o", str(tmp_path / "out"), "--max-points", "2", "--no-render", "-q")
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1
    assert p.stderr.startswith(b"wdiff: error: --max-points 2: "), p.stderr


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"workers": -1}, "workers must be an integer from 1 to 1024, got -1"),
        ({"workers": True}, "workers must be an integer"),
        ({"workers": 2.5}, "workers must be an integer"),
        ({"chunk_elements": 0}, "chunk_elements must be an integer from 1 to 274877906944, got 0"),
        ({"chunk_elements": math.nan}, "chunk_elements must be an integer"),
        ({"max_points": 0}, "max_points must be an integer from 1"),
        ({"max_points": -3}, "max_points must be an integer from 1"),
        ({"frame_points": 0}, "frame_points must be an integer from 1"),
        ({"scheduler": "bogus"}, "scheduler 'bogus' is an unknown scheduler"),
        ({"scheduler": None}, "scheduler None is an unknown scheduler"),
        ({"scheduler": "local:-2"}, "scheduler 'local:-2': N in local:N"),
    ],
)
def test_the_library_names_the_parameter(tmp_path, options, needle):
    with pytest.raises(checks.OptionError) as caught:
        api.run(tmp_path / "missing", tmp_path / "out", render=False, **options)
    assert str(caught.value) == needle or str(caught.value).startswith(needle)
    assert caught.value.parameter == next(iter(options))
    with pytest.raises(checks.OptionError) as caught:
        watch(tmp_path / "missing", tmp_path / "out", **options)
    assert str(caught.value).startswith(needle)
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("poll", [-1, 0, math.nan, math.inf, 1e300, "10"])
def test_the_library_refuses_a_bad_poll(tmp_path, poll):
    with pytest.raises(checks.OptionError, match="^poll must be a number from 0.1 to 86400"):
        watch(tmp_path, tmp_path / "out", poll=poll)


@pytest.mark.parametrize(
    "address",
    ["threads", "processes", "sync", "local:1", "local:1024", "tcp://10.0.0.1:8786", "tcp://scheduler",
     "tls://dask.example.org:8786", "scheduler:8786", "[::1]:8786", "tcp://[fe80::1]:8786", "ws://h:1",
     "inproc://10.0.0.1/4242/1"],
)  # fmt: skip
def test_scheduler_syntax_that_is_accepted(address):
    assert checks.scheduler("scheduler", address) == address


def test_the_typer_usage_error_class_is_what_main_catches():
    """typer carries its own click (``typer._click``); ``cli`` finds its UsageError through
    ``typer.BadParameter``. A typer upgrade that moves it fails here, not in users' hands."""
    from wdiff import cli

    assert cli._UsageError.__name__ == "UsageError" and issubclass(cli._UsageError, Exception)


# --- read_bytes on every scheduler ---------------------------------------------------------------


def _data_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file: its size less the 8-byte length and the header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("scheduler", ["threads", "processes", "sync", "local:2"])
def test_read_bytes_are_the_checkpoints_bytes_on_every_scheduler(tmp_path, scheduler):
    """``--scheduler processes`` said ``read_bytes: 0`` ("0 B read at 0 B/s"): Dask's multiprocessing
    scheduler fused each one-chunk tensor's task into its aggregate task, out of the callbacks' sight.
    Tensors of one chunk and of several, a scalar, and an empty one; the progress adds up too."""
    shapes = {"big": (64, 40), "small": (5,), "scalar": (), "empty": (0, 3)}
    seq = random_sequence(shapes, 3, seed=6)
    run = trainer_run(tmp_path / "run", seq, steps=[1, 2, 3])
    expected = sum(_data_bytes(p) for p in sorted(run.glob("checkpoint-*/model.safetensors")))
    assert expected == 3 * 4 * (64 * 40 + 5 + 1)
    advances: list[tuple[int, int]] = []

    def progress(phase: str, advance: int, total: int) -> None:
        if phase == "compute":
            advances.append((advance, total))

    res = api.run(run, tmp_path / "out", render=False, max_points=256, scheduler=scheduler,
                  chunk_elements=1000, progress=progress)  # fmt: skip
    assert res.summary["timing"]["read_bytes"] == expected
    assert sum(a for a, _ in advances) == expected and {t for _, t in advances} == {expected}
    ref = np.abs(np.diff(np.stack([c["big"] for c in seq]), axis=0)).sum(axis=0)
    np.testing.assert_allclose(res.accumulated("big"), ref, rtol=1e-5)


def test_the_cli_line_reports_the_bytes_read_with_processes(tmp_path):
    run = trainer_run(tmp_path / "run", random_sequence({"w": (16, 16)}, 2), steps=[1, 2])
    p = wdiff_cli("run", str(run), "-o", str(tmp_path / "out"), "--no-render", "-q", "--scheduler=processes")
    assert p.returncode == 0, p.stderr
    assert b" 2.0 KB read at " in p.stdout, p.stdout
