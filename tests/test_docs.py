"""Every command and code snippet in README.md and docs/ runs, as written, on the shipped samples.

Fenced blocks are read from the Markdown. A block of ``wdiff ...`` lines (or ``$ wdiff ...`` lines
followed by their output) runs each command with the CLI; ``python`` blocks run in a fresh interpreter,
those of one file in order in one script, as a reader would in one notebook. Both run in a temporary
folder where the paths the docs use stand for real samples (``WORKSPACE``), every ``-o`` pointing into
it. A block that cannot run says why in the Markdown, right before it: ``<!-- no-test: reason -->``;
any other block that is neither fails ``test_every_block_runs_or_says_why_not``.

What a ``$ wdiff ...`` transcript shows under a command must be printed by it (the read speed aside),
and the statements the docs make about the picture of ``digits-gpt2`` are checked against its results.

Commands written inline (a ``wdiff ...`` code span in a sentence or a table, and
``sample_checkpoints/README.md``'s blocks) are read too:

- every ``wdiff`` command, inline or in any block (a ``no-test`` one included), names a subcommand and
  options that exist (read from the CLI's own definitions, nothing run);
- an inline command that is complete (its required arguments given) and concrete (no placeholder such
  as ``OUT``, ``DIR``, ``INPUT...``, ``<file>``) runs, in a folder of its own where the results paths
  the docs use (``out/``, ``out/demo``, ...) hold real results of ``digits-gpt2``. A synopsis with
  placeholders or a fragment (``wdiff run --no-render``) is only checked as above. An inline command
  that must not run says why right before it: ``<!-- no-test: reason -->`` `` `wdiff ...` ``;
- every ``make TARGET``, ``pip install 'wdiff[EXTRA]'`` and ``python scripts/X.py --flag`` (or
  ``benchmarks/``) names a target, an extra, a script and flags (and choices) that exist.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_checkpoints"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), SAMPLES / "README.md"]
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
    "my_project": "sample_checkpoints/digits-accelerate",
    "project_dir": "sample_checkpoints/digits-accelerate",
}
# The results folders the docs name: an inline command that reads one gets a copy of digits-gpt2's.
RESULTS = ("out", "out/demo", "out/gpt2", "out/lr-1e-4", "out/lr-1e-3")


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


# --- commands written inline -------------------------------------------------------------------------

SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
PLACEHOLDER = re.compile(r"(^|[/:=])[A-Z][A-Z0-9_]*(\.\.\.)?($|/)|^\.\.\.$|<[^>]*>")


@dataclass(frozen=True)
class Inline:
    path: Path
    line: int
    text: str
    no_test: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def inline_spans(path: Path) -> list[Inline]:
    """The code spans of a Markdown file outside its fenced blocks and comments, each with the reason
    of a ``<!-- no-test: why -->`` right before it."""
    text = path.read_text()
    blank = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    blank = COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), blank)
    found = []
    for m in SPAN.finditer(blank):
        before = text[: m.start()].rstrip()
        comment = before[before.rfind("<!--") :] if before.endswith("-->") else ""
        marker = NO_TEST.fullmatch(comment)
        found.append(Inline(path, text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()),
                            marker.group(1) if marker else None))  # fmt: skip
    return found


def wdiff_argv(line: str) -> list[str] | None:
    """``["wdiff", ...]`` for a ``wdiff ...`` or ``python -m wdiff ...`` command with at least one
    argument; None for anything else (``wdiff: error``, ``wdiff.run(...)``, a bare ``wdiff run``
    names a command: that is checked too)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if words[:3] == ["python", "-m", "wdiff"]:
        words = words[2:]
    return words if len(words) >= 2 and words[0] == "wdiff" else None


INLINE = [i for path in DOCS for i in inline_spans(path)]
INLINE_WDIFF = [(i, argv) for i in INLINE if (argv := wdiff_argv(i.text)) is not None]


def _cli():
    import typer.main

    from wdiff.cli import app

    return typer.main.get_command(app)


def cli_problems(argv: list[str]) -> tuple[list[str], bool]:
    """What in ``argv`` the CLI does not have (a subcommand, an option, an option's value), and whether
    the command is complete: every required argument and option given."""
    group = _cli()
    args = argv[1:]
    command = group if args[0].startswith("-") else group.commands.get(args[0])
    if command is None:
        return [f"no command {args[0]!r}"], False
    if command is not group:
        args = args[1:]
    params = {o: p for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    problems: list[str] = []
    given: set[str] = set()
    positional = 0
    i = 0
    while i < len(args):
        word = args[i]
        name = word.split("=", 1)[0]
        if word == "--help":
            return problems, True
        if word.startswith("-") and len(word) > 1:
            p = params.get(name)
            if p is None:
                problems.append(
                    f"no option {name} in `wdiff {command.name}`" if command is not group else name
                )
            else:
                given.add(p.name)
                if not (p.is_flag or p.count) and "=" not in word:
                    i += 1  # its value (a fragment such as `wdiff run --wandb` names only the option)
        else:
            positional += 1
        i += 1
    required = [p for p in command.params if p.required]
    needed = sum(1 for p in required if p.param_type_name == "argument")
    complete = positional >= needed and all(
        p.name in given for p in required if p.param_type_name == "option"
    )
    return problems, complete


def _script_options(path: Path) -> dict[str, list[str] | None]:
    """The options a script's argparse takes (``--only``) and their ``choices`` (None: any value)."""
    found: dict[str, list[str] | None] = {"-h": None, "--help": None}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = [
                a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")
            ]
            choices = next((k.value for k in node.keywords if k.arg == "choices"), None)
            listed = ast.literal_eval(choices) if isinstance(choices, (ast.List, ast.Tuple)) else None
            found.update({n: listed for n in names})
    return found


def other_problems(line: str) -> list[str]:
    """What a ``make``, ``pip install`` or ``python scripts/x.py`` command names that does not exist."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    if not words:
        return []
    if words[0] == "make":
        targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
        return [f"no make target {w!r}" for w in words[1:] if "=" not in w and w not in targets]
    if Path(words[0]).name == "pip" and words[1:2] == ["install"]:
        text = (REPO / "pyproject.toml").read_text()
        section = text[text.index("[project.optional-dependencies]") :].split("\n[", 1)[0]
        extras = set(re.findall(r"^([a-z0-9-]+) =", section, re.M))
        wanted = [e for w in words if (m := re.fullmatch(r"wdiff\[(.+)\]", w)) for e in m.group(1).split(",")]
        return [f"no extra {e!r} in pyproject.toml" for e in wanted if e not in extras]
    if re.fullmatch(r"python3?", Path(words[0]).name) and len(words) > 1 and words[1].endswith(".py"):
        script = REPO / words[1]
        if not script.is_file():
            return [f"no script {words[1]}"]
        options = _script_options(script)
        problems = []
        for i, w in enumerate(words[2:], 2):
            name = w.split("=", 1)[0]
            if w.startswith("--"):
                if name not in options:
                    problems.append(f"{words[1]} has no option {name}")
                elif options[name] is not None and i + 1 < len(words) and words[i + 1] not in options[name]:
                    problems.append(f"{words[1]} {name}: {words[i + 1]!r} is not one of {options[name]}")
        return problems
    return []


def _block_lines(b: Block) -> list[str]:
    """The command lines of a shell block (a line that starts at its first column: not a diagram)."""
    lines = [line[2:] if line.startswith("$ ") else line for line in b.text.splitlines() if line[:1].strip()]
    return (
        [line for line in lines if line.strip()] if b.lang in ("", "sh", "shell", "bash", "console") else []
    )


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


def test_the_inline_reader_finds_commands_markers_and_placeholders(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `wdiff report out/demo` or `wdiff run DIR -o OUT`; not `wdiff: error` nor `wdiff.run(...)`.\n"
        "<!-- no-test: a window --> `wdiff view out/gpt2`, and\n```\n`wdiff scan x`\n```\n"
        "``wdiff\n  watch``\n"
    )
    spans = inline_spans(doc)
    assert [(i.line, i.text, i.no_test) for i in spans] == [
        (1, "wdiff report out/demo", None), (1, "wdiff run DIR -o OUT", None), (1, "wdiff: error", None),
        (1, "wdiff.run(...)", None), (2, "wdiff view out/gpt2", "a window"), (6, "wdiff watch", None),
    ]  # fmt: skip
    assert [wdiff_argv(i.text) for i in spans][2:4] == [None, None]
    words = ("OUT", "INPUT...", "hf://ORG/NAME", "<file>", "out/", "-o")
    assert [bool(PLACEHOLDER.search(w)) for w in words] == [True, True, True, True, False, False]


def test_the_cli_check_finds_what_does_not_exist():
    assert cli_problems(["wdiff", "run", "x", "-o", "y", "--no-render"]) == ([], True)
    assert cli_problems(["wdiff", "run", "--no-render"]) == ([], False)  # a fragment
    wrong = cli_problems(["wdiff", "run", "x", "-o", "y", "--no-such"])
    assert wrong == (["no option --no-such in `wdiff run`"], True)
    assert cli_problems(["wdiff", "runs", "x"])[0] == ["no command 'runs'"]
    assert cli_problems(["wdiff", "compare", "a", "b"]) == ([], False)  # -o is required
    assert cli_problems(["wdiff", "--help"]) == ([], True)
    assert other_problems("make tests") == ["no make target 'tests'"]
    assert other_problems("pip install 'wdiff[tensorboard,nope]'") == ["no extra 'nope' in pyproject.toml"]
    assert other_problems("python scripts/make_sample_adapters.py --only lora") == []
    assert other_problems("python scripts/make_sample_adapters.py --only gpt2") == [
        "scripts/make_sample_adapters.py --only: 'gpt2' is not one of ['onnx', 'lora', 'accelerate']"
    ]


def test_every_wdiff_command_in_the_docs_names_what_the_cli_has():
    """Inline or in a block (one marked no-test too), a ``wdiff`` command's subcommand and options exist."""
    found = [(i.id, i.text) for i, _ in INLINE_WDIFF if i.no_test is None]
    found += [(b.id, line) for b in ALL for line in _block_lines(b) if wdiff_argv(line) is not None]
    wrong = [f"{where}: `{text}`: {p}" for where, text in found for p in cli_problems(wdiff_argv(text))[0]]
    assert len(found) > 50 and wrong == []


def test_every_make_pip_and_script_command_in_the_docs_exists():
    lines = [(i.id, i.text) for i in INLINE if i.no_test is None]
    lines += [(b.id, line) for b in ALL for line in _block_lines(b)]
    checked = [(where, line, other_problems(line)) for where, line in lines]
    assert sum(1 for _, line, _ in checked if re.match(r"(make|pip|\S*python3?) ", line)) > 10
    assert [f"{where}: `{line}`: {p}" for where, line, problems in checked for p in problems] == []


@pytest.fixture(scope="module")
def gpt2_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs-results") / "out"
    cmd = ["run", str(SAMPLES / "digits-gpt2"), "-o", str(out), "-q", "--no-render"]
    subprocess.run(
        [sys.executable, "-m", "wdiff", *cmd], env=_env(), check=True, capture_output=True, timeout=300
    )
    return out


RUNNABLE = [
    (i, argv)
    for i, argv in INLINE_WDIFF
    if i.no_test is None and not any(PLACEHOLDER.search(w) for w in argv) and cli_problems(argv) == ([], True)
]


def test_the_docs_have_inline_commands_to_run():
    assert len(RUNNABLE) >= 8


@pytest.mark.parametrize("inline, argv", RUNNABLE, ids=[i.id for i, _ in RUNNABLE])
def test_every_complete_inline_command_runs(tmp_path, gpt2_results, inline, argv):
    """Each in a folder of its own: the docs' paths link to the samples, the results paths it reads
    hold a copy of digits-gpt2's results."""
    for name, target in WORKSPACE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(REPO / target)
    for word in argv[2:]:
        if word.rstrip("/") in RESULTS and not word.startswith("-"):
            shutil.copytree(gpt2_results, tmp_path / word.rstrip("/"), symlinks=True)
    p = subprocess.run(
        [sys.executable, "-m", "wdiff", *argv[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, f"{inline.id}: `{inline.text}`: exit {p.returncode}: {p.stderr[-600:]}"
