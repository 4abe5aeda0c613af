"""wdiff started from a training script (``wdiff.integrations``): the HF Trainer and Lightning callbacks
on real tiny training runs, a training process killed mid-run, the time a step spends in the callback,
and the clean stop of ``wdiff watch`` they rely on (``until``, ``--until-file``, ``--parent-pid``).

Each run steps at a realistic pace (a test callback sleeps in every step, as a real model's step
takes time; the tiny models here would otherwise write all their checkpoints in a third of a second)
and copies each checkpoint aside when it is saved, so that the watched results can be compared, bit
for bit, with a batch ``wdiff.run`` over the very checkpoints they cover, deleted ones included.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factories import assert_same_results, random_sequence, save, trainer_run
from live_writer import SHAPES

import wdiff
from wdiff import api
from wdiff.checks import OptionError
from wdiff.results import Results
from wdiff.watcher import process_ended, watch

ROOT = Path(wdiff.__file__).resolve().parent.parent
CHUNK_MB = 0.004  # many chunks per tensor, as in tests/test_watch.py
CHUNK = int(CHUNK_MB * (1 << 20) / 4)  # what --chunk-mb 0.004 gives: the same sums in the same order
BATCH = {"render": False, "max_points": 512, "chunk_elements": CHUNK}
# nice=0: on a machine shared with other work, a niced watch may wait seconds for a core; the crash test
# checks that the default (10) is applied
WATCH = {"poll": 0.2, "render": False, "max_points": 512, "chunk_mb": CHUNK_MB, "nice": 0}
STEPS, SAVE_EVERY = 40, 10


def _steps(results: Results) -> list[int]:
    return [c["step"] for c in results.summary["checkpoints"]]


def _timed(cls: type, base: type) -> type:
    """``cls`` with every hook of ``base`` (``on_*``) timed into ``self.spent[hook]``: what the training
    loop waits while it calls this callback."""

    def wrap(name: str):
        inner = getattr(cls, name)

        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(self, *args, **kwargs)
            finally:
                self.spent[name].append(time.perf_counter() - start)

        return hook

    hooks = {n: wrap(n) for n in dir(base) if n.startswith("on_") and callable(getattr(base, n))}
    return type(f"Timed{cls.__name__}", (cls,), hooks)


def _step_cost(spent: dict[str, list[float]], start: str, end: str, steps: int) -> dict[str, float]:
    """Seconds: per step on average in every hook but the first and last (start and wait), the longest
    single call among them, and the start and end hooks themselves."""
    during = [t for name, times in spent.items() if name not in (start, end) for t in times]
    cost = {
        "per_step_mean": sum(during) / steps,
        "longest_call": max(during),
        "calls": len(during),
        "start": sum(spent[start]),
        "end_wait": sum(spent[end]),
    }
    print(f"\ncallback time: {json.dumps({k: round(v, 6) for k, v in cost.items()})}")
    return cost


# --- the clean stop of the watch ------------------------------------------------------------------


def test_until_adds_every_complete_checkpoint_and_leaves_out_a_half_written_one(tmp_path):
    steps = [10, 20, 30, 40]
    seq = random_sequence(SHAPES, len(steps), seed=21)
    run = trainer_run(tmp_path / "run", seq[:3], steps[:3])
    save(run / "checkpoint-40" / "model.safetensors", seq[3])  # killed before trainer_state.json
    warnings: list[str] = []
    asked = []

    def until() -> bool:  # the run ends while the watch is already following it
        asked.append(time.monotonic())
        return len(asked) > 2

    last = watch(run, tmp_path / "out", poll=0.1, until=until, warn=warnings.append, **BATCH)
    assert len(asked) == 3  # asked between polls, and no more once it said so
    assert last is not None and _steps(last) == [10, 20, 30]
    assert [w for w in warnings if "checkpoint-40: left out, not complete when the run stopped" in w]
    batch = api.run(trainer_run(tmp_path / "batch-run", seq[:3], steps[:3]), tmp_path / "batch", **BATCH)
    assert_same_results(Results.load(tmp_path / "out"), batch)


def test_save_total_limit_1_deletes_the_first_checkpoint_before_the_second_settles(tmp_path):
    """What the Trainer does with ``save_total_limit=1``: each save deletes the older checkpoint at once.
    The watch keeps the first checkpoint the moment it is complete; the results cover every checkpoint."""
    from wdiff.watcher import Watcher

    steps = [10, 20, 30, 40]
    seq = random_sequence(SHAPES, len(steps), seed=22)
    run, archive = tmp_path / "run", tmp_path / "archive"
    run.mkdir()
    watcher = Watcher(run, tmp_path / "out", settle=2, **BATCH)
    updates = []
    for i, step in enumerate(steps):
        trainer_run(archive, [seq[i]], [step])
        shutil.copytree(archive / f"checkpoint-{step}", run / f"checkpoint-{step}")
        if i:
            shutil.rmtree(run / f"checkpoint-{steps[i - 1]}")  # rotate_checkpoints, in the same save
        updates += [u for _ in range(4) for u in watcher.poll()]
    assert [_steps(u) for u in updates] == [steps[:2], steps[:3], steps]
    assert_same_results(updates[-1], api.run(archive, tmp_path / "batch", **BATCH))


def test_a_last_ckpt_being_copied_is_waited_for_not_an_error(tmp_path):
    """Lightning's ``last.ckpt`` names no step: while it is copied in (not yet a zip) the folder cannot be
    listed; the watch says so once and tries again at the next poll."""
    from wdiff.watcher import Watcher

    source = ROOT / "tests" / "data" / "torch" / "lightning" / "lightning_logs" / "version_0" / "checkpoints"
    live = tmp_path / "ckpts"
    live.mkdir()
    for name in ("epoch=0-step=20.ckpt", "epoch=1-step=40.ckpt"):
        shutil.copy2(source / name, live / name)
    whole = (source / "last.ckpt").read_bytes()
    (live / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # half copied: no zip directory yet
    warnings: list[str] = []
    watcher = Watcher(live, tmp_path / "out", settle=1, warn=warnings.append, **BATCH)
    assert [watcher.poll() for _ in range(3)] == [[], [], []]
    assert len(warnings) == 1 and warnings[0].startswith("cannot list the folder yet, trying again: ")
    assert not watcher.settled()
    (live / "last.ckpt").write_bytes(whole)  # copied: the step it holds is 60
    updates = [u for _ in range(3) for u in watcher.poll()]
    assert [_steps(u) for u in updates] == [[20, 40], [20, 40, 60]] and watcher.settled()


def test_process_ended_sees_a_killed_process_even_unreaped():
    p = subprocess.Popen(["sleep", "30"])
    ended = process_ended(p.pid)
    assert not ended()
    p.kill()
    deadline = time.monotonic() + 10
    while not ended() and time.monotonic() < deadline:  # a zombie until reaped: it runs no more
        time.sleep(0.01)
    assert ended() and p.poll() is not None
    assert ended()
    with pytest.raises(OptionError, match="parent_pid must be an integer from 1"):
        process_ended(0)


def test_the_callback_passes_its_options_to_wdiff_watch(tmp_path):
    from wdiff.integrations.background import BackgroundWatch

    watch_ = BackgroundWatch(
        poll=1.5, render=False, frames=True, mesh=True, max_points=1000, html_points=0, spectrum=False,
        scheduler="sync", workers=2, chunk_mb=4.0, tensorboard=tmp_path / "tb", wandb="my-project",
        extra_args=["--pool", "mean"],
    )  # fmt: skip
    line = watch_.command_line(tmp_path / "run", tmp_path / "run" / "wdiff", tmp_path / "stop", 1234)
    run, out = str(tmp_path / "run"), str(tmp_path / "run" / "wdiff")
    assert line[:7] == [sys.executable, "-m", "wdiff", "watch", run, "-o", out]
    assert line[7:] == [
        "--poll", "1.5", "--until-file", str(tmp_path / "stop"), "--parent-pid", "1234", "--no-render",
        "--frames", "--mesh", "--max-points", "1000", "--html-points", "0", "--scheduler", "sync",
        "--workers", "2", "--chunk-mb", "4.0", "--wandb", "my-project", "--tensorboard", str(tmp_path / "tb"),
        "--no-spectrum", "--pool", "mean",
    ]  # fmt: skip
    help_text = subprocess.run(
        [sys.executable, "-m", "wdiff", "watch", "--help"], capture_output=True, text=True, check=True,
        env={**os.environ, "COLUMNS": "300"},
    ).stdout  # fmt: skip
    flags = [a for a in line[7:] if a.startswith("--")]
    assert [f for f in flags if f not in help_text] == []
    bad_options = [
        ({"poll": 0}, "poll must be"), ({"extra_args": "--frames"}, "extra_args must be a list"),
        ({"workers": 0}, "workers must be"), ({"scheduler": "fast"}, "scheduler"),
    ]  # fmt: skip
    for bad, match in bad_options:
        with pytest.raises(OptionError, match=match):
            BackgroundWatch(**bad)


# --- the HF Trainer -------------------------------------------------------------------------------


def _tiny_gpt2(torch):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)  # 1,080 parameters


def _random_tokens(torch):
    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 16, (64, 8), generator=torch.Generator().manual_seed(1))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    return Tokens()


def test_hf_trainer_callback_follows_the_run_through_save_total_limit_1(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from wdiff.integrations.huggingface import WdiffCallback

    output, archive = tmp_path / "run", tmp_path / "archive"

    class Pace(transformers.TrainerCallback):
        """A step of a real model's length; each checkpoint copied aside when saved (the reference)."""

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.2)

        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            shutil.copytree(output / name, archive / name)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        callback = _timed(WdiffCallback, transformers.TrainerCallback)(**WATCH)
        callback.spent = collections.defaultdict(list)
        args = transformers.TrainingArguments(
            output_dir=str(output), max_steps=STEPS, save_steps=SAVE_EVERY, save_total_limit=1, report_to=[],
            use_cpu=True, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=10,
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=_tiny_gpt2(torch),
            args=args,
            train_dataset=_random_tokens(torch),
            callbacks=[callback, Pace()],
        )
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    # train() returned after the watch added the last checkpoint and exited
    assert callback.process.returncode == 0, callback.log.read_text()
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-40", "wdiff", "wdiff-watch.log"]
    watched = callback.results
    # each checkpoint was deleted the moment the next one was saved, the first before the second settled
    assert _steps(watched) == [10, 20, 30, 40]
    log = callback.log.read_text()
    assert "watch stopped; results cover 4 checkpoints, steps 10 .. 40" in log and "warning" not in log
    assert_same_results(watched, api.run(archive, tmp_path / "batch", **BATCH))
    cost = _step_cost(callback.spent, "on_train_begin", "on_train_end", STEPS)
    assert cost["per_step_mean"] < 0.02 and cost["start"] < 1.0

    # another rank than zero starts nothing
    state = transformers.TrainerState(is_world_process_zero=False)
    other = WdiffCallback(**WATCH)
    other.on_train_begin(args, state, transformers.TrainerControl())
    other.on_train_end(args, state, transformers.TrainerControl())
    assert other.process is None


# --- Lightning ------------------------------------------------------------------------------------


def test_lightning_callback_follows_the_model_checkpoint_dirpath(tmp_path):
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from wdiff.integrations.lightning import WdiffCallback

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Pace(pl.Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    callback = _timed(WdiffCallback, pl.Callback)(**WATCH)
    callback.spent = collections.defaultdict(list)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=SAVE_EVERY, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[checkpoints, callback, Pace()], enable_progress_bar=False, logger=False,
        accelerator="cpu", enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=8))
    assert callback.process.returncode == 0, callback.log.read_text()
    assert callback.out == tmp_path / "ckpts" / "wdiff"
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    steps = [f"epoch={(s - 1) // 8}-step={s}.ckpt" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    assert names == sorted([*steps, "wdiff", "wdiff-watch.log"])
    assert _steps(callback.results) == [10, 20, 30, 40]
    # the results folder inside the checkpoint folder is no checkpoint to a batch run over it either
    assert_same_results(callback.results, api.run(tmp_path / "ckpts", tmp_path / "batch", **BATCH))
    cost = _step_cost(callback.spent, "on_train_start", "on_train_end", STEPS)
    assert cost["per_step_mean"] < 0.02 and cost["start"] < 1.0


# --- a training process killed mid-run ------------------------------------------------------------

CRASHING_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
import transformers
from wdiff.integrations.huggingface import WdiffCallback
sys.path.insert(0, {tests!r})
from test_integrations import _random_tokens, _tiny_gpt2

torch.set_num_threads(1)
output, options, killed_at = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
callback = WdiffCallback(**options)

class Pace(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.05)

class Trainer(transformers.Trainer):
    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if self.state.global_step == killed_at:  # the weights are written, trainer_state.json is not
            (output.parent / "saving").write_text(str(callback.process.pid))
            time.sleep(600)

args = transformers.TrainingArguments(
    output_dir=str(output), max_steps=100_000, save_steps=10, report_to=[], use_cpu=True,
    per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=10, disable_tqdm=True, seed=0,
)
Trainer(
    model=_tiny_gpt2(torch), args=args, train_dataset=_random_tokens(torch), callbacks=[callback, Pace()]
).train()
"""


def _stat(proc: Path) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name: [0] the state, [16] the nice value."""
    return (proc / "stat").read_bytes().rpartition(b")")[2].split()


def _runs(pid: int) -> bool:
    """Process ``pid`` exists and is no zombie."""
    try:
        return _stat(Path(f"/proc/{pid}"))[0] != b"Z"
    except OSError:
        return False


def _complete_steps(output: Path) -> list[int]:
    """The checkpoints the Trainer finished: trainer_state.json (written last) parses, the weights load."""
    from safetensors.numpy import load_file

    steps = []
    for folder in output.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            load_file(folder / "model.safetensors")
        except (OSError, ValueError):
            continue
        steps.append(int(folder.name.split("-")[1]))
    return sorted(steps)


def test_a_killed_training_process_leaves_finished_results_of_every_complete_checkpoint(tmp_path):
    """SIGKILL while checkpoint-50 is saved: its weights are on disk, its trainer_state.json is not."""
    pytest.importorskip("transformers")
    script = tmp_path / "train.py"
    script.write_text(CRASHING_SCRIPT.format(tests=str(Path(__file__).parent)))
    output, saving = tmp_path / "run", tmp_path / "saving"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(output), json.dumps({**WATCH, "nice": 10}), "50"],
        env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.poll() is None and not saving.is_file():
            time.sleep(0.02)
        assert trainer.poll() is None and saving.is_file(), trainer.stderr.read()
        watcher = int(saving.read_text())
        maps = Path(f"/proc/{watcher}/maps").read_text()
        assert "libtorch" not in maps and "python" in maps  # a fresh interpreter, without torch
        assert os.getsid(watcher) == watcher != os.getsid(trainer.pid)  # its own session
        nice = {_stat(task)[16] for task in Path(f"/proc/{watcher}/task").iterdir()}  # every thread's
        assert nice == {str(int(_stat(Path(f"/proc/{trainer.pid}"))[16]) + 10).encode()}
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.communicate(timeout=60)
    assert _complete_steps(output) == [10, 20, 30, 40]
    assert (output / "checkpoint-50" / "model.safetensors").is_file()
    deadline = time.monotonic() + 90
    while _runs(watcher) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _runs(watcher), "the watch did not stop after its training process was killed"
    log = (output / "wdiff-watch.log").read_text()
    assert f"process {trainer.pid} ended: every complete checkpoint added" in log
    assert "checkpoint-50: left out, not complete when the run stopped (" in log
    assert "results cover 4 checkpoints, steps 10 .. 40" in log
    assert "Traceback" not in log and "error" not in log
    watched = Results.load(output / "wdiff")
    assert _steps(watched) == [10, 20, 30, 40]
    assert watched.summary["update"] in ("full", "incremental from 3")
    assert set(watched.names) == set(watched.summary["tensors"]) and len(watched.names) >= 10
    assert all(np.isfinite(watched.accumulated(n)).all() for n in watched.names)
    batch = api.run(output, tmp_path / "batch", **BATCH)  # leaves out the newest, incomplete checkpoint
    assert_same_results(watched, batch)


def test_pytorch_lightning_callback_and_a_watch_that_starts_after_the_last_save(tmp_path):
    """The ``pytorch_lightning`` package's own Callback class; a run so short that every checkpoint is
    written before the watch looks once: the stop at the end adds them all."""
    torch = pytest.importorskip("torch")
    ptl = pytest.importorskip("pytorch_lightning")
    from wdiff.integrations.pytorch_lightning import WdiffCallback

    class Model(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 4)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    callback = WdiffCallback(tmp_path / "results", tensorboard=tmp_path / "tb", **WATCH)
    assert isinstance(callback, ptl.Callback)
    checkpoints = ptl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpts", every_n_train_steps=5, save_top_k=-1
    )
    trainer = ptl.Trainer(
        max_steps=15, callbacks=[checkpoints, callback], enable_progress_bar=False, logger=False,
        accelerator="cpu", enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=8))
    assert callback.process.returncode == 0, callback.log.read_text()
    assert callback.log == tmp_path / "results-watch.log"
    assert _steps(callback.results) == [5, 10, 15]
    assert_same_results(callback.results, api.run(tmp_path / "ckpts", tmp_path / "batch", **BATCH))
    # --tensorboard passed through: every interval's scalars at its step, once (TensorBoard's own loader)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("model/update_ratio_per_step")] == [10, 15]


def test_a_watch_that_fails_is_reported_once_with_its_reason(tmp_path, caplog):
    from wdiff.integrations.background import BackgroundWatch

    trainer_run(tmp_path / "run", random_sequence(SHAPES, 2, seed=3), [1, 2])
    failing = BackgroundWatch(extra_args=["--max-points", "-5"], quiet=True)
    failing.start(tmp_path / "run")
    failing.process.wait(60)
    with caplog.at_level("WARNING", logger="wdiff.integrations"):
        failing.check()
        failing.check()
        assert failing.stop() is None
    assert [r.getMessage() for r in caplog.records] == [
        f"wdiff watch stopped (exit code 2): wdiff: error: --max-points must be an integer from 1 to "
        f"1000000000000, got -5 (log: {tmp_path / 'run' / 'wdiff-watch.log'})"
    ]
    caplog.clear()
    (tmp_path / "a-file").write_text("")
    unstartable = BackgroundWatch(quiet=True)
    with caplog.at_level("WARNING", logger="wdiff.integrations"):
        unstartable.begin(tmp_path / "a-file" / "run")  # from a training hook: training goes on
    assert unstartable.process is None and unstartable.stop() is None
    assert [r.getMessage().split(":")[:2] for r in caplog.records] == [["wdiff", " no watch of this run"]]


def test_lightning_training_that_fails_stops_the_watch_with_what_is_complete(tmp_path):
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from wdiff.integrations.lightning import WdiffCallback

    class Diverging(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 4)

        def training_step(self, batch, i):
            if self.global_step == 25:
                raise FloatingPointError("loss is NaN")
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    callback = WdiffCallback(**WATCH)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=10, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[checkpoints, callback], enable_progress_bar=False, logger=False,
        accelerator="cpu", enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(FloatingPointError):
        trainer.fit(Diverging(), torch.utils.data.DataLoader(data, batch_size=8))
    assert callback.process.wait(60) == 0  # told to finish (on_exception), not waited for
    assert _steps(callback.results) == [10, 20]
    assert "watch-stop appeared: every complete checkpoint added" in callback.log.read_text()
