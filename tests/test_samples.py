"""End to end on the shipped sample runs, against an independent reference read by the safetensors
library itself (not wdiff's reader)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safe_open return BF16 as numpy)
import numpy as np
import pytest
from factories import reference
from safetensors import safe_open

import wdiff

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def _load_with_library(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(folder / name, framework="numpy") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.fixture(scope="module", params=["digits-gpt2", "digits-bert-bf16-sharded"])
def sample(request, tmp_path_factory):
    source = SAMPLES / request.param
    out = tmp_path_factory.mktemp(request.param) / "out"
    res = wdiff.run(source, out, render=False, chunk_elements=1000)
    folders = sorted(
        (p for p in source.iterdir() if p.is_dir()),
        key=lambda p: int(p.name.split("-")[-1].split("_")[-1]),
    )
    return res, [_load_with_library(f) for f in folders], folders


def test_sample_matches_library_reference(sample):
    res, checkpoints, folders = sample
    assert [c["path"] for c in res.summary["checkpoints"]] == [str(f) for f in folders]
    assert set(res.names) == set(checkpoints[0])
    for name in res.names:
        ref = reference(checkpoints, name)
        got = res.summary["tensors"][name]
        acc = res.accumulated(name)
        scale = float(ref["accumulated"].max())
        assert scale > 0, f"{name} never changed in a real training run"
        np.testing.assert_allclose(acc, ref["accumulated"], rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(got["net_l2"], ref["net_l2"], rtol=1e-4)
        np.testing.assert_allclose(got["relative_change"], ref["relative_change"], rtol=1e-4)
        np.testing.assert_allclose(got["interval_l2"], ref["interval_l2"], rtol=1e-4)
        np.testing.assert_allclose(got["accumulated_l1"], ref["accumulated"].sum(), rtol=1e-4)


def test_gpt2_run_has_trainer_log_and_tied_head(sample):
    res, checkpoints, _ = sample
    if "transformer.wte.weight" not in res.names:
        pytest.skip("GPT-2 specific")
    assert "lm_head.weight" not in res.names  # tied: saved once as wte
    state = res.summary["trainer_state"]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < 0.6 * losses[0]
    assert [c["step"] for c in res.summary["checkpoints"]] == list(range(50, 401, 50))
