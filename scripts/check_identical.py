"""Are the results of two wdiff checkouts bit-identical on the shipped samples?

    python scripts/check_identical.py BEFORE AFTER [--work DIR] [--keep]

runs ``wdiff run`` with ``PYTHONPATH=BEFORE`` and then ``PYTHONPATH=AFTER`` (two git checkouts or
worktrees, no stash, the same Python) on every run under ``sample_checkpoints/`` (a sample folder that
is not one run, such as ``digits-mlp-onnx/``, is taken as the runs of its subfolders), in two setups:
pictures with frames and a mesh (max pooling), and no pictures with frames and mean pooling. One more
case extends ``digits-gpt2`` incrementally (the first 6 checkpoints, then all 8).

Compared, file by file, between the two results folders of each case:

- every ``.safetensors`` file: the same tensors, each the same dtype, shape and bytes, and the same
  metadata (safetensors orders metadata keys freely, so they are compared as a dict);
- ``summary.json``: equal as JSON with key order kept, except ``created`` and ``timing`` (a clock);
- the CSVs, ``findings.json``, ``points.ply`` and ``mesh.ply``: byte for byte.

Other files (pictures, ``report.html``, the film) are listed when they differ but do not fail the
check: ``report.html`` shows the run's date and compute time, and the rest holds no number the files
above do not. Exit status 0 when every compared file is
identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
SETUPS = {
    "pictures": ["--frames", "--mesh"],
    "no-render": ["--no-render", "--frames", "--pool", "mean"],
}
STRICT = {"findings.json", "points.ply", "mesh.ply"}  # besides *.safetensors, *.csv, summary.json
CLOCK = ("created", "timing")  # summary.json keys that differ between any two runs


def wdiff(checkout: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m wdiff ARGS`` with ``checkout`` first on the path (run outside both checkouts)."""
    env = dict(os.environ, PYTHONPATH=str(checkout), NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "wdiff", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def runs(checkout: Path, cwd: Path) -> list[Path]:
    """Every run under sample_checkpoints/: a sample folder ``wdiff scan`` cannot read as one run is
    the runs of its subfolders."""
    found = []
    for sample in sorted(p for p in SAMPLES.iterdir() if p.is_dir()):
        if wdiff(checkout, ["scan", str(sample)], cwd).returncode == 0:
            found.append(sample)
        else:
            found += sorted(p for p in sample.iterdir() if p.is_dir())
    return found


def tensors(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]]]:
    """A safetensors file's metadata and its tensors as (dtype, shape, raw bytes), read by hand."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.pop("__metadata__", {})
    body = data[8 + size :]
    found = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        found[name] = (t["dtype"], t["shape"], body[start:end])
    return meta, found


def ordered(path: Path) -> Any:
    """summary.json with its key order kept (pairs), the clock keys left out."""
    pairs = json.loads(path.read_text(), object_pairs_hook=lambda p: p)
    return [(k, v) for k, v in pairs if k not in CLOCK]


def compare(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(problems in the compared files, other files that differ) between two results folders."""
    problems: list[str] = []
    loose: list[str] = []
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    for name in names:
        fa, fb = a / name, b / name
        if not fa.is_file() or not fb.is_file():
            (problems if not name.startswith(".") else loose).append(f"{name}: only in one")
            continue
        if name.endswith(".safetensors"):
            (ma, ta), (mb, tb) = tensors(fa), tensors(fb)
            if ma != mb:
                problems.append(f"{name}: metadata differs")
            if list(ta) != list(tb):
                problems.append(f"{name}: other tensors or order")
            bad = [n for n in ta if n in tb and ta[n] != tb[n]]
            if bad:
                problems.append(f"{name}: {len(bad)} tensors differ, first {bad[0]}")
        elif name == "summary.json":
            if ordered(fa) != ordered(fb):
                problems.append(f"{name}: differs (besides {', '.join(CLOCK)})")
        elif name.endswith(".csv") or name in STRICT:
            if fa.read_bytes() != fb.read_bytes():
                problems.append(f"{name}: differs")
        elif fa.read_bytes() != fb.read_bytes():
            loose.append(name)
    return problems, loose


def incremental_case(sample: Path, work: Path, checkout: Path, label: str, cwd: Path) -> tuple[Path, str]:
    """digits-gpt2 extended: results of its first 6 checkpoints, then the run of all 8 into them. The
    input is copied to the same path for both checkouts (summary.json records it)."""
    copy = work / "input" / sample.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    steps = sorted(
        (p for p in sample.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name[11:])
    )
    copy.mkdir(parents=True)
    for p in steps[:6]:
        shutil.copytree(p, copy / p.name)
    out = work / label / "incremental"
    flags = ["-q", "--no-render", "--frames"]
    first = wdiff(checkout, ["run", str(copy), "-o", str(out), *flags], cwd)
    if first.returncode:
        return out, first.stderr
    for p in steps[6:]:
        shutil.copytree(p, copy / p.name)
    second = wdiff(checkout, ["run", str(copy), "-o", str(out), *flags], cwd)
    summary = json.loads((out / "summary.json").read_text()) if second.returncode == 0 else {}
    return out, second.stderr or summary.get("update", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the checkout results are compared against")
    parser.add_argument("after", type=Path, help="the checkout under test")
    parser.add_argument("--work", type=Path, help="where the results go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the results folders")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="wdiff-identical-"))
    cwd = work / "cwd"  # outside both checkouts: python -m puts the working folder first on the path
    cwd.mkdir(parents=True, exist_ok=True)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    failed = 0
    cases: list[tuple[str, Path, Path]] = []
    for sample in runs(checkouts["before"], cwd):
        for setup, flags in SETUPS.items():
            case = f"{sample.relative_to(SAMPLES)} [{setup}]"
            outs = {}
            for label, checkout in checkouts.items():
                out = work / label / f"{sample.relative_to(SAMPLES)}-{setup}".replace("/", "-")
                p = wdiff(checkout, ["run", str(sample), "-o", str(out), "-q", *flags], cwd)
                if p.returncode not in (0, 3):  # 3: a --fail-on finding (none is asked here)
                    print(f"{case}: {label} failed: {p.stderr.strip()[-300:]}")
                    failed += 1
                outs[label] = out
            cases.append((case, outs["before"], outs["after"]))
    gpt2 = SAMPLES / "digits-gpt2"
    inc = {label: incremental_case(gpt2, work, c, label, cwd) for label, c in checkouts.items()}
    for label, (_, said) in inc.items():
        if said != "incremental from 6":
            print(f"digits-gpt2 [incremental]: {label} did not extend: {said.strip()[-300:]}")
            failed += 1
    cases.append(("digits-gpt2 [incremental 6 -> 8]", inc["before"][0], inc["after"][0]))
    for case, a, b in cases:
        if not (a / "summary.json").is_file() or not (b / "summary.json").is_file():
            continue
        problems, loose = compare(a, b)
        failed += bool(problems)
        compared = sum(1 for p in a.iterdir() if p.is_file() and not p.name.startswith("."))
        status = "IDENTICAL" if not problems else "DIFFERENT: " + "; ".join(problems)
        other = f" (not compared, differ: {', '.join(loose)})" if loose else ""
        print(f"{case}: {status} ({compared} files){other}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("all identical" if not failed else f"{failed} cases differ or failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
