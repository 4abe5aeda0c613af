"""The results schema: the names of the results files and the shape of ``summary.json``, typed
(``Summary`` and its entries), versioned (``SUMMARY_SCHEMA``), and the one place that writes it and
reads it back:

- written: ``build_summary`` (``wdiff.api``) from the entries built here, ``tensor_entry``
  (``wdiff.compute.aggregate``), ``spectrum_entry`` (``wdiff.spectrum``) and ``scene_entry``
  (``wdiff.scene.outputs``);
- read: ``read_summary`` (the incremental path and ``watch``), ``read_results`` (``Results.load``, and
  through it ``report``, ``compare``, ``view``, the exports); both check with ``check_summary``.

``read_results(OUT)`` accepts a folder only when it is wdiff's results (its marker, or results of a
wdiff from before the marker: ``wdiff.marker``), reads only regular files directly inside it (a
symlink is never followed), checks every field the readers use for its type and length, and checks
``accumulated.safetensors`` and ``rows.safetensors`` (the per-neuron change) hold each tensor with
the summary's shape. Every problem is one ``WdiffError`` line naming the file and the field. What
passes can be analysed, reported and drawn without a ``KeyError`` or ``TypeError``. An incremental
update extends only results of the same ``wdiff_version``.

This module imports nothing of compute, the readers' formats or the scene, so that everything that
reads results (``wdiff.results`` first) can import it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from wdiff import __version__
from wdiff.checks import MAP_DTYPE_CHOICES, MAP_DTYPE_OPTIONS, NO_MAP
from wdiff.errors import WdiffError
from wdiff.marker import contents, read_small, regular_file
from wdiff.readers.remote import is_url
from wdiff.select import Selection, check_record

if TYPE_CHECKING:
    from wdiff.sequence import Checkpoint, Run

# --- the results files (a folder OUT holds these; docs/formats.md describes each) ------------------------

ACCUMULATED = "accumulated.safetensors"
SUMMARY = "summary.json"
POINTS = "points.ply"
POOLED = "pooled.safetensors"  # the scene's cells, pooled during compute (see wdiff.detail)
RENDER = "render.png"
#: per tensor: the per-neuron change, its accumulated map summed over each row (float64, shape[0]
#: values); the file keeps the name it has had since the first results
NEURON_CHANGE = "rows.safetensors"
FRAMES = "frames.safetensors"  # per tensor: each interval's |dW| pooled into cells (intervals x cells)
MAP_DTYPES = {"F32": 4, "BF16": 2}  # how the accumulated map may be stored, and the bytes per value

MAX_SUMMARY_BYTES = 1 << 30
MAX_INT = 2**63
POOLS = ("max", "mean")
COLOR_SCALES = ("log", "linear")
NORMALIZE = ("global", "tensor", "relative")


class _Bad(Exception):
    """A field that does not fit: where it is and what was expected."""

    def __init__(self, where: str, expected: str) -> None:
        super().__init__(f"{where}: expected {expected}")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(value: Any, where: str, low: int = -MAX_INT) -> int:
    if type(value) is not int or not low <= value < MAX_INT:
        raise _Bad(where, f"an integer >= {low}" if low > -MAX_INT else "an integer")
    return value


def _number(value: Any, where: str, null: bool = True) -> float | None:
    """A finite number (wdiff writes NaN and Infinity as null)."""
    if value is None and null:
        return None
    if type(value) is int and abs(value) < MAX_INT:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise _Bad(where, "a finite number or null" if null else "a finite number")


def _list(value: Any, where: str, length: int | None = None, at_most: int | None = None) -> list:
    if not isinstance(value, list):
        raise _Bad(where, "a list")
    if length is not None and len(value) != length:
        raise _Bad(where, f"a list of {length} values, got {len(value)}")
    if at_most is not None and len(value) > at_most:
        raise _Bad(where, f"a list of at most {at_most} values, got {len(value)}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(where, "an object")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(where, "a string")
    return value


def _numbers(value: Any, where: str, length: int) -> None:
    for i, v in enumerate(_list(value, where, length)):
        _number(v, f"{where}[{i}]")


def _tensor(name: str, t: Any, checkpoints: int) -> None:
    where = f"tensors[{json.dumps(_cut(name))}]"
    t = _object(t, where)
    required = ("shape", "dtype", "numel", "accumulated_l1", "net_l2", "relative_change", "interval_l2", "l2")
    for key in (*required, "rotation", "nonfinite"):
        if key not in t:
            raise _Bad(f"{where}.{key}", "a value (it is missing)")
    shape = _list(t["shape"], f"{where}.shape", at_most=64)
    for i, size in enumerate(shape):
        _int(size, f"{where}.shape[{i}]", 0)
    dtype = t["dtype"]
    if not (
        isinstance(dtype, str)
        or (isinstance(dtype, list) and dtype and all(isinstance(d, str) for d in dtype))
    ):
        raise _Bad(f"{where}.dtype", "a dtype name or a list of them")
    if _int(t["numel"], f"{where}.numel", 0) != math.prod(shape):
        raise _Bad(f"{where}.numel", f"the product of the shape, {math.prod(shape)}")
    for key in ("accumulated_l1", "net_l2", "relative_change", "accumulated_max"):
        _number(t.get(key), f"{where}.{key}")
    _numbers(t["interval_l2"], f"{where}.interval_l2", checkpoints - 1)
    if "interval_l1" in t:
        _numbers(t["interval_l1"], f"{where}.interval_l1", checkpoints - 1)
    if "distance_last_l2" in t:
        _numbers(t["distance_last_l2"], f"{where}.distance_last_l2", checkpoints)
    _numbers(t["l2"], f"{where}.l2", checkpoints)
    for i, v in enumerate(_list(t["rotation"], f"{where}.rotation", at_most=checkpoints)):
        _number(v, f"{where}.rotation[{i}]")
    for i, v in enumerate(_list(t["nonfinite"], f"{where}.nonfinite", checkpoints)):
        _int(v, f"{where}.nonfinite[{i}]", 0)
    if "update_spectrum" in t:
        _spectrum(_object(t["update_spectrum"], f"{where}.update_spectrum"), f"{where}.update_spectrum")
    if "aliases" in t and not all(isinstance(a, str) for a in _list(t["aliases"], f"{where}.aliases")):
        raise _Bad(f"{where}.aliases", "a list of tensor names")


def _spectrum(s: dict, where: str) -> None:
    """An ``update_spectrum`` entry (``wdiff.spectrum.spectrum_entry``), and its ``lora`` part."""
    _int(s.get("k"), f"{where}.k", 0)
    values = _list(s.get("singular_values"), f"{where}.singular_values")
    for i, v in enumerate(values):
        _number(v, f"{where}.singular_values[{i}]", null=False)
    _number(s.get("effective_rank"), f"{where}.effective_rank")
    _number(s.get("energy_captured"), f"{where}.energy_captured")
    _ranks(s.get("rank_for_energy"), f"{where}.rank_for_energy")
    if s.get("lora"):
        lora = _object(s["lora"], f"{where}.lora")
        _int(lora.get("r"), f"{where}.lora.r", 0)
        _int(lora.get("rank_used"), f"{where}.lora.rank_used", 0)
        if "rank_for_energy" in lora:  # older results: the rank used only
            _ranks(lora["rank_for_energy"], f"{where}.lora.rank_for_energy")


def _ranks(value: Any, where: str) -> None:
    """A ``rank_for_energy`` object: energy fraction -> rank (null: more than the values kept)."""
    for key, r in _object(value, where).items():
        if r is not None:
            _int(r, f"{where}.{_cut(key, 10)}", 0)


def _trainer_state(state: Any) -> None:
    if state is None:
        return
    state = _object(state, "trainer_state")
    history = state.get("log_history")
    if history is None:
        return
    for i, entry in enumerate(_list(history, "trainer_state.log_history")):
        entry = _object(entry, f"trainer_state.log_history[{i}]")
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _number(value, f"trainer_state.log_history[{i}].{_cut(key, 40)}")


def _scene(scene: Any) -> None:
    if scene is None:
        return
    scene = _object(scene, "scene")
    if "max_points" in scene:
        _int(scene["max_points"], "scene.max_points", 1)
    for key, allowed in (("pool", POOLS), ("color_scale", COLOR_SCALES), ("normalize", NORMALIZE)):
        if key in scene and scene[key] not in allowed:
            raise _Bad(f"scene.{key}", " or ".join(allowed))


# --- what summary.json holds, typed (docs/metrics.md gives each number's formula) -----------------------


class CheckpointEntry(TypedDict, total=False):
    path: str  # the checkpoint file or folder as scanned (a URL for remote inputs)
    step: int | None  # the training step (None: unknown, the order given)
    tensors: int  # tensors read from it
    fingerprint: str  # names, sizes and modification times (and tags): what the incremental path compares
    state_key: str  # a torch file whose weights were under this key ({"model": ...})
    url: str  # remote inputs: the object's URL, the Hub revision and its commit
    revision: str
    commit: str
    objects: dict[str, dict[str, Any]]  # remote inputs: URL -> {"size", "tag"}


class LoraSpectrum(TypedDict):
    r: int  # the adapter's rank
    rank_used: int  # the rank B(T) A(T) has
    rank_for_energy: dict[str, int | None]  # of B(T) A(T): what the adapter's weight holds


class UpdateSpectrum(TypedDict, total=False):
    """A 2-D tensor's ``update_spectrum``: the singular values of W(T) - W(0) (``wdiff.spectrum``)."""

    method: str  # "exact", "randomized" or "lora"
    k: int  # how many singular values are trusted and kept
    complete: bool  # every singular value (then the effective rank and every rank for energy are exact)
    singular_values: list[float]  # descending, at most k
    effective_rank: float | None
    energy_captured: float | None  # of ||W(T) - W(0)||_F^2, by the values kept
    rank_for_energy: dict[str, int | None]  # "0.9" -> the rank holding 90% (None: more than k)
    note: str  # why there is no spectrum (a zero update, NaN or Inf)
    lora: LoraSpectrum


def update_spectrum(
    *,
    method: str,
    k: int,
    complete: bool,
    singular_values: list[float],
    effective_rank: float | None,
    energy_captured: float | None,
    rank_for_energy: dict[str, int | None],
    note: str | None = None,
) -> UpdateSpectrum:
    """An ``update_spectrum`` entry, its keys in the order summary.json has them."""
    entry: UpdateSpectrum = {
        "method": method,
        "k": k,
        "complete": complete,
        "singular_values": singular_values,
        "effective_rank": effective_rank,
        "energy_captured": energy_captured,
        "rank_for_energy": rank_for_energy,
    }
    if note is not None:
        entry["note"] = note
    return entry


class TensorEntry(TypedDict, total=False):
    shape: list[int]
    dtype: str | list[str]  # one dtype, or one per checkpoint when it changed along the run
    numel: int
    accumulated_l1: float | None  # sum of the accumulated map: sum_t ||W(t+1) - W(t)||_1
    accumulated_max: float | None
    net_l2: float | None  # ||W(T) - W(0)||
    relative_change: float | None  # net_l2 / ||W(0)||
    interval_l2: list[float | None]  # ||W(t+1) - W(t)|| per interval (K - 1)
    interval_l1: list[float | None]
    l2: list[float | None]  # ||W(t)|| per checkpoint (K)
    distance_l2: list[float | None]  # ||W(t) - W(0)|| per checkpoint (K)
    distance_last_l2: list[float | None]  # ||W(t) - W(T)|| per checkpoint (K)
    rotation: list[float | None]
    nonfinite: list[int]  # NaN/Inf elements per checkpoint
    aliases: list[str]  # the other names of a tied weight
    update_spectrum: UpdateSpectrum  # 2-D tensors (wdiff.spectrum)


def tensor_entry(
    *,
    shape: list[int],
    dtypes: list[str],
    numel: int,
    accumulated_l1: float,
    accumulated_max: float,
    net_l2: float,
    relative_change: float | None,
    interval_l1: list[float | None],
    interval_l2: list[float | None],
    l2: list[float | None],
    rotation: list[float | None],
    distance_l2: list[float | None],
    distance_last_l2: list[float | None],
    nonfinite: list[int],
) -> TensorEntry:
    """One tensor's entry of ``summary["tensors"]`` from its metrics (``wdiff.compute.aggregate``), its
    keys in the order summary.json has them: ``dtype`` is the one dtype of ``dtypes``, or the list when
    it changed along the run. ``update_spectrum`` and ``aliases`` are added later
    (``wdiff.api.add_spectra``, ``build_summary``)."""
    return {
        "shape": shape,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "numel": numel,
        "accumulated_l1": accumulated_l1,
        "accumulated_max": accumulated_max,
        "net_l2": net_l2,
        "relative_change": relative_change,
        "interval_l1": interval_l1,
        "interval_l2": interval_l2,
        "l2": l2,
        "rotation": rotation,
        "distance_l2": distance_l2,
        "distance_last_l2": distance_last_l2,
        "nonfinite": nonfinite,
    }


class Timing(TypedDict, total=False):
    read_bytes: int  # checkpoint bytes read by compute
    compute_seconds: float
    chunks: int
    chunk_elements: int
    scheduler: str
    spectrum_seconds: float
    total_seconds: float  # added last, once the pictures and the report are written


class Summary(TypedDict, total=False):
    schema: int  # SUMMARY_SCHEMA; missing in the first results: 1
    wdiff_version: str
    created: str  # ISO 8601, UTC
    source: str  # the input as given
    checkpoints: list[CheckpointEntry]  # in sequence order
    tensors: dict[str, TensorEntry]  # network order
    skipped: list[dict[str, str]]  # {"name", "reason"}: tensors not computed
    left_out: list[dict[str, str]]  # {"path", "reason"}: checkpoints not in the sequence
    warnings: list[dict[str, str]]
    timing: Timing
    update: str  # "full", "incremental from K", "up to date"
    trainer_state: dict[str, Any] | None  # the last checkpoint's trainer_state.json, its log
    matching: dict[str, int]  # ONNX: initializers matched by name, by position
    selection: dict[str, Any]  # wdiff.select: what the run was chosen to read
    scene: SceneEntry  # what the pictures show (wdiff.scene.outputs)
    map_dtype: str  # how accumulated.safetensors stores the map: "float32", "bfloat16" or NO_MAP (none)
    map_choice: str  # what was asked: one of MAP_DTYPE_OPTIONS ("auto": chosen by size)


class SceneEntry(TypedDict):
    points: int  # points in points.ply
    max_points: int  # the budget
    pool_factor: int  # elements per point (1: none pooled)
    pool: str  # POOLS
    color_scale: str  # COLOR_SCALES
    normalize: str  # NORMALIZE
    color_range: list[float]  # [vmin, vmax] of the colour scale
    blocks: list[str]  # the blocks' labels, in the order they are laid out
    files: list[str]  # what the scene wrote: points.ply, render*.png, mesh.ply, frames, scene.html


def scene_entry(
    *,
    points: int,
    max_points: int,
    pool_factor: int,
    pool: str,
    color_scale: str,
    normalize: str,
    color_range: list[float],
    blocks: list[str],
    files: list[str],
) -> SceneEntry:
    """``summary["scene"]``, its keys in the order summary.json has them (``wdiff.scene.outputs``)."""
    return {
        "points": points,
        "max_points": max_points,
        "pool_factor": pool_factor,
        "pool": pool,
        "color_scale": color_scale,
        "normalize": normalize,
        "color_range": color_range,
        "blocks": blocks,
        "files": files,
    }


SUMMARY_SCHEMA = 1  # summary.json's "schema": raised when a key changes meaning or a required one is added
#: findings.json: 1 was a bare JSON list of findings (no key to say so); 2 is ``{"schema": 2,
#: "findings": [...]}``. Readers take both (``findings_entries``).
FINDINGS_SCHEMA = 2
COMPARE_SCHEMA = 1  # compare.json's "schema"
JSON_SCHEMA = 1  # the "schema" of what ``wdiff run/report/compare --json`` print on stdout


def findings_entries(data: Any, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The findings of a parsed ``findings.json`` (``path``, for the message): a list (schema 1) or
    ``{"schema": N, "findings": [...]}`` with N at most ``FINDINGS_SCHEMA``; each finding an object with
    a string ``kind``, ``tensor`` and ``message``. Else one ``WdiffError`` line naming the file."""
    try:
        if isinstance(data, dict):
            if "schema" not in data or "findings" not in data:
                raise _Bad("findings.json", 'a list of findings or an object with "schema" and "findings"')
            if _int(data["schema"], "schema", 1) > FINDINGS_SCHEMA:
                raise _Bad(
                    "schema", f"at most {FINDINGS_SCHEMA} (it was written by a newer wdiff: update wdiff)"
                )
            data = data["findings"]
        entries = _list(data, "findings")
        for i, entry in enumerate(entries):
            entry = _object(entry, f"findings[{i}]")
            for key in ("kind", "tensor", "message"):
                _str(entry.get(key), f"findings[{i}].{key}")
            for j, pair in enumerate(_list(entry.get("rows") or [], f"findings[{i}].rows")):
                for k, row in enumerate(_list(pair, f"findings[{i}].rows[{j}]", 2)):
                    _int(row, f"findings[{i}].rows[{j}][{k}]", 0)
            for j, step in enumerate(_list(entry.get("steps") or [], f"findings[{i}].steps")):
                _int(step, f"findings[{i}].steps[{j}]")
    except _Bad as e:
        raise WdiffError(path, f"not wdiff's findings: {e}") from None
    return entries


def check_summary(summary: Any) -> Summary:
    """``summary`` when it has the shape wdiff writes; else ``ValueError("field: expected ...")``. A
    summary of a later schema (a newer wdiff) is refused; one without ``schema`` is of the first."""
    try:
        s = _object(summary, "the summary")
        if "schema" in s and _int(s["schema"], "schema", 1) > SUMMARY_SCHEMA:
            raise _Bad("schema", f"at most {SUMMARY_SCHEMA} (it was written by a newer wdiff: update wdiff)")
        if "checkpoints" not in s or "tensors" not in s:
            raise _Bad("the summary", 'an object with "checkpoints" and "tensors"')
        checkpoints = _list(s["checkpoints"], "checkpoints")
        if len(checkpoints) < 2:
            raise _Bad("checkpoints", "at least two checkpoints")
        for i, c in enumerate(checkpoints):
            c = _object(c, f"checkpoints[{i}]")
            if c.get("step") is not None:
                _int(c["step"], f"checkpoints[{i}].step")
            if "path" in c:
                _str(c["path"], f"checkpoints[{i}].path")
        tensors = _object(s["tensors"], "tensors")
        if not tensors:
            raise _Bad("tensors", "at least one tensor")
        for name, t in tensors.items():
            _tensor(name, t, len(checkpoints))
        for key in ("wdiff_version", "source", "created", "update"):
            if key in s:
                _str(s[key], key)
        if s.get("map_dtype", "float32") not in MAP_DTYPE_CHOICES:  # older results have none: stored
            raise _Bad("map_dtype", f"one of {', '.join(MAP_DTYPE_CHOICES)}")
        if s.get("map_choice", "float32") not in MAP_DTYPE_OPTIONS:  # older results: float32 asked
            raise _Bad("map_choice", f"one of {', '.join(MAP_DTYPE_OPTIONS)}")
        for key in ("skipped", "left_out", "warnings"):
            if key in s:
                _list(s[key], key)
        timing = _object(s.get("timing") or {}, "timing")
        for key in ("read_bytes", "compute_seconds", "total_seconds"):
            if key in timing:
                _number(timing[key], f"timing.{key}", null=False)
        _trainer_state(s.get("trainer_state"))
        _scene(s.get("scene"))
        if s.get("selection") is not None:  # older results have none: they were over everything
            check_record(s["selection"])
    except _Bad as e:
        raise ValueError(str(e)) from None
    return s


class Computed(Protocol):
    """What ``build_summary`` takes of ``wdiff.compute.ComputeResult``."""

    tensors: dict[str, TensorEntry]
    read_bytes: int
    compute_seconds: float
    chunks: int


def build_summary(
    run: Run,
    fingerprints: list[str],
    result: Computed,
    *,
    update: str,
    chunk_elements: int,
    scheduler: str,
    spectrum_seconds: float | None = None,
    map_dtype: str = "float32",
    map_choice: str | None = None,
) -> Summary:
    """``summary.json`` of a run (without its "scene" and ``timing.total_seconds``, which the caller adds
    once the pictures are drawn): the checkpoints as scanned, the metrics compute aggregated (tied
    weights reported once, with every name), what was left out and why, the timing, the update kind.
    Each 2-D tensor's ``update_spectrum`` (``wdiff.spectrum``) is in its entry of ``result.tensors``
    when it was computed; ``spectrum_seconds`` is the time that took (None: not computed);
    ``map_dtype`` how the accumulated map is stored ("none": not at all, ``NO_MAP``), ``map_choice``
    what was asked for it ("auto": ``wdiff.update.chosen_map_dtype``; None: ``map_dtype``)."""
    for name, others in run.aliases.items():  # tied weights: reported once, with every name
        if name in result.tensors:
            result.tensors[name]["aliases"] = others
    summary: Summary = {
        "schema": SUMMARY_SCHEMA,
        "wdiff_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": run.source,
        "checkpoints": [
            {"path": c.path, "step": c.step, "tensors": len(c.tensors), "fingerprint": f}
            | ({"state_key": c.state_key} if c.state_key is not None else {})
            | (c.origin or {})
            | remote_objects(c)
            for c, f in zip(run.checkpoints, fingerprints)
        ],
        "tensors": result.tensors,
        "skipped": [{"name": s.name, "reason": s.reason} for s in run.skipped],
        "left_out": [{"path": s.name, "reason": s.reason} for s in run.left_out],
        "warnings": [{"path": s.name, "reason": s.reason} for s in run.warnings],
        "timing": {
            "read_bytes": result.read_bytes,
            "compute_seconds": result.compute_seconds,
            "chunks": result.chunks,
            "chunk_elements": chunk_elements,
            "scheduler": scheduler,
        }
        | ({"spectrum_seconds": spectrum_seconds} if spectrum_seconds is not None else {}),
        "update": update,
        "trainer_state": trainer_summary(run.trainer_state),
        "map_dtype": map_dtype,
        "map_choice": map_choice or map_dtype,
    }
    if run.matching is not None:  # ONNX: which initializers were matched by name, which by position
        summary["matching"] = run.matching
    summary["selection"] = selection_record(run)
    return summary


def selection_record(run: Run) -> dict[str, Any]:
    """``summary["selection"]``: what the run was chosen to read (``wdiff.select``) and, under
    ``"of"``, how many checkpoints were found and tensors assembled before that choice."""
    record = (run.selection or Selection()).record()
    return record | ({"of": dict(run.selected_from)} if run.selected_from else {})


def remote_objects(checkpoint: Checkpoint) -> dict[str, Any]:
    """``{"objects": {URL: {"size", "tag"}}}`` for a checkpoint read from a remote store: exactly which
    objects were read (the tag is the store's identity of each: an ETag, ``sha256:`` of a Hub LFS file
    or ``blob_id:`` of a small one); nothing for a local checkpoint."""
    found = {p: {"size": i.size, "tag": i.tag} for p, i in checkpoint.files.items() if is_url(p)}
    return {"objects": found} if found else {}


def trainer_summary(state: dict | None) -> dict | None:
    """What summary.json keeps of ``trainer_state.json``: the run's length and its training log."""
    if state is None:
        return None
    keep = ("global_step", "max_steps", "epoch", "num_train_epochs", "save_steps", "logging_steps")
    out: dict[str, Any] = {k: state[k] for k in keep if k in state}
    history = state.get("log_history")
    entries = [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []
    out["log_history"] = [{k: log_value(v) for k, v in e.items()} for e in entries]
    return out


def log_value(value: Any) -> Any:
    """A training-log value as summary.json keeps it: text and flags as they are, numbers that are
    not finite or too big for a float as null (the trainer writes bare NaN), anything else as null."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def read_summary(path: Path) -> Summary:
    """``summary.json`` at ``path``, checked (``check_summary``); a ``WdiffError`` line naming the file
    and the field when it cannot be read or is not what wdiff writes."""
    try:
        return check_summary(json.loads(read_small(path, MAX_SUMMARY_BYTES)))
    except OSError as e:
        raise WdiffError(path, f"cannot read: {e.strerror or e}") from None
    except RecursionError:
        raise WdiffError(path, "not wdiff's summary: nested too deep") from None
    except ValueError as e:  # not JSON (UnicodeDecodeError and JSONDecodeError included), or not its shape
        raise WdiffError(path, f"not wdiff's summary: {e}") from None


def map_stored(summary: Summary) -> bool:
    """Whether the run stored its accumulated map (not ``--map-dtype none``; results from before the
    choice existed always did)."""
    return summary.get("map_dtype") != NO_MAP


def float32_map_bytes(summary: Summary) -> int:
    """The bytes the run's accumulated map takes (or would take) in float32."""
    return MAP_DTYPES["F32"] * sum(t["numel"] for t in summary["tensors"].values())


def stored_shapes(summary: Summary) -> dict[str, list[int]] | None:
    """The tensors' shapes when the run stored no map, for the scene to be drawn from the cells pooled
    during compute (``wdiff.scene.build_scene``); None when the map is there to be read."""
    return None if map_stored(summary) else {n: t["shape"] for n, t in summary["tensors"].items()}


def _check_maps(folder: Path, summary: Summary) -> None:
    """Every tensor of the summary is in the accumulated map (F32 or BF16, its shape), unless the run
    stored none (``map_stored``), and, when the run wrote the per-neuron change, in ``rows.safetensors``
    (F64, one value per row of the tensor)."""
    from wdiff.readers.safetensors import read_header

    if map_stored(summary):
        path = regular_file(folder, ACCUMULATED)
        if path is None:
            raise WdiffError(
                folder / ACCUMULATED, "missing, or not a regular file: these results are incomplete"
            )
        refs, _ = read_header(path)
        for name, t in summary["tensors"].items():
            ref = refs.get(name)
            if ref is None or ref.dtype not in MAP_DTYPES or list(ref.shape) != t["shape"]:
                what = f"float32/bfloat16 {t['shape']} (summary.json)"
                raise WdiffError(path, f"does not hold tensor {_cut(name)!r} as {what}")
    if not os.path.lexists(folder / NEURON_CHANGE):
        return
    path = regular_file(folder, NEURON_CHANGE)
    if path is None:
        raise WdiffError(folder / NEURON_CHANGE, "not a regular file (a symlink is never followed)")
    rows, _ = read_header(path)
    for name, t in summary["tensors"].items():
        if t["numel"] == 0:
            continue
        ref = rows.get(name)
        expected = [t["shape"][0] if t["shape"] else 1]
        if ref is None or ref.dtype != "F64" or list(ref.shape) != expected:
            raise WdiffError(path, f"does not hold the row sums of {_cut(name)!r} (float64 {expected})")


def read_results(out: str | os.PathLike[str]) -> tuple[Path, Summary]:
    """A results folder and its summary, checked (one-line errors): the folder is wdiff's results (its
    marker, or results from before the marker), its summary has the shape wdiff writes, and its maps
    hold every tensor of the summary (``wdiff.results.Results.load``)."""
    folder = Path(out)
    if not folder.is_dir():
        what = "no such folder" if not os.path.lexists(folder) else "not a folder"
        raise WdiffError(folder, f"no wdiff results here: {what}")
    found = contents(folder)
    if found is None:
        raise WdiffError(
            folder, "not wdiff results: holds files wdiff did not write and no .wdiff-results marker"
        )
    if found.marker is None and not found.ours:
        raise WdiffError(folder, "no summary.json here: not a wdiff results folder (run `wdiff run` first)")
    if found.marker is None and not (folder / SUMMARY).exists():
        raise WdiffError(folder, "results are being replaced (an interrupted run): run wdiff on it again")
    path = regular_file(folder, SUMMARY)
    if path is None:
        raise WdiffError(folder / SUMMARY, "missing, or not a regular file (a symlink is never followed)")
    summary = read_summary(path)
    _check_maps(folder, summary)
    return folder, summary
