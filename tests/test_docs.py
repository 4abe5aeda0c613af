"""Every command and code snippet in README.md and docs/ runs, as written, on the shipped samples.

Fenced blocks are read from the Markdown. A block of ``wdiff ...`` lines (or ``$ wdiff ...`` lines
followed by their output) runs each command with the CLI; ``python`` blocks run in a fresh interpreter,
those of one file in order in one script, as a reader would in one notebook. Both run in a temporary
folder where the paths the docs use stand for real samples (``WORKSPACE``), every ``-o`` pointing into
it. A block that cannot run says why in the Markdown, right before it: ``<!-- no-test: reason -->``;
any other block that is neither fails ``test_every_block_runs_or_says_why_not``.

What a ``$ wdiff ...`` transcript shows under a command must be printed by it (the read speed aside),
and the statements the docs make about the picture of ``digits-gpt2`` are checked against its results.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_checkpoints"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.+?)\s*-->", re.S)

# The paths the docs use, and the real data each stands for (relative to the repository).
WORKSPACE = {
    "sample_checkpoints": "sample_checkpoints",
    "runs/my-finetune": "sample_checkpoints/digits-gpt2",
    "runs/my-lora": "sample_checkpoints/digits-gpt2-lora",
    "ckpts": "sample_checkpoints/digits-bert-bf16-sharded",
    "exports": "sample_checkpoints/digits-mlp-onnx/torchscript",
    "research": "sample_checkpoints/digits-mlp-pt",
    "lightning_run": "tests/data/torch/lightning",
    "a.safetensors": "sample_checkpoints/digits-gpt2/checkpoint-50/model.safetensors",
    "b.safetensors": "sample_checkpoints/digits-gpt2/checkpoint-100/model.safetensors",
    "c.safetensors": "sample_checkpoints/digits-gpt2/checkpoint-150/model.safetensors",
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str
    no_test: str | None  # the reason given in the Markdown, or None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[list[str]] | None:
        """The wdiff commands of a shell block, or None when it is not one."""
        lines = [line for line in self.text.splitlines() if line.strip()]
        if self.lang not in ("", "sh", "shell", "bash", "console") or not lines:
            return None
        if any(line.startswith("$ ") for line in lines):
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        if not all(line.split()[0] == "wdiff" for line in lines):
            return None
        return [shlex.split(line, comments=True) for line in lines]

    def transcripts(self) -> list[list[str]]:
        """For a ``$ wdiff ...`` block, the output shown under each command (``...`` lines and
        ``# comments`` left out); empty lists for a block of bare commands."""
        shown: list[list[str]] = []
        for line in self.text.splitlines():
            if line.startswith("$ "):
                shown.append([])
            elif shown and line.strip() and line.strip() != "...":
                shown[-1].append(line.split("   #")[0].strip())
        return shown or [[] for _ in self.commands() or []]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip()  # a marker is the last thing before the fence
        comment = before[before.rfind("<!--") :] if before.endswith("-->") else ""
        marker = NO_TEST.fullmatch(comment)
        found.append(
            Block(path, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2),
                  marker.group(1) if marker else None)
        )  # fmt: skip
    return found


ALL = [b for path in DOCS for b in blocks(path)]
SHELL = [b for b in ALL if b.no_test is None and b.commands() is not None]
PYTHON = [b for b in ALL if b.no_test is None and b.lang == "python"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name, target in WORKSPACE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(REPO / target)
    return root


def _env() -> dict[str, str]:
    # the wdiff of this checkout, whatever the current folder
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _out_into(argv: list[str], out: Path) -> tuple[list[str], str | None]:
    """The command with its ``-o`` pointing at ``out``, and the ``-o`` the docs gave."""
    args, given = list(argv[1:]), None
    for i, a in enumerate(args):
        if a in ("-o", "--out") and i + 1 < len(args):
            given, args[i + 1] = args[i + 1], str(out)
    return [sys.executable, "-m", "wdiff", *args], given


SPEED = re.compile(r"read at [0-9.]+ [KMG]?B/s")  # the one number that changes from run to run


def _missing(shown: list[str], printed: str) -> list[str]:
    """The lines of a transcript whose words are not, in that order, on one printed line (a rich
    table's rules and padding aside)."""
    lines = [SPEED.sub("read at", re.sub(r"[│┃║|]", " ", line)).split() for line in printed.splitlines()]
    missing = []
    for line in shown:
        words = SPEED.sub("read at", line).split()
        n = len(words)
        if not any(words == got[i : i + n] for got in lines for i in range(len(got) - n + 1)):
            missing.append(line)
    return missing


def test_the_docs_have_blocks_to_run():
    assert len(SHELL) >= 5 and len(PYTHON) >= 3
    assert {b.path.name for b in PYTHON} >= {"README.md", "user-guide.md"}


def test_every_block_runs_or_says_why_not():
    unrunnable = [b.id for b in ALL if b.no_test is None and b.commands() is None and b.lang != "python"]
    assert unrunnable == [], "mark a block that cannot run with <!-- no-test: why --> before it"


def test_the_parser_reads_commands_output_and_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```\n$ wdiff run a -o out/x   # note\nsome output\n```\n"
        "<!-- no-test: output -->\n```\nwdiff: error: no\n```\n"
        "```python\nprint(1)\n```\n"
    )
    a, b, c = blocks(doc)
    assert a.commands() == [["wdiff", "run", "a", "-o", "out/x"]] and a.no_test is None
    assert a.transcripts() == [["some output"]]
    printed = "┃ some ┃ output ┃\nx 1.0 MB read at 9 MB/s"
    assert _missing(["some output", "x 1.0 MB read at 3.0 MB/s"], printed) == []
    assert _missing(["other output"], "some output") == ["other output"]
    assert b.no_test == "output" and b.commands() is None
    assert c.lang == "python" and c.no_test is None


def test_every_wdiff_command_in_the_docs_runs(workspace):
    jobs = [
        (f"{b.id} #{i}", workspace / "results" / f"{b.path.stem}-{b.line}-{i}", argv, shown)
        for b in SHELL
        for i, (argv, shown) in enumerate(zip(b.commands() or [], b.transcripts()))
    ]
    env = {**_env(), "COLUMNS": "200"}  # a table as wide as the docs show it

    def run(job: tuple[str, Path, list[str], list[str]]) -> str | None:
        name, out, argv, shown = job
        cmd, given = _out_into(argv, out)
        p = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
        if p.returncode:
            return f"{name}: exit {p.returncode}: {p.stderr.strip()[-400:]}"
        printed = p.stderr + p.stdout
        if given is not None:
            printed = printed.replace(str(out), given.rstrip("/"))
        missing = _missing(shown, printed)
        return f"{name}: not printed: {missing}\n{printed}" if missing else None

    with ThreadPoolExecutor(2) as pool:
        failed = [f for f in pool.map(run, jobs) if f]
    assert failed == []


@pytest.mark.parametrize("path", sorted({b.path for b in PYTHON}), ids=lambda p: p.name)
def test_the_python_snippets_of_a_doc_run(workspace, tmp_path, path):
    folder = tmp_path / "notebook"
    folder.mkdir()
    for name in WORKSPACE:  # the same paths, its own out/
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / name).exists():
            (folder / name).symlink_to(workspace / name)
    script = "\n\n".join(b.text for b in PYTHON if b.path == path)
    p = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]


def test_what_the_docs_say_about_the_gpt2_picture(tmp_path):
    """user-guide.md and gallery.md: ``ln_f.weight`` has the highest mean |dW| of the 52 tensors; the
    LayerNorm scales moved least only relative to their size (the lowest ``relative_path``)."""
    import wdiff
    from wdiff.metrics import analyse

    res = wdiff.run(SAMPLES / "digits-gpt2", tmp_path / "out", render=False)
    tensors = analyse(res).tensors
    assert len(tensors) == 52
    by_mean = sorted(tensors, key=lambda t: -t["mean_change"])
    assert by_mean[0]["tensor"] == "transformer.ln_f.weight"
    assert round(by_mean[0]["mean_change"], 3) == 0.142
    assert [t["tensor"] for t in by_mean[1:3]] == ["transformer.ln_f.bias", "transformer.wpe.weight"]
    scales = {t["tensor"] for t in tensors if re.search(r"ln_\w+\.weight$", t["tensor"])}
    by_relative = sorted(tensors, key=lambda t: t["relative_path"])
    assert {t["tensor"] for t in by_relative[: len(scales)]} == scales
    lowest = [round(t["relative_path"], 2) for t in by_relative]  # as the docs round them
    assert lowest[0] == 0.03 and lowest[len(scales) - 1] == 0.12
    assert lowest[len(scales)] == 0.54 and lowest[-1] == 1.89
    # res.names: blocks in network order, alphabetical inside a block
    assert res.names[:4] == [
        "transformer.wpe.weight", "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_attn.weight",
    ]  # fmt: skip
