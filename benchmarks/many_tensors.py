"""Many small tensors (mixture-of-experts): does a run's cost grow linearly in the tensor count?

Makes runs of N small tensors x 3 checkpoints with MoE-like names (``model.layers.{l}.mlp.experts.{e}.
{w1,w2,w3}.weight``, 8 x 16 and 16 x 8, plus a router, two norms per layer, embeddings and a head), as
HF Trainer folders (``checkpoint-{step}/model.safetensors``, or sharded: ``model-0000k-of-0000S.
safetensors`` + ``model.safetensors.index.json``), then times the whole ``wdiff run`` process, with
``--no-render`` and with pictures, and once more in an instrumented process that reports where the time
goes (scan, compute, results write, summary, scene, metrics, findings, report). Fits t = a + b N.

    .venv/bin/python benchmarks/many_tensors.py                          # 1k..100k, ~5 minutes
    .venv/bin/python benchmarks/many_tensors.py --counts 1000,3000,10000 --ref 9ec4541 --timeout 300
    .venv/bin/python benchmarks/many_tensors.py --counts 30000 --sharded 8 --modes no-render

Data go to ``/tmp/wdiff-bench/many/`` (reused when present; 100k tensors are 3 x 51 MB); results to
``benchmarks/many_tensors.json`` and a markdown table on stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DIR = Path("/tmp/wdiff-bench/many")
STEPS = (100, 200, 300)  # the 3 checkpoints
GENERATOR_VERSION = "1"
# Where the instrumented child attributes time: (module, attribute, phase). A missing attribute (an
# older wdiff under --ref) is skipped; the phases' sum is compared with the process's wall time.
PHASES = (
    ("wdiff.api", "scan", "scan"),
    ("wdiff.api", "fingerprint", "scan"),
    ("wdiff.compute", "compute", "compute"),
    ("wdiff.api", "write_rows", "results write"),
    ("wdiff.api", "write_cells", "results write"),
    ("wdiff.api", "finish_frames", "results write"),
    ("wdiff.api", "write_json", "summary"),
    ("wdiff.api", "draw", "scene"),
    ("wdiff.report.build", "analyse", "metrics"),
    ("wdiff.report.build", "find", "findings"),
    ("wdiff.report", "write_report", "report"),  # minus metrics and findings, below
    ("wdiff._warm", "wait", "kernels"),  # waiting for the kernel thread (Numba) before compute
    ("wdiff.api", "cell_grids", "plan"),  # the scene's pooling plan (wdiff.detail)
    ("wdiff.update", "plan_update", "plan"),
    ("wdiff.api", "layout_accumulated", "plan"),
)
PHASE_ORDER = ("start", "scan", "plan", "kernels", "compute", "results write", "summary", "scene", "metrics",
               "findings", "report", "other")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# data


def moe_names(n: int, experts: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """N tensors of a small MoE model in network order: embeddings, then per layer a norm, the router,
    3 matrices per expert and a second norm, then the final norm and the head (cut at N)."""
    head = [("model.embed_tokens.weight", (64, 16))]
    tail = [("model.norm.weight", (16,)), ("lm_head.weight", (64, 16))]
    body: list[tuple[str, tuple[int, ...]]] = []
    layer = 0
    while len(head) + len(body) + len(tail) < n:
        p = f"model.layers.{layer}."
        body += [(p + "input_layernorm.weight", (16,)), (p + "mlp.gate.weight", (experts, 16))]
        for e in range(experts):
            for w, shape in (("w1", (8, 16)), ("w2", (16, 8)), ("w3", (8, 16))):
                body.append((f"{p}mlp.experts.{e}.{w}.weight", shape))
        body.append((p + "post_attention_layernorm.weight", (16,)))
        layer += 1
    return (head + body[: max(0, n - len(head) - len(tail))] + tail)[:n]


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], int]], flat) -> None:
    """One safetensors file as the official writer lays it out: keys sorted by name (so ``layers.10``
    comes before ``layers.2`` and wdiff has to restore network order), data in that order."""
    import numpy as np

    header, parts, pos = {}, [], 0
    for name, shape, start in sorted(tensors):
        size = int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + 4 * size]}
        parts.append(flat[start : start + size])
        pos += 4 * size
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.write(np.concatenate(parts).astype("<f4").tobytes() if parts else b"")
    tmp.rename(path)


def make_run(n: int, folder: Path, shards: int = 1) -> Path:
    """``folder/checkpoint-{100,200,300}/``: N tensors each, checkpoint t = t-1 + uniform noise 1e-3.
    Reused when its stamp says it was made the same way."""
    import numpy as np

    stamp = folder / "made.json"
    want = {"n": n, "shards": shards, "steps": STEPS, "version": GENERATOR_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    names = moe_names(n)
    starts, total = [], 0
    for _, shape in names:
        starts.append(total)
        total += int(np.prod(shape))
    rng = np.random.default_rng(n)
    flat = rng.standard_normal(total, dtype=np.float32)
    per_shard = -(-len(names) // shards)
    for step in STEPS:
        ckpt = folder / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        entries = [(name, shape, s) for (name, shape), s in zip(names, starts)]
        if shards == 1:
            _write_safetensors(ckpt / "model.safetensors", entries, flat)
        else:  # contiguous runs of layers per shard, as transformers' save_pretrained splits them
            weight_map = {}
            for k in range(shards):
                part = entries[k * per_shard : (k + 1) * per_shard]
                shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
                _write_safetensors(ckpt / shard, part, flat)
                weight_map.update({name: shard for name, _, _ in part})
            index = {"metadata": {"total_size": 4 * total}, "weight_map": weight_map}
            (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        flat = flat + rng.uniform(-1e-3, 1e-3, total).astype(np.float32)
    stamp.write_text(json.dumps(want))
    return folder


# ---------------------------------------------------------------------------------------------------
# the instrumented child: `python many_tensors.py --child PHASES.json -- run ARGS...`


def child(result: str, argv: list[str]) -> None:
    """Run the wdiff CLI in this process with timers around PHASES; write them to ``result`` when the
    CLI exits (it ends the process with os._exit, so the timers are written from there)."""
    t_start = time.perf_counter()
    import importlib

    totals: dict[str, float] = {}
    depth = {"n": 0}

    def timed(fn, phase):
        def wrapper(*a, **k):
            depth["n"] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth["n"] -= 1
                totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - t0
                totals.setdefault("first " + phase, t0 - t_start)

        return wrapper

    from wdiff import cli

    for module, attr, phase in PHASES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, attr):
            setattr(mod, attr, timed(getattr(mod, attr), phase))

    exit_now = cli._exit_now

    def dump_and_exit(code):
        totals["wall_in_process"] = time.perf_counter() - t_start
        with open(result, "w") as f:
            json.dump(totals, f)
        exit_now(code)

    cli._exit_now = dump_and_exit
    sys.argv = ["wdiff", *argv]
    cli.main()


# ---------------------------------------------------------------------------------------------------
# measuring


def run_measured(cmd: list[str], env: dict, cwd: Path, timeout: float | None) -> dict:
    """Wall seconds and peak RSS of ``cmd`` (through ``measure.py``); None values after ``timeout``."""
    fd, result = tempfile.mkstemp(prefix="measure-", suffix=".json")
    os.close(fd)
    try:
        log = cwd / "wdiff.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(HERE / "measure.py"), result, "--", *cmd],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the launcher and the wdiff run it started, nothing else
                proc.wait()
                return {"wall": None, "rss_mib": None, "timeout": timeout}
        with open(result) as f:
            r = json.load(f)
    finally:
        os.unlink(result)
    if r["returncode"] != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {r['returncode']}:\n{tail}")
    return {"wall": r["wall"], "rss_mib": max(r["maxrss_kib"], r["tree_maxrss_kib"]) / 1024}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(run_dir: Path, work: Path, mode: str, env: dict, timeout: float | None, phased: bool) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    args = ["run", str(run_dir), "-o", str(out), "--quiet"] + (["--no-render"] if mode == "no-render" else [])
    load = load_average()
    if phased:
        fd, phases_file = tempfile.mkstemp(prefix="phases-", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, str(HERE / "many_tensors.py"), "--child", phases_file, "--", *args]
    else:
        cmd = [sys.executable, "-m", "wdiff", *args]
    r = run_measured(cmd, env, work, timeout)
    r["load"] = load
    if r["wall"] is not None:
        summary = json.loads((out / "summary.json").read_text())
        r["tensors"] = len(summary["tensors"])
        r["compute_seconds"] = summary["timing"]["compute_seconds"]
        r["chunks"] = summary["timing"].get("chunks")
    if phased:
        if r["wall"] is not None:
            t = json.loads(Path(phases_file).read_text())
            phases = {p: t.get(p, 0.0) for p in PHASE_ORDER if p not in ("start", "other")}
            phases["report"] -= phases["metrics"] + phases["findings"]
            phases["start"] = t.get("first scan", 0.0)  # interpreter, imports, option parsing
            phases["other"] = r["wall"] - sum(phases.values())  # checks, Results.load, exit
            r["phases"] = {p: round(phases[p], 3) for p in PHASE_ORDER}
        os.unlink(phases_file)
    shutil.rmtree(out, ignore_errors=True)
    return r


def linfit(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares t = a + b N, R^2, and the cost per tensor at the largest N over that at the
    smallest: the slope of the last segment over that of the first (about 1 when linear; it grows with
    N when the cost per tensor does: about 10 over 1k..100k when quadratic)."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in pts)
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    return {
        "a_s": a,
        "b_ms_per_tensor": 1000 * b,
        "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
        "marginal_growth": _slope(pts[-2], pts[-1]) / _slope(pts[0], pts[1])
        if n >= 3 and _slope(pts[0], pts[1]) > 0
        else None,
    }


def _slope(p: tuple[float, float], q: tuple[float, float]) -> float:
    return (q[1] - p[1]) / (q[0] - p[0])


def median(xs: list[float | None]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


# ---------------------------------------------------------------------------------------------------
# report


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, wdiff {m['wdiff']} "
        f"({m['code']}); load average at start {m['load_start']}, at end {m['load_end']}.",
        f"Command: `{res['command']}`",
        "",
    ]
    for layout, rows in res["layouts"].items():
        lines += [f"### {layout}", "", "| tensors | mode | wall s (median) | runs | ms per tensor "
                  "| compute s | chunks | peak RSS MiB | load |", "|---" * 9 + "|"]  # fmt: skip
        for row in rows:
            for mode, r in row["modes"].items():
                walls = [x["wall"] for x in r["runs"]]
                w = median(walls)
                wall_txt = f"{w:.2f}" if w is not None else f"> {r['runs'][0].get('timeout')} (killed)"
                per = f"{1000 * w / row['n']:.3f}" if w is not None else "–"
                comp = median([x.get("compute_seconds") for x in r["runs"]])
                rss = max((x["rss_mib"] or 0) for x in r["runs"])
                lines.append(
                    f"| {row['n']:,} | {mode} | {wall_txt} | {', '.join(f'{x:.2f}' for x in walls if x)} "
                    f"| {per} | {comp if comp is None else round(comp, 2)} | {r['runs'][0].get('chunks')} "
                    f"| {rss:.0f} | {r['runs'][0]['load'][0]} |"
                )
        lines.append("")
        phased = [row for row in rows if row.get("phases")]
        if phased:
            lines += ["Where the time goes (one instrumented `--no-render` run per count, seconds):", "",
                      "| tensors | " + " | ".join(PHASE_ORDER) + " | wall |",
                      "|---" * (len(PHASE_ORDER) + 2) + "|"]  # fmt: skip
            for row in phased:
                p = row["phases"]
                cells = (
                    " | ".join(f"{p['phases'][k]:.2f}" for k in PHASE_ORDER) if "phases" in p else "killed"
                )
                lines.append(f"| {row['n']:,} | {cells} | {p['wall'] or 0:.2f} |")
            lines.append("")
        for mode, fit in res["fits"].get(layout, {}).items():
            if fit:
                lines.append(
                    f"- fit {mode}: t = {fit['a_s']:.2f} s + {fit['b_ms_per_tensor']:.3f} ms x N, "
                    f"R^2 = {fit['r2']:.4f}; cost per added tensor, last step over first: "
                    f"{'–' if fit['marginal_growth'] is None else round(fit['marginal_growth'], 2)}"
                )
        lines.append("")
    return "\n".join(lines)


def machine(src: Path, ref: str | None) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", ref or "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    dirty = bool(
        not ref
        and subprocess.run(["git", "status", "--porcelain", "wdiff"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    )  # fmt: skip
    version = subprocess.run([sys.executable, "-c", "import wdiff; print(wdiff.__version__, wdiff.__file__)"],
                             cwd="/", env=dict(os.environ, PYTHONPATH=str(src)), capture_output=True,
                             text=True).stdout.split()  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "wdiff": version[0] if version else "?",
        "imported_from": version[1] if len(version) > 1 else "?",
        "code": f"commit {commit}" + (" + uncommitted changes" if dirty else ""),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1000,3000,10000,30000,100000", help="tensor counts")
    ap.add_argument("--modes", default="no-render,render", help="no-render, render or both")
    ap.add_argument("--repeats", type=int, default=1, help="plain runs per count and mode")
    ap.add_argument("--sharded", type=int, default=0, help="also a sharded variant with this many shards")
    ap.add_argument("--sharded-counts", default="10000,100000", help="tensor counts of the sharded variant")
    ap.add_argument("--no-phases", action="store_true", help="skip the instrumented runs")
    ap.add_argument("--ref", help="benchmark wdiff/ as of this git commit instead of the working tree")
    ap.add_argument("--timeout", type=float, default=600, help="kill a run after this many seconds")
    ap.add_argument("--data", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--json", type=Path, default=HERE / "many_tensors.json")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)

    args.data.mkdir(parents=True, exist_ok=True)
    src = REPO
    if args.ref:  # a fixed commit, unaffected by edits to the working tree during the run
        src = Path(tempfile.mkdtemp(prefix="wdiff-src-", dir=args.data))
        archive = subprocess.run(["git", "archive", args.ref, "wdiff"], cwd=REPO, capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "wdiff")], check=True)
    env = dict(os.environ, PYTHONPATH=str(src), NUMBA_CACHE_DIR=str(args.data / "numba-cache"))
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.data))  # cwd outside the repository
    modes = [m for m in args.modes.split(",") if m]
    layouts = {"single file": (1, [int(x) for x in args.counts.split(",") if x])}
    if args.sharded:
        sharded_counts = [int(x) for x in args.sharded_counts.split(",") if x]
        layouts[f"{args.sharded} shards"] = (args.sharded, sharded_counts)

    res: dict = {"command": "python benchmarks/many_tensors.py " + " ".join(argv), "layouts": {}, "fits": {}}
    res["machine"] = machine(src, args.ref) | {"load_start": load_average()}
    warm = make_run(1000, args.data / "run-1000-1")  # fills the Numba cache: steady state is measured
    subprocess.run([sys.executable, "-m", "wdiff", "run", str(warm), "-o", str(work / "warm"), "--quiet",
                    "--no-render"], env=env, cwd=work, check=True)  # fmt: skip
    shutil.rmtree(work / "warm")
    for layout, (shards, counts) in layouts.items():
        rows = []
        for n in counts:
            t0 = time.perf_counter()
            run_dir = make_run(n, args.data / f"run-{n}-{shards}", shards)
            print(f"{layout}: {n} tensors ready ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            row: dict = {"n": n, "modes": {}}
            for mode in modes:
                runs = [measure(run_dir, work, mode, env, args.timeout, False) for _ in range(args.repeats)]
                row["modes"][mode] = {"runs": runs}
                print(f"  {mode}: {[r['wall'] for r in runs]}", file=sys.stderr)
            if not args.no_phases:
                row["phases"] = measure(run_dir, work, "no-render", env, args.timeout, True)
                print(f"  phases: {row['phases'].get('phases')}", file=sys.stderr)
            rows.append(row)
            res["layouts"][layout] = rows
            args.json.write_text(json.dumps(res, indent=1))
        res["fits"][layout] = {
            mode: linfit(
                [r["n"] for r in rows], [median([x["wall"] for x in r["modes"][m]["runs"]]) for r in rows]
            )
            for mode in modes
            for m in [mode]
        }
    res["machine"]["load_end"] = load_average()
    args.json.write_text(json.dumps(res, indent=1))
    text = markdown(res)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    if args.ref:
        shutil.rmtree(src, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
