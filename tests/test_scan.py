"""Finding, ordering and lining up checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import random_sequence, save, trainer_run

from wdiff.checkpoints import scan
from wdiff.errors import WdiffError

SHAPES = {"layers.0.w": (3, 2), "layers.1.w": (4,)}


def test_hf_trainer_dir_is_ordered_numerically_and_reads_trainer_state(tmp_path):
    seq = random_sequence(SHAPES, 4)
    root = trainer_run(tmp_path / "run", seq, steps=[900, 1000, 50, 10000])
    (root / "runs").mkdir()  # tensorboard logs beside the checkpoints are ignored
    (root / "checkpoint-1000" / "optimizer.pt").write_bytes(b"PK\x03\x04junk")
    run = scan(root)
    assert run.steps == [50, 900, 1000, 10000]
    assert run.trainer_state["global_step"] == 10000
    assert np.isnan(run.trainer_state["log_history"][0]["grad_norm"])  # bare NaN accepted


def test_folder_of_files_ordered_by_step_number(tmp_path):
    seq = random_sequence(SHAPES, 3)
    for step, c in zip([1000, 900, 90], seq):
        save(tmp_path / f"step_{step}.safetensors", c)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    run = scan(tmp_path)
    assert run.steps == [90, 900, 1000]
    assert [c.path.rsplit("/", 1)[-1] for c in run.checkpoints] == [
        "step_90.safetensors",
        "step_900.safetensors",
        "step_1000.safetensors",
    ]


def test_folder_of_checkpoint_folders(tmp_path):
    seq = random_sequence(SHAPES, 3)
    for step, c in zip([200, 100, 300], seq):
        save(tmp_path / f"step-{step}" / "model.safetensors", c)
    assert scan(tmp_path).steps == [100, 200, 300]


def test_explicit_list_keeps_the_given_order(tmp_path):
    seq = random_sequence(SHAPES, 3)
    paths = [
        save(tmp_path / name, c) for name, c in zip(["c.safetensors", "a.safetensors", "b.safetensors"], seq)
    ]
    run = scan(paths)
    assert [c.path for c in run.checkpoints] == [str(p) for p in paths]


def test_missing_and_reshaped_tensors_are_skipped_with_a_reason(tmp_path):
    seq = random_sequence({"keep": (2, 2), "gone": (3,), "grows": (2,)}, 3)
    seq[1].pop("gone")
    seq[2]["grows"] = np.zeros(5, np.float32)
    seq[0]["step_count"] = seq[1]["step_count"] = seq[2]["step_count"] = np.array([3], np.int64)
    run = scan([save(tmp_path / f"s{i}.safetensors", c) for i, c in enumerate(seq)])
    assert [t.name for t in run.tensors] == ["keep"]
    reasons = {s.name: s.reason for s in run.skipped}
    assert "missing from 1 checkpoint" in reasons["gone"]
    assert "changes shape" in reasons["grows"] and "[2]" in reasons["grows"] and "[5]" in reasons["grows"]
    assert "not a float" in reasons["step_count"]


def test_network_order_is_natural(tmp_path):
    names = {f"model.layers.{i}.w": (2,) for i in (10, 9, 1, 2)}
    seq = random_sequence(names, 2)
    run = scan([save(tmp_path / f"s{i}.safetensors", c) for i, c in enumerate(seq)])
    assert [t.name for t in run.tensors] == [f"model.layers.{i}.w" for i in (1, 2, 9, 10)]


@pytest.mark.parametrize(
    "make, problem",
    [
        (
            lambda d: (
                save(d / "checkpoint-5" / "model.safetensors", {"w": np.zeros(2, np.float32)}).parent.parent
            ),
            "at least two",
        ),
        (lambda d: save(d / "only.safetensors", {"w": np.zeros(2, np.float32)}), "at least two"),
        (lambda d: d, "no checkpoints found"),
        (lambda d: d / "nope", "no such file"),
    ],
)
def test_too_few_checkpoints_is_an_error(tmp_path, make, problem):
    with pytest.raises(WdiffError, match=problem):
        scan(make(tmp_path))


def test_files_without_step_numbers_in_a_folder_are_an_error(tmp_path):
    seq = random_sequence(SHAPES, 2)
    save(tmp_path / "first.safetensors", seq[0])
    save(tmp_path / "second.safetensors", seq[1])
    with pytest.raises(WdiffError, match="no step number"):
        scan(tmp_path)


def test_broken_trainer_state_names_the_file(tmp_path):
    root = trainer_run(tmp_path / "run", random_sequence(SHAPES, 2), steps=[1, 2])
    (root / "checkpoint-2" / "trainer_state.json").write_text("{not json")
    with pytest.raises(WdiffError, match="checkpoint-2/trainer_state.json: trainer state is not valid JSON"):
        scan(root)
    json.loads((root / "checkpoint-1" / "trainer_state.json").read_text(), parse_constant=float)


SAMPLE = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "digits-gpt2"


def test_explicit_files_take_their_steps_and_side_files_from_their_folders(tmp_path):
    files = [SAMPLE / f"checkpoint-{s}" / "model.safetensors" for s in (50, 100, 400)]
    run = scan(files)
    assert run.steps == [50, 100, 400]
    assert run.aliases == {"transformer.wte.weight": ["lm_head.weight"]}  # config.json beside the file
    assert run.trainer_state is not None and run.trainer_state["global_step"] == 400
    assert run.warnings == ()
    same = scan([f.parent for f in files])
    assert [t.name for t in same.tensors] == [t.name for t in run.tensors] and same.steps == run.steps


def test_files_of_one_numbered_folder_do_not_take_its_number_as_their_step(tmp_path):
    """``run1/base.safetensors run1/tuned.safetensors``: the folder holds both, so its number (or its
    trainer_state.json) is no step of either; the order given stands, and a named step still counts."""
    folder = tmp_path / "run1"
    for name in ("base", "tuned", "step_30"):
        save(folder / f"{name}.safetensors", {"w": np.full((2, 2), len(name), np.float32)})
    (folder / "trainer_state.json").write_text('{"global_step": 7, "log_history": []}')
    run = scan([folder / "base.safetensors", folder / "tuned.safetensors", folder / "step_30.safetensors"])
    assert run.steps == [None, None, 30]
    alone = scan(
        [SAMPLE / "checkpoint-50" / "model.safetensors", SAMPLE / "checkpoint-100" / "model.safetensors"]
    )
    assert alone.steps == [50, 100]  # one file per folder: the folder's step


def test_an_explicit_list_out_of_step_order_is_kept_with_a_warning(tmp_path):
    files = [SAMPLE / f"checkpoint-{s}" / "model.safetensors" for s in (150, 50, 100)]
    run = scan(files)
    assert run.steps == [150, 50, 100]  # the user's order
    (warning,) = run.warnings
    assert (
        warning.name == str(files[1]) and "step is 50" in warning.reason and "order given" in warning.reason
    )


def test_a_named_step_wins_over_other_numbers():
    from wdiff.checkpoints import step_of

    assert step_of("epoch=2-step=150-v1.ckpt") == 150
    assert step_of("global_step300") == 300
    assert step_of("checkpoint-500") == 500
    assert step_of("ckpt_000050.pth") == 50
    assert step_of("model_epoch10_step500.pt") == 500
    assert step_of("step-1000") == 1000
    assert step_of("last.ckpt") is None
