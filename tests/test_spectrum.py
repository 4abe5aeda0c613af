"""The update spectrum (``wdiff.spectrum``): singular values of ``W(T) - W(0)`` against numpy's SVD."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from factories import DTYPES, trainer_run
from kinds import adapter_checkpoint

import wdiff
from wdiff import spectrum
from wdiff.schema import check_summary

ENERGIES = ("0.5", "0.9", "0.99")


def _decoded(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` as stored in ``dtype`` and decoded to float32, as wdiff reads it."""
    return a.astype(DTYPES[dtype][0]).astype(np.float32)


def _update(first: np.ndarray, last: np.ndarray, dtype: str) -> np.ndarray:
    """D = W(T) - W(0), float32 as wdiff forms it, as a float64 matrix of rows x the rest."""
    d = _decoded(last, dtype) - _decoded(first, dtype)
    return d.reshape(d.shape[0], -1).astype(np.float64)


def _reference(d: np.ndarray) -> tuple[np.ndarray, float, dict[str, int], float]:
    """numpy's singular values, ||D||_F^2, the rank for each energy share and the effective rank."""
    s = np.linalg.svd(d, compute_uv=False)
    energy = float((d**2).sum())
    share = np.cumsum(s**2) / energy
    ranks = {f: int(np.argmax(share >= float(f) * (1 - 1e-12))) + 1 for f in ENERGIES}
    p = s[s > 0] / s.sum()
    return s, energy, ranks, float(np.exp(-(p * np.log(p)).sum()))


def _matrix(rng: np.random.Generator, m: int, n: int, values: np.ndarray) -> np.ndarray:
    """An m x n matrix with singular values ``values`` (random singular vectors)."""
    u = np.linalg.qr(rng.standard_normal((m, values.size)))[0]
    v = np.linalg.qr(rng.standard_normal((n, values.size)))[0]
    return (u * values) @ v.T


def _run(root: Path, first: dict[str, np.ndarray], last: dict[str, np.ndarray], dtype: str) -> Path:
    np_type = DTYPES[dtype][0]
    middle = {k: (v + last[k]) / 2 for k, v in first.items()}
    seq = [{k: v.astype(np_type) for k, v in c.items()} for c in (first, middle, last)]
    return trainer_run(root, seq, [10, 20, 30])


def _check_exact(entry: dict, d: np.ndarray) -> None:
    s, energy, ranks, erank = _reference(d)
    k = min(spectrum.K_MAX, *d.shape)
    assert entry["complete"] and entry["k"] == k
    np.testing.assert_allclose(entry["singular_values"], s[:k], rtol=1e-6, atol=1e-9 * s[0])
    assert entry["rank_for_energy"] == ranks
    np.testing.assert_allclose(entry["effective_rank"], erank, rtol=1e-6)
    np.testing.assert_allclose(entry["energy_captured"], min(1.0, (s[:k] ** 2).sum() / energy), rtol=1e-9)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_exact_paths_match_numpy(tmp_path, dtype, monkeypatch):
    """Whole matrices, conv weights, and tall and wide ones through TSQR (blocks made small)."""
    monkeypatch.setattr(spectrum, "BLOCK_ELEMENTS", 4096)  # 200 x 60 and 40 x 300: TSQR over blocks
    rng = np.random.default_rng(1)
    shapes = {"small": (48, 40), "conv": (16, 8, 3, 3), "tall": (200, 60), "wide": (40, 300), "bias": (40,)}
    first = {k: rng.standard_normal(s) for k, s in shapes.items()}
    last = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in first.items()}
    res = wdiff.run(_run(tmp_path / "run", first, last, dtype), tmp_path / "out", render=False, spectrum=True)
    tensors = res.summary["tensors"]
    assert "update_spectrum" not in tensors["bias"]  # a vector has no spectrum
    for name in ("small", "conv", "tall", "wide"):
        entry = tensors[name]["update_spectrum"]
        assert entry["method"] == "exact"
        _check_exact(entry, _update(first[name], last[name], dtype))
    # ||D||_F^2 is the one compute reports: sum s_i^2 = distance_l2[-1]^2
    conv = tensors["conv"]
    np.testing.assert_allclose(
        np.sum(np.square(conv["update_spectrum"]["singular_values"])), conv["distance_l2"][-1] ** 2, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_randomized_path_matches_numpy(tmp_path, dtype, monkeypatch):
    """The range finder forced (EXACT_SIDE 0), over many row blocks and groups: the top k singular
    values within 1e-3 of numpy's, every rank for energy exact. W(0) is small (0.01): BF16 rounding of
    weights near 1 would add a noise floor of singular values near 0.15, which no range finder
    resolves (docs/metrics.md)."""
    monkeypatch.setattr(spectrum, "EXACT_SIDE", 0)
    monkeypatch.setattr(spectrum, "BLOCK_ELEMENTS", 1 << 15)  # 700 columns: 46 rows a block
    rng = np.random.default_rng(2)
    m, n = 600, 700
    first = {"w": 0.01 * rng.standard_normal((m, n))}
    last = {"w": first["w"] + _matrix(rng, m, n, np.exp(-np.arange(600) / 40))}
    res = wdiff.run(
        _run(tmp_path / "run", first, last, dtype), tmp_path / "out", render=False, workers=2, spectrum=True
    )
    entry = res.summary["tensors"]["w"]["update_spectrum"]
    d = _update(first["w"], last["w"], dtype)
    s, energy, ranks, _ = _reference(d)
    assert entry["method"] == "randomized" and not entry["complete"] and entry["k"] == 128
    got = np.array(entry["singular_values"])
    assert got.size == 128 and np.all(np.diff(got) <= 0)
    assert np.max(np.abs(got - s[:128]) / s[:128]) <= 1e-3
    assert np.all(got <= s[:128] * (1 + 1e-6))  # Rayleigh-Ritz: never above the true values
    assert entry["rank_for_energy"] == ranks
    assert ranks["0.99"] < 128  # the test means something: every share reached within k
    np.testing.assert_allclose(entry["energy_captured"], (s[:128] ** 2).sum() / energy, rtol=1e-3)


def test_a_planted_low_rank_update(tmp_path, monkeypatch):
    """D = U diag(8..1) V^T + tiny noise: rank for 50% / 90% / 99% of the energy is 2 / 5 / 7 (64 + 49 of
    204 is 55%; 64 + 49 + 36 + 25 + 16 = 190 is 93%; 190 + 9 + 4 = 203 is 99.5%), on both paths."""
    rng = np.random.default_rng(3)
    planted = np.arange(8, 0, -1.0)
    shapes = {"exact": (300, 400), "randomized": (700, 800)}
    first = {k: rng.standard_normal(s) for k, s in shapes.items()}
    last = {
        k: v + _matrix(rng, *v.shape, planted) + 1e-5 * rng.standard_normal(v.shape) for k, v in first.items()
    }
    res = wdiff.run(_run(tmp_path / "run", first, last, "F32"), tmp_path / "out", render=False, spectrum=True)
    for name in shapes:
        entry = res.summary["tensors"][name]["update_spectrum"]
        assert entry["method"] == name
        assert entry["rank_for_energy"] == {"0.5": 2, "0.9": 5, "0.99": 7}
        np.testing.assert_allclose(entry["singular_values"][:8], planted, rtol=1e-3)
        assert entry["singular_values"][8] < 1e-2
        # effective rank: the 8 planted values dominate (exp of the entropy of (8..1)/36 is 7.3); the
        # noise tail adds a little on the exact path, where every value counts
        p = planted / planted.sum()
        assert np.exp(-(p * np.log(p)).sum()) <= entry["effective_rank"] < 9.5
        if name == "exact":
            _check_exact(entry, _update(first[name], last[name], "F32"))


PREFIX = "base_model.model."


def test_lora_update_is_exact_from_the_factors(tmp_path):
    """D = s (B_T A_T - B_0 A_0) against numpy's SVD of the effective weights; the rank B(T) A(T) uses
    against the configured r: a module whose B(T) has only 2 nonzero columns uses rank 2 of r = 4."""
    rng = np.random.default_rng(4)
    modules = {"q_proj": (24, 16, 4), "up_proj": (40, 30, 8)}  # out, in, r
    seq = []
    state = {}
    for mod, (out, inp, r) in modules.items():
        state[f"{PREFIX}{mod}.lora_A.weight"] = rng.standard_normal((r, inp))
        state[f"{PREFIX}{mod}.lora_B.weight"] = 0.1 * rng.standard_normal((out, r))
    for _ in range(3):
        seq.append({k: v.astype(np.float32) for k, v in state.items()})
        state = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
    seq[-1][f"{PREFIX}q_proj.lora_B.weight"][:, 2:] = 0  # B(T) A(T) of rank 2
    settings = {"r": 4, "lora_alpha": 8, "rank_pattern": {"up_proj": 8}}
    for step, tensors in zip((5, 10, 15), seq):
        adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tensors, settings, step)
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True)
    for mod, (*_, r) in modules.items():
        scale = 8 / r

        def effective(t: dict, mod: str = mod, scale: float = scale) -> np.ndarray:
            a = t[f"{PREFIX}{mod}.lora_A.weight"].astype(np.float64)
            return scale * t[f"{PREFIX}{mod}.lora_B.weight"].astype(np.float64) @ a

        entry = res.summary["tensors"][f"{mod}.weight"]["update_spectrum"]
        assert entry["method"] == "lora"
        d = effective(seq[-1]) - effective(seq[0])
        s, energy, ranks, erank = _reference(d)
        # at most r_T + r_0 values: the update of an adapter has no more rank, the rest are 0
        got = entry["singular_values"]
        assert len(got) == 2 * r and np.all(s[2 * r :] < 1e-12 * s[0])
        np.testing.assert_allclose(got, s[: 2 * r], rtol=1e-6, atol=1e-9 * s[0])
        assert entry["rank_for_energy"] == ranks
        used = {k: entry["lora"][k] for k in ("r", "rank_used")}
        assert used == {"r": r, "rank_used": 2 if mod == "q_proj" else r}
        assert entry["lora"]["rank_for_energy"] == _reference(effective(seq[-1]))[2]  # of B(T) A(T) alone
        np.testing.assert_allclose(entry["effective_rank"], erank, rtol=1e-5)


def test_an_incremental_extension_recomputes_the_spectrum(tmp_path):
    rng = np.random.default_rng(5)
    seq = []
    w = rng.standard_normal((64, 96))
    for _ in range(5):
        seq.append({"w": w.astype(np.float32)})
        w = w + 0.1 * rng.standard_normal(w.shape)
    trainer_run(tmp_path / "run", seq[:3], [1, 2, 3])
    early = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True).summary["tensors"]["w"]
    trainer_run(tmp_path / "more", seq[3:], [4, 5])
    for folder in (tmp_path / "more").iterdir():
        shutil.move(folder, tmp_path / "run" / folder.name)
    extended = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True).summary
    assert extended["update"] == "incremental from 3"
    entry = extended["tensors"]["w"]["update_spectrum"]
    _check_exact(entry, _update(seq[0]["w"], seq[-1]["w"], "F32"))
    assert entry != early["update_spectrum"]  # W(T) changed: not the earlier spectrum
    again = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True).summary
    assert again["update"] == "up to date"
    assert again["tensors"]["w"]["update_spectrum"] == entry  # carried over


def test_remote_inputs_read_by_range(http_server, tmp_path, monkeypatch):
    """Over HTTP (ranges fetched by InputFiles), the same spectra as from local files, on both the
    exact (TSQR, blocks made small) and the randomized path; off by default."""
    monkeypatch.setattr(spectrum, "BLOCK_ELEMENTS", 4096)
    rng = np.random.default_rng(9)
    first = {"tall": rng.standard_normal((300, 40)), "big": rng.standard_normal((520, 530))}
    last = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in first.items()}
    root = _run(tmp_path / "runs" / "run", first, last, "BF16")
    local = wdiff.run(root, tmp_path / "local", render=False, spectrum=True).summary["tensors"]
    base = http_server(tmp_path / "runs")
    remote = wdiff.run(f"{base}/run/", tmp_path / "remote", render=False, spectrum=True).summary["tensors"]
    for name in first:
        assert remote[name]["update_spectrum"] == local[name]["update_spectrum"]
    assert local["big"]["update_spectrum"]["method"] == "randomized"
    _check_exact(local["tall"]["update_spectrum"], _update(first["tall"], last["tall"], "BF16"))
    default = wdiff.run(f"{base}/run/", tmp_path / "default", render=False).summary
    assert "update_spectrum" not in default["tensors"]["tall"]


def test_no_update_is_said_without_nan(tmp_path):
    """W(0) == W(T) (the run came back to its start): D = 0 has rank 0, no singular value, no NaN."""
    rng = np.random.default_rng(6)
    w0 = {"w": rng.standard_normal((32, 48)).astype(np.float32), "big": rng.standard_normal((600, 530))}
    w1 = {k: v + 1 for k, v in w0.items()}
    trainer_run(tmp_path / "run", [w0, w1, w0], [1, 2, 3])
    wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True)

    def refuse(word: str) -> None:
        raise AssertionError(f"{word} in summary.json")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)
    for name in ("w", "big"):
        entry = summary["tensors"][name]["update_spectrum"]
        assert entry["singular_values"] == [] and entry["effective_rank"] == 0.0
        assert entry["rank_for_energy"] == {"0.5": 0, "0.9": 0, "0.99": 0}
        assert "zero" in entry["note"]


def test_nonfinite_values_give_no_spectrum_and_no_nan(tmp_path):
    rng = np.random.default_rng(7)
    w0 = {"w": rng.standard_normal((32, 48)).astype(np.float32)}
    w1 = {"w": w0["w"].copy()}
    w1["w"][3, 4] = np.nan
    trainer_run(tmp_path / "run", [w0, w1], [1, 2])
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=True)
    entry = res.summary["tensors"]["w"]["update_spectrum"]
    assert entry["singular_values"] == [] and entry["effective_rank"] is None
    assert "NaN" in entry["note"]


def test_spectrum_can_be_turned_off_and_the_schema_checks_it(tmp_path):
    rng = np.random.default_rng(8)
    seq = [{"w": rng.standard_normal((8, 8)).astype(np.float32)} for _ in range(2)]
    trainer_run(tmp_path / "run", seq, [1, 2])
    res = wdiff.run(tmp_path / "run", tmp_path / "out", render=False, spectrum=False)
    assert "update_spectrum" not in res.summary["tensors"]["w"]
    assert "spectrum_seconds" not in res.summary["timing"]
    res = wdiff.run(tmp_path / "run", tmp_path / "on", render=False, spectrum=True)
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    check_summary(summary)
    summary["tensors"]["w"]["update_spectrum"]["rank_for_energy"]["0.9"] = 2.5
    with pytest.raises(ValueError, match=r"update_spectrum\.rank_for_energy\.0\.9"):
        check_summary(summary)


def test_entry_formulas():
    """effective rank exp(H(s / sum s)) and ranks for energy on values worked out by hand."""
    entry = spectrum.spectrum_entry(np.array([2.0, 2.0, 0.0]), 8.0, 3, complete=True, method="exact")
    assert entry["effective_rank"] == pytest.approx(2.0)  # two equal values: rank 2
    assert entry["rank_for_energy"] == {"0.5": 1, "0.9": 2, "0.99": 2}
    # randomized, 2 trusted values of 3 holding 8 of 9: 90% and 99% are beyond k, so not given
    top = spectrum.spectrum_entry(np.array([2.0, 2.0, 0.5]), 9.0, 2, complete=False, method="randomized")
    assert top["rank_for_energy"] == {"0.5": 2, "0.9": None, "0.99": None}
    assert top["singular_values"] == [2.0, 2.0]
    assert top["energy_captured"] == pytest.approx(8 / 9)


def test_the_spectrum_is_on_by_default_up_to_2_to_the_25_matrix_values(tmp_path):
    """The default follows the spectrum's cost, the matrices' values (not their bytes): a run of BF16
    matrices holding 2^25 values a checkpoint gets spectra, one value more does not, whatever the
    dtype; vectors do not count. The shapes are set on the scanned run (reading 134 MB would test
    nothing more: the rule looks at shapes only)."""
    from dataclasses import replace

    from wdiff.api import SPECTRUM_AUTO_ELEMENTS, spectrum_by_default

    rng = np.random.default_rng(0)
    seq = [
        {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(5)} for _ in range(2)
    ]
    run = wdiff.scan(trainer_run(tmp_path / "run", seq, [1, 2]))
    assert spectrum_by_default(run)

    def sized(rows: int, cols: int, vector: int, dtype: str) -> wdiff.Run:
        shapes = {"w": (rows, cols), "b": (vector,)}
        tensors = tuple(
            replace(
                t,
                shape=shapes[t.name],
                refs=tuple(replace(r, shape=shapes[t.name], dtype=dtype) for r in t.refs),
            )
            for t in run.tensors
        )
        return replace(run, tensors=tensors)

    assert SPECTRUM_AUTO_ELEMENTS == 1 << 25
    for dtype in ("F32", "BF16"):
        assert spectrum_by_default(sized(1 << 13, 1 << 12, 10**9, dtype))  # 2^25 values, a huge vector
        assert not spectrum_by_default(sized(1 << 13, (1 << 12) + 1, 1, dtype))
