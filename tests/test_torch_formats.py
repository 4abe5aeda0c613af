"""PyTorch-pickle checkpoints, one real run per layout, against a reference read by torch itself.

Every run here is real training: the layouts torch writes alone are trained and saved at test time
(``tests/torch_files.py``, session-scoped, in tmp); the ones that need transformers 4.x, peft, Lightning
or DeepSpeed were made by ``scripts/make_torch_checkpoints.py`` and ship in ``tests/data/torch/``.
``wdiff.run(folder, out)`` with no options must find the checkpoints in step order and report the
accumulated change of every floating-point weight equal to the float64 reference built from
``torch.load(f, weights_only=True)`` (DCP: torch's ``dcp_to_torch_save``), read back from
``out/accumulated.safetensors`` and ``out/summary.json`` by the safetensors library and json.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_files as tf
from kinds import check_against_reference
from safetensors.numpy import load_file

import wdiff
from wdiff.errors import WdiffError

DATA = Path(__file__).resolve().parent / "data" / "torch"
SAMPLE = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "digits-mlp-pt"


@dataclass
class Case:
    """One run: what ``wdiff run`` is given and what it must find."""

    folder: Path
    markers: list[str]  # per checkpoint, in step order: a component of its path (file or folder name)
    steps: list[int]
    weights: list[dict[str, np.ndarray]]  # per checkpoint: every float weight wdiff must report, float64
    state_key: str | None = None  # the key of a wrapped dict that holds the weights
    skipped: tuple[str, ...] = ()  # tensors that are not floats: skipped, never computed
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied weights reported once


def _steps_of(names: list[str]) -> list[int]:
    return [int("".join(c for c in n.split("step")[-1] if c.isdigit())) for n in names]


def _files_case(folder: Path, paths: list[Path], key: str | None = None, **kw) -> Case:
    names = [p.name for p in paths]
    weights = [tf.torch_weights(p, key) for p in paths]
    return Case(folder, names, _steps_of(names), weights, key, **kw)


# --- the runs made at test time (torch only) ---------------------------------------------------------


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("torch-runs")
    snaps = tf.train(60, 20)  # steps 0, 20, 40, 60
    bn = ("norm.num_batches_tracked",)
    research = tf.make_research_run(root / "research", snaps)
    wrapped = tf.make_wrapped_run(root / "wrapped", snaps[1:])
    cases = {
        "research": _files_case(root / "research", research, skipped=bn),
        "research-bf16": _files_case(root / "bf16", tf.make_bf16_run(root / "bf16"), skipped=bn),
        "wrapped": _files_case(root / "wrapped", wrapped, "model", skipped=bn),
    }
    ds = tf.make_deepspeed_like_run(root / "deepspeed", snaps[1:])
    cases["deepspeed-like"] = Case(
        root / "deepspeed", [p.parent.name for p in ds], [20, 40, 60],
        [tf.torch_weights(p, "module") for p in ds], "module", bn,
    )  # fmt: skip
    for name, folders in (
        ("dcp", tf.make_dcp_run(root / "dcp", snaps[1:])),
        ("dcp-fsdp2", tf.make_dcp_fsdp2_run(root / "dcp-fsdp2")),  # steps 10, 20, 30; 2 ranks
    ):
        markers = [f.name for f in folders]
        weights = [tf.dcp_weights(f, "model") for f in folders]
        cases[name] = Case(folders[0].parent, markers, _steps_of(markers), weights, "model", bn)
    return cases


# --- the runs shipped in tests/data/torch and sample_checkpoints -------------------------------------


def _hf_case(run: Path) -> Case:
    """HF Trainer (transformers 4.57.6, save_safetensors=False): pytorch_model.bin or shards + index."""
    folders = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = []
    for f in folders:
        index = f / "pytorch_model.bin.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
        merged: dict[str, np.ndarray] = {}
        for name in files or ["pytorch_model.bin"]:
            merged |= tf.torch_weights(f / name)
        del merged["lm_head.weight"]  # tied: the same storage as transformer.wte.weight, reported once
        weights.append(merged)
    steps = [int(f.name.split("-")[1]) for f in folders]
    return Case(
        run, [f.name for f in folders], steps, weights, aliases={"transformer.wte.weight": ["lm_head.weight"]}
    )


def _lora_effective(adapter: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """peft's ``get_delta_weight``: ``B @ A * lora_alpha / r`` (rank_pattern / alpha_pattern per module),
    transposed with fan_in_fan_out; named like the base weight. The script checked this formula against
    peft itself when it made the run."""
    out = {}
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        r = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        assert a.shape[0] == r and not config["use_rslora"]
        delta = (b @ a) * (alpha / r)
        out[f"{module}.weight"] = delta.T if config["fan_in_fan_out"] else delta
    return out


def _peft_case(run: Path) -> Case:
    folders = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = []
    for f in folders:
        adapter = tf.torch_weights(f / "adapter_model.bin")
        config = json.loads((f / "adapter_config.json").read_text())
        weights.append(adapter | _lora_effective(adapter, config))  # the raw factors are reported too
    return Case(run, [f.name for f in folders], [int(f.name.split("-")[1]) for f in folders], weights)


def _lightning_case(folder: Path, ckpts: Path) -> Case:
    paths = sorted(
        (p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: _steps_of([p.name])
    )
    return _files_case(folder, paths, "state_dict", skipped=("model.norm.num_batches_tracked",))


def shipped(name: str) -> Case:
    bn = ("norm.num_batches_tracked",)
    if name == "sample-research":
        return _files_case(
            SAMPLE, sorted(SAMPLE.glob("step_*.pt"), key=lambda p: _steps_of([p.name])), skipped=bn
        )
    if name in ("hf-bin", "hf-sharded"):
        return _hf_case(DATA / name)
    if name == "peft-bin":
        return _peft_case(DATA / name)
    if name == "lightning":  # the folder ModelCheckpoint writes into by default
        version = DATA / "lightning" / "lightning_logs" / "version_0"
        return _lightning_case(version / "checkpoints", version / "checkpoints")
    if name == "lightning-version":  # the logger's version folder: checkpoints/ inside, beside hparams.yaml
        version = DATA / "lightning" / "lightning_logs" / "version_0"
        return _lightning_case(version, version / "checkpoints")
    if name == "lightning-dirpath":  # ModelCheckpoint(dirpath=...)
        return _lightning_case(DATA / name / "ckpts", DATA / name / "ckpts")
    if name == "deepspeed":  # real DeepSpeed 0.19.8, ZeRO-2, CPU
        files = sorted(
            (DATA / name).glob("global_step*/mp_rank_00_model_states.pt"),
            key=lambda p: _steps_of([p.parent.name]),
        )
        weights = [tf.torch_weights(p, "module") for p in files]
        return Case(DATA / name, [p.parent.name for p in files], [50, 100, 150], weights, "module", bn)
    raise KeyError(name)


MADE = ["research", "research-bf16", "wrapped", "deepspeed-like", "dcp", "dcp-fsdp2"]
SHIPPED = ["sample-research", "hf-bin", "hf-sharded", "peft-bin", "lightning", "lightning-version",
           "lightning-dirpath", "deepspeed"]  # fmt: skip


@pytest.fixture(scope="session")
def results(made, tmp_path_factory):
    """``wdiff.run(folder, out, render=False)`` once per run, read back with safetensors and json."""
    cache: dict[str, tuple[Case, dict, dict[str, np.ndarray]]] = {}

    def get(name: str):
        if name not in cache:
            case = made[name] if name in made else shipped(name)
            out = tmp_path_factory.mktemp(name) / "out"
            wdiff.run(case.folder, out, render=False)
            summary = json.loads((out / "summary.json").read_text())
            cache[name] = (case, summary, load_file(str(out / "accumulated.safetensors")))
        return cache[name]

    return get


@pytest.mark.parametrize("name", MADE + SHIPPED)
def test_checkpoints_found_in_step_order(results, name):
    case, summary, _ = results(name)
    found = summary["checkpoints"]
    assert [c["step"] for c in found] == case.steps
    assert len(found) == len(case.markers)
    for c, marker in zip(found, case.markers):
        assert marker in Path(c["path"]).parts, (c["path"], marker)
    if case.state_key is not None:  # a wrapped dict: summary.json says where the weights were
        assert [c.get("state_key") for c in found] == [case.state_key] * len(found)


@pytest.mark.parametrize("name", MADE + SHIPPED)
def test_accumulated_equals_torch_load_reference(results, name):
    case, summary, accumulated = results(name)
    expected = set(case.weights[0])
    assert all(set(w) == expected for w in case.weights)
    assert set(summary["tensors"]) == expected  # every float weight, nothing from optimizer or trainer files
    assert set(accumulated) == expected
    for weight in sorted(expected):
        check_against_reference(
            summary["tensors"][weight], accumulated[weight], [w[weight] for w in case.weights]
        )
    changed = [n for n in expected if np.any(np.diff([w[n] for w in case.weights], axis=0))]
    assert len(changed) >= len(expected) - 1  # real training moved (nearly) every weight
    skipped = {s["name"] for s in summary["skipped"]}
    assert set(case.skipped) <= skipped  # int64 num_batches_tracked: not a float, skipped with a reason
    for weight, names in case.aliases.items():
        assert summary["tensors"][weight]["aliases"] == names


def test_bf16_run_is_read_as_bf16(results):
    case, summary, _ = results("research-bf16")
    saved = torch.load(case.folder / "step_60.pt", weights_only=True)
    assert saved["inp.weight"].dtype == torch.bfloat16
    assert summary["tensors"]["inp.weight"]["shape"] == list(saved["inp.weight"].shape)


@pytest.mark.parametrize("name", ["hf-bin", "hf-sharded"])
def test_hf_bin_tied_head_and_trainer_state(results, name):
    """transformers 4.x torch.saves lm_head.weight and transformer.wte.weight as one storage: one tensor,
    with the alias. The Trainer's optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin beside
    the weights are not checkpoints; trainer_state.json is read."""
    case, summary, accumulated = results(name)
    first = case.folder / "checkpoint-50"
    index = first / "pytorch_model.bin.index.json"
    shard = json.loads(index.read_text())["weight_map"]["lm_head.weight"] if index.exists() else None
    pickled = torch.load(first / (shard or "pytorch_model.bin"), weights_only=True)
    head, embedding = pickled["lm_head.weight"], pickled["transformer.wte.weight"]  # both saved, in one file
    assert head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
    assert "lm_head.weight" not in summary["tensors"] and "lm_head.weight" not in accumulated
    assert summary["tensors"]["transformer.wte.weight"]["aliases"] == ["lm_head.weight"]
    assert summary["trainer_state"]["global_step"] == 150
    for side in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert (case.folder / "checkpoint-50" / side).is_file()


def test_peft_bin_effective_weights(results):
    """adapter_model.bin: each adapted module is reported as the change of its base weight,
    (in, out) like GPT-2's Conv1D, with its own rank and alpha where the config patterns say so."""
    case, summary, _ = results("peft-bin")
    effective = {n for n in summary["tensors"] if not n.startswith("base_model.model.")}
    assert effective == {f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}
    assert summary["tensors"]["transformer.h.0.attn.c_attn.weight"]["shape"] == [32, 96]
    assert summary["tensors"]["transformer.h.1.mlp.c_fc.weight"]["shape"] == [32, 64]


@pytest.mark.parametrize("name", ["lightning", "lightning-version", "lightning-dirpath"])
def test_lightning_last_ckpt_is_not_counted_twice(results, name):
    """save_last=True writes last.ckpt, a byte-identical copy of the newest epoch=E-step=S.ckpt."""
    case, summary, _ = results(name)
    ckpts = case.folder if case.folder.name != "version_0" else case.folder / "checkpoints"
    newest = ckpts / case.markers[-1]
    assert (ckpts / "last.ckpt").read_bytes() == newest.read_bytes()
    assert [c["step"] for c in summary["checkpoints"]] == [20, 40, 60]
    assert not any(Path(c["path"]).name == "last.ckpt" for c in summary["checkpoints"])


def test_views_into_one_storage(tmp_path):
    """Tensors saved as views of one storage (q/k/v split from a fused matrix, a row of it): each is
    its own byte range at an offset into the shared storage."""
    paths, values = tf.make_views_run(tmp_path / "views")
    res = wdiff.run(tmp_path / "views", tmp_path / "out", render=False)
    accumulated = load_file(str(tmp_path / "out" / "accumulated.safetensors"))
    assert [c["step"] for c in res.summary["checkpoints"]] == [0, 10, 20]
    assert set(accumulated) == set(values[0])
    for name in values[0]:
        check_against_reference(res.summary["tensors"][name], accumulated[name], [v[name] for v in values])


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if anything in the pickle is run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_code_in_the_pickle_is_never_run(tmp_path):
    """A state dict carrying a callable global (REDUCE of builtins.open): wdiff reads the weights, or
    refuses in one error, but never calls it."""
    marker = tmp_path / "pwned"
    snaps = tf.train(20, 10, at_zero=False)
    for s in snaps:
        torch.save({"model": s.model, "extra": _Payload(marker)}, tmp_path / f"ckpt_{s.step}.pt")
    assert not marker.exists()
    try:
        res = wdiff.run(tmp_path, tmp_path / "out", render=False)
    except WdiffError:
        res = None
    assert not marker.exists()
    if res is not None:
        weights = [
            {k: v.double().numpy() for k, v in s.model.items() if v.is_floating_point()} for s in snaps
        ]
        for name in weights[0]:
            check_against_reference(
                res.summary["tensors"][name], res.accumulated(name), [w[name] for w in weights]
            )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wdiff", *args], capture_output=True, text=True, timeout=300)


def test_cli_reads_the_pytorch_sample(tmp_path):
    p = _cli("run", str(SAMPLE), "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1, p.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [0, 50, 100, 150]


def test_cli_legacy_format_exits_2_with_one_line(tmp_path):
    """The pre-1.6 torch.save format is refused in one line that names the file."""
    tf.make_legacy_run(tmp_path / "legacy", tf.train(20, 10))
    p = _cli("run", str(tmp_path / "legacy"), "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "step_" in lines[0] and ".pt" in lines[0]
    assert "legacy" in lines[0].lower() or "1.6" in lines[0]
    assert not (tmp_path / "out").exists()


class _RunsACommand:
    """Unpickling this with ``pickle.load`` runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_cli_refuses_a_pickle_that_would_run_a_command_and_never_runs_it(tmp_path):
    """A checkpoint whose pickle calls ``os.system`` on load: exit 2, one line naming the file and the
    global, and the command never ran (its canary file does not exist)."""
    canary = tmp_path / "CANARY"
    run = tmp_path / "run"
    run.mkdir()
    tensors = {"w": torch.ones(3, 4), "b": torch.zeros(4)}
    torch.save(tensors, run / "step_0.pt")
    torch.save({**tensors, "hook": _RunsACommand(f"touch {canary}")}, run / "step_100.pt")
    torch.save(tensors, run / "step_200.pt")
    p = _cli("run", str(run), "-o", str(tmp_path / "out"), "--no-render")
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"wdiff: error: {run / 'step_100.pt'}: ") and "system" in lines[0], lines[0]
    assert not canary.exists() and not (tmp_path / "out").exists()
    # the same pickle through pickle.load does run the command: the test's canary works
    import zipfile

    with zipfile.ZipFile(run / "step_100.pt") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))

    class _Storages(__import__("pickle").Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            if module.startswith("torch"):
                return lambda *a, **k: None
            return super().find_class(module, name)

    import io

    _Storages(io.BytesIO(data)).load()
    assert canary.exists()
