"""Speed at LLM scale: a Llama-3.2-1B-shaped BF16 run, wdiff beside `cat` and the PyTorch script.

    python benchmarks/llm_bf16.py [--data DIR] [--rounds 3]

The run: ``benchmarks/llm_planted.py`` (Llama-3.2-1B shapes, 146 tensors, 5 checkpoints x 2 shards of
BF16, 12.4 GB, the HF layout; made once into ``--data``). Each round, in this order, each command right
after the page cache is emptied (root) and an unmeasured ``cat`` of every shard fills it with the run
only (the previous command's writes, 4.9 GB of maps, and the torch script's 5.7 GB would evict part of
it on a 24 GB machine):

- ``benchmarks/read_all.py``: every byte of every shard read into one buffer, the floor (``cat`` into
  /dev/null is none: it splices, and cached pages are never copied);
- ``wdiff run`` with pictures (the defaults: render.png, points.ply, scene.html, the report; the
  4.9 GB map is over the 2 GiB the default stores, so no map);
- ``wdiff run --no-render``;
- both again with ``--map-dtype float32`` (the map stored, as the default did before session 9) and
  with ``--map-dtype bfloat16`` (the map stored in half the bytes);
- ``wdiff run --frames --mesh`` (its peak RSS is the target's);
- ``benchmarks/torch_script.py``: per tensor, lazy ``safe_open(framework="pt")``, ``(w - prev).abs_()``
  accumulated in float32 (torch's threaded kernels).

Every command is measured by ``benchmarks/measure.py``: its wall time, and the peak memory of its
whole process tree, the picture worker included (the peak of the sum of the PSS of its live processes,
and of their RSS, sampled every 20 ms; PSS counts the libraries both processes load once);
wdiff's compute phase rate is ``timing.read_bytes / timing.compute_seconds`` of its ``summary.json``.
Medians over rounds; results to ``benchmarks/llm_bf16.json`` and a markdown table (stdout, ``--md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llm_planted import make  # noqa: E402
from run import run_child, warm  # noqa: E402

PYTHON = sys.executable


def shards(data: Path) -> list[Path]:
    return sorted(data.glob("checkpoint-*/*.safetensors"))


def commands(data: Path, work: Path) -> dict[str, list[str]]:
    wdiff = [PYTHON, "-m", "wdiff", "run", str(data), "--no-spectrum", "-q"]
    runs = {  # name: its flags (the folder it writes into is named after them)
        "wdiff (pictures)": [],
        "wdiff --no-render": ["--no-render"],
        "wdiff --map-dtype float32": ["--map-dtype", "float32"],
        "wdiff --no-render --map-dtype float32": ["--no-render", "--map-dtype", "float32"],
        "wdiff --map-dtype bfloat16": ["--map-dtype", "bfloat16"],
        "wdiff --no-render --map-dtype bfloat16": ["--no-render", "--map-dtype", "bfloat16"],
        "wdiff --frames --mesh": ["--frames", "--mesh"],
    }
    folder = {n: work / ("-".join(f.strip("-") for f in flags) or "pictures") for n, flags in runs.items()}
    torch = [PYTHON, str(HERE / "torch_script.py"), str(data), "-o", str(work / "torch.safetensors")]
    return {
        "read": [PYTHON, str(HERE / "read_all.py"), *map(str, shards(data))],
        **{name: [*wdiff, *flags, "-o", str(folder[name])] for name, flags in runs.items()},
        "torch script": torch,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/wdiff-bench/llm1b"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/wdiff-bench/llm1b-out"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated command names to leave out")
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    if not (args.data / "planted.json").is_file():
        make(args.data)
    total = sum(p.stat().st_size for p in shards(args.data))
    cmds = {k: v for k, v in commands(args.data, args.work).items() if k not in args.skip.split(",")}
    rows: dict[str, list[dict]] = {k: [] for k in cmds}
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            shutil.rmtree(args.work, ignore_errors=True)
            args.work.mkdir(parents=True)
            warm(shards(args.data))  # the page cache emptied, then holding the run only
            got = run_child(cmd, None if name == "read" else args.work.parent / "llm_bf16.log")
            if name.startswith("wdiff"):
                out = Path(cmd[cmd.index("-o") + 1])
                timing = json.loads((out / "summary.json").read_text())["timing"]
                got["compute_seconds"] = timing["compute_seconds"]
                got["compute_rate"] = timing["read_bytes"] / timing["compute_seconds"]
            rows[name].append(got)
            print(
                f"round {r + 1} {name}: {got['wall']:.2f} s, tree peak PSS {got['tree_pss_mib']:.0f} MiB, "
                f"RSS {got['tree_rss_mib']:.0f} MiB (largest process {got['rss_mib']:.0f} MiB)",
                flush=True,
            )
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    cat_rate = total / med["read"]["wall"]
    lines = [
        f"LLM-shaped BF16 run: {total / 1e9:.2f} GB, 146 tensors, 5 checkpoints x 2 shards; "
        f"medians of {args.rounds} rounds, warm page cache; {os.cpu_count()} CPUs, {platform.machine()}",
        "",
        "| command | wall s | peak PSS MiB (process tree) | peak RSS MiB (process tree) | compute rate "
        "| vs read | torch script / this |",
        "|---|---|---|---|---|---|---|",
    ]
    torch_wall = med.get("torch script", {}).get("wall")
    for name, m in med.items():
        rate = m.get("compute_rate")
        vs = f"{rate / cat_rate:.0%}" if rate else ""
        speed = f"{torch_wall / m['wall']:.1f}x" if torch_wall and name != "read" else ""
        rate_text = f"{rate / 1e9:.2f} GB/s" if rate else f"{total / m['wall'] / 1e9:.2f} GB/s"
        lines.append(
            f"| {name} | {m['wall']:.2f} | {m['tree_pss_mib']:.0f} | {m['tree_rss_mib']:.0f} | {rate_text} "
            f"| {vs} | {speed} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    result = {"bytes": total, "rounds": rows, "medians": med, "read_rate": cat_rate, "when": time.ctime()}
    (HERE / "llm_bf16.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
