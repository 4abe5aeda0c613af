"""``wdiff watch`` reads every kind of run exactly like ``wdiff run``: the same tensors, names, aliases,
skipped tensors and bits.

Each run is replayed into an empty folder one checkpoint at a time, as training writes it, with
``save_total_limit=1`` (each new checkpoint deletes the older ones once it is complete), while a
watcher follows it; the watched results are then compared with a batch run over the original folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wdiff import api
from wdiff.checkpoints import listing
from wdiff.results import Results
from wdiff.watcher import Watcher

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
TORCH_DATA = Path(__file__).resolve().parent / "data" / "torch"
OPTIONS = {"render": False, "max_points": 512, "chunk_elements": 1000}


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)


def replay_and_watch(source: Path, tmp: Path, delete_older: bool = True) -> Results:
    """Write ``source``'s checkpoints into a new folder one by one under a watcher; its last results."""
    entries = listing(source)
    assert len(entries) >= 3, entries
    live, out = tmp / "live", tmp / "watched"
    checkpoint_paths = {p for _, p in entries}
    for child in source.rglob("*"):  # side files of the run (config.json beside checkpoint files, ...)
        inside = any(child == p or p in child.parents for p in checkpoint_paths)
        if child.is_file() and not inside and child.suffix != ".ckpt":  # last.ckpt comes with the newest
            _copy(child, live / child.relative_to(source))
    live.mkdir(parents=True, exist_ok=True)
    watcher = Watcher(live, out, settle=1, **OPTIONS)
    results = None
    written: list[Path] = []
    for _, path in entries:
        target = live / path.relative_to(source)
        _copy(path, target)
        written.append(target)
        for _ in range(3):
            for update in watcher.poll():
                results = update
                if delete_older:  # save_total_limit=1: once complete, the older checkpoints go
                    for old in written[:-1]:
                        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    assert results is not None
    assert [c["step"] for c in results.summary["checkpoints"]] == [s for s, _ in entries]
    return results


def assert_same(watched: Results, batch: Results) -> None:
    """Bit for bit: names, aliases, skipped tensors, ONNX matching, maps, rows and every metric."""
    assert watched.names == batch.names
    w, b = watched.summary, batch.summary
    assert [c["step"] for c in w["checkpoints"]] == [c["step"] for c in b["checkpoints"]]
    assert [c.get("state_key") for c in w["checkpoints"]] == [c.get("state_key") for c in b["checkpoints"]]
    assert sorted(s["name"] for s in w["skipped"]) == sorted(s["name"] for s in b["skipped"])
    assert (w.get("matching") or {}).get("shared") == (b.get("matching") or {}).get("shared")
    for name in batch.names:
        np.testing.assert_array_equal(watched.accumulated(name), batch.accumulated(name), err_msg=name)
        np.testing.assert_array_equal(watched.neuron_change(name), batch.neuron_change(name), err_msg=name)
        for key in (
            "aliases", "accumulated_l1", "accumulated_max", "net_l2", "interval_l1", "interval_l2", "l2",
            "rotation", "distance_l2", "nonfinite",
        ):  # fmt: skip
            assert w["tensors"][name].get(key) == b["tensors"][name].get(key), (name, key)


@pytest.mark.parametrize(
    "sample",
    [
        "digits-gpt2",  # HF Trainer, F32, tied lm_head.weight
        "digits-bert-bf16-sharded",  # BF16, sharded safetensors
        "digits-gpt2-lora",  # PEFT LoRA: effective weights need adapter_config.json
        "digits-mlp-onnx/dynamo",  # ONNX: shared initializers filled in
        "digits-mlp-onnx/torchscript",  # ONNX: made-up names matched by position
        "digits-accelerate",  # accelerate save_state with two models, in checkpoints/
    ],
)
def test_watch_reads_every_sample_like_run(sample, tmp_path):
    watched = replay_and_watch(SAMPLES / sample, tmp_path)
    batch = api.run(SAMPLES / sample, tmp_path / "batch", **OPTIONS)
    assert_same(watched, batch)


@pytest.mark.parametrize(
    "run",
    [
        SAMPLES / "digits-mlp-pt",  # torch.save state dicts, step_N.pt
        TORCH_DATA / "hf-bin",  # HF pytorch_model.bin, tied lm_head.weight sharing a storage
        TORCH_DATA / "hf-sharded",  # pytorch_model-0000i-of-00002.bin + index
        TORCH_DATA / "peft-bin",  # adapter_model.bin: LoRA products
        TORCH_DATA / "lightning" / "lightning_logs" / "version_0",  # epoch=E-step=S.ckpt + last.ckpt
        TORCH_DATA / "deepspeed",  # global_stepN/mp_rank_00_model_states.pt
    ],
    ids=lambda p: p.name,
)
def test_watch_reads_every_pytorch_layout_like_run(run, tmp_path):
    watched = replay_and_watch(run, tmp_path)
    batch = api.run(run, tmp_path / "batch", **OPTIONS)
    assert_same(watched, batch)


def test_watch_reads_wrapped_and_dcp_runs_like_run(tmp_path):
    import torch_files as tf

    snaps = tf.train(60, 20)
    runs = [tf.make_wrapped_run(tmp_path / "wrapped", snaps)[0].parent]
    runs.append(tf.make_dcp_run(tmp_path / "dcp", snaps)[0].parent)
    for run in runs:
        watched = replay_and_watch(run, tmp_path / f"{run.name}-replay")
        batch = api.run(run, tmp_path / f"{run.name}-batch", **OPTIONS)
        assert_same(watched, batch)
        assert watched.summary["checkpoints"][0]["state_key"] == "model"
