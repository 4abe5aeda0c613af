"""Folder layouts: accelerate save_state, variant indexes, single and sharded in one run, tied weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, save, save_sharded, trainer_run
from kinds import check_against_reference
from safetensors.numpy import load_file

import wdiff
from wdiff.checkpoints import scan
from wdiff.errors import WdiffError

SAMPLES = Path(__file__).parent.parent / "sample_checkpoints"
SHAPES = {"model.layers.0.w": (6, 5), "model.layers.1.w": (5,), "model.embed_tokens.weight": (9, 4)}


def _check_all(res, seq, rename=lambda n: n):
    for name in seq[0]:
        if np.asarray(seq[0][name]).dtype.kind != "f":
            continue
        entry = res.summary["tensors"][rename(name)]
        check_against_reference(entry, res.accumulated(rename(name)), [c[name] for c in seq])


@pytest.mark.parametrize("entry", ["project", "checkpoints"])
def test_real_accelerate_folder_matches_the_reference(tmp_path, entry):
    """``Accelerator.save_state`` with automatic naming, two prepared models (model, model_1)."""
    root = SAMPLES / "digits-accelerate"
    res = wdiff.run(root if entry == "project" else root / "checkpoints", tmp_path / "out", render=False)
    folders = sorted((root / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    assert [c["step"] for c in res.summary["checkpoints"]] == [0, 1, 2]
    expected = set()
    for model in ("model", "model_1"):
        seq = [load_file(str(f / f"{model}.safetensors")) for f in folders]
        _check_all(res, seq, lambda n, m=model: f"{m}.{n}")
        expected |= {f"{model}.{n}" for n in seq[0]}
    assert set(res.names) == expected


def test_accelerate_folder_with_one_model_keeps_plain_names(tmp_path):
    seq = random_sequence(SHAPES, 3)
    for i, c in enumerate(seq):
        save(tmp_path / "proj" / "checkpoints" / f"checkpoint_{i}" / "model.safetensors", c)
        (tmp_path / "proj" / "checkpoints" / f"checkpoint_{i}" / "optimizer.bin").write_bytes(b"\x80\x04junk")
    res = wdiff.run(tmp_path / "proj", tmp_path / "out", render=False)
    assert set(res.names) == set(SHAPES)
    _check_all(res, seq)


def test_variant_index_fp16(tmp_path):
    """``model.safetensors.index.fp16.json`` with ``model.fp16-0000k-of-0000n.safetensors`` shards."""
    seq = random_sequence(SHAPES, 3, dtype="F16", seed=3)
    for step, c in zip([10, 20, 30], seq):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        save_sharded(folder, c, shards=2)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            variant = shard.replace("model-", "model.fp16-")
            (folder / shard).rename(folder / variant)
            index["weight_map"] = {k: (variant if v == shard else v) for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").unlink()
        (folder / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, chunk_elements=7)
    _check_all(res, seq)


def test_single_file_and_sharded_checkpoints_in_one_run(tmp_path):
    seq = random_sequence(SHAPES, 4, dtype="BF16", seed=5)
    for step, c in zip([1, 2, 3, 4], seq):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        if step % 2:
            save(folder / "model.safetensors", c)
        else:
            save_sharded(folder, c, shards=3)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False)
    _check_all(res, seq)


def test_a_zip_that_is_not_a_torch_file_is_refused_in_one_line(tmp_path):
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a zip, not from torch.save")
    with pytest.raises(
        WdiffError, match=r"checkpoint-1/pytorch_model\.bin: is a zip archive but not a torch.save"
    ):
        scan(tmp_path)


# --- tied weights ------------------------------------------------------------------------------------


def test_real_tied_gpt2_reports_the_embedding_once_with_its_alias(tmp_path):
    """GPT-2 with tie_word_embeddings: lm_head.weight is not saved; wte is reported with the alias."""
    res = wdiff.run(SAMPLES / "digits-gpt2", tmp_path / "out", render=False)
    folders = sorted((SAMPLES / "digits-gpt2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    seq = [load_file(str(f / "model.safetensors")) for f in folders]
    assert "lm_head.weight" not in res.names
    entry = res.summary["tensors"]["transformer.wte.weight"]
    assert entry["aliases"] == ["lm_head.weight"]
    assert [n for n, t in res.summary["tensors"].items() if "aliases" in t] == ["transformer.wte.weight"]
    _check_all(res, seq)


@pytest.mark.parametrize("tie", [True, False, None])
def test_alias_only_when_the_config_ties(tmp_path, tie):
    seq = random_sequence(SHAPES, 2)
    root = trainer_run(tmp_path / "run", seq, steps=[1, 2])
    for folder in root.iterdir():
        config = {"model_type": "llama"} | ({} if tie is None else {"tie_word_embeddings": tie})
        (folder / "config.json").write_text(json.dumps(config))
    run = scan(root)
    assert run.aliases == ({"model.embed_tokens.weight": ["lm_head.weight"]} if tie else {})


def test_tied_copy_present_is_not_an_alias(tmp_path):
    """If lm_head.weight is saved too, it is a tensor of its own (its bytes may differ)."""
    seq = random_sequence(SHAPES | {"lm_head.weight": (9, 4)}, 2)
    root = trainer_run(tmp_path / "run", seq, steps=[1, 2])
    for folder in root.iterdir():
        (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    run = scan(root)
    assert run.aliases == {} and "lm_head.weight" in {t.name for t in run.tensors}
    shutil.rmtree(root)


def test_final_model_beside_the_checkpoint_folders(tmp_path):
    """``trainer.save_model()`` into the output dir puts weights beside checkpoint-N/: the run is the
    checkpoint folders."""
    seq = random_sequence(SHAPES, 3, seed=8)
    root = trainer_run(tmp_path / "run", seq, steps=[10, 20, 30])
    save(root / "model.safetensors", seq[-1])
    res = wdiff.run(root, tmp_path / "out", render=False)
    assert [c["step"] for c in res.summary["checkpoints"]] == [10, 20, 30]
    _check_all(res, seq)
