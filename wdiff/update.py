"""What a run will do to OUT, decided before anything is read: ``plan_update``.

A full computation, an extension of earlier results (the accumulated map is a sum, so K checkpoints'
results extend to K + n exactly), or nothing new ("up to date": only the pictures are drawn again).
Earlier results are read through ``wdiff.schema``; anything that does not fit means a full recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wdiff import __version__, checks
from wdiff.checks import MAP_AUTO, NO_MAP
from wdiff.detail import Grid, earlier_frames, frame_budget_for, plan_grids, read_pooled
from wdiff.errors import WdiffError
from wdiff.schema import (
    ACCUMULATED,
    FRAMES,
    MAP_DTYPES,
    NEURON_CHANGE,
    POOLED,
    SUMMARY,
    Summary,
    map_stored,
    read_summary,
)
from wdiff.sequence import Run

if TYPE_CHECKING:
    import numpy as np

    from wdiff.compute import Previous
    from wdiff.scene.options import SceneOptions


@dataclass(frozen=True)
class Plan:
    """One update of OUT: the run, what of it OUT already holds, and the film's grids."""

    run: Run
    fingerprints: list[str]
    chunk_elements: int
    previous: Previous | None  # earlier results this update extends (None: a full computation)
    update: str  # "full", "incremental from K" or "up to date"
    frame_grids: dict[str, Grid]  # {} without frames
    old_frames: dict[str, np.ndarray] | None  # the earlier frames an incremental update extends
    map_dtypes: dict[str, str] | None  # how each tensor's accumulated map is stored (None: not stored)
    map_dtype: str  # the same as one of checks.MAP_DTYPE_CHOICES
    map_choice: str  # what was asked for it (summary["map_choice"]: chosen_map_dtype)


def plan_update(
    out: Path,
    run: Run,
    fingerprints: list[str],
    chunk_elements: int,
    scene: SceneOptions,
    *,
    incremental: bool,
    extend_only: bool,
    intervals: int | None = None,
    map_dtype: str = "float32",
) -> Plan:
    """What this run does to ``out``; ``extend_only`` refuses anything but an extension (``watch``).
    ``intervals``: the film's grids are those of a run of that many intervals (a run committed in parts
    keeps the grids of the whole, so that each part extends the one before). ``map_dtype``: how the
    accumulated map is stored (``map_dtypes``), or "auto" (``chosen_map_dtype``)."""
    old = earlier_summary(out) if incremental or map_dtype == MAP_AUTO else None
    choice, stored = chosen_map_dtype(old, run, map_dtype)
    dtypes = map_dtypes(run, stored)
    previous, update = None, "full"
    if incremental:
        previous, update = previous_results(out, old, run, fingerprints, chunk_elements, dtypes)
    shapes = [(t.name, t.shape) for t in run.tensors]
    if update == "up to date" and dtypes is None and not pooled_fits(out, shapes, scene):
        previous, update = None, "full"  # no map to pool again for another budget or pool kind
    budget = frame_budget_for(scene.frame_points, intervals or len(run.checkpoints) - 1, len(shapes))
    frame_grids = cell_grids(shapes, budget, scene.pool) if scene.frames else {}  # pooled like the scene
    old_frames = None
    if scene.frames and previous is not None:
        old_frames = earlier_frames(out / FRAMES, previous.known, frame_grids, scene.pool)
        if old_frames is None:  # earlier results without these frames: recompute them all
            previous, update = None, "full"
    if extend_only and previous is None:
        raise WdiffError(out, "these results cannot be extended (other checkpoints, tensors or setup)")
    return Plan(run, fingerprints, chunk_elements, previous, update, frame_grids, old_frames,
                dtypes, stored, choice)  # fmt: skip


def pooled_fits(out: Path, shapes: list[tuple[str, tuple[int, ...]]], scene: SceneOptions) -> bool:
    """Whether the cells in ``out``'s pooled.safetensors are the ones this scene draws (the same
    blocks and pool kind for every non-empty tensor): results without a map have nothing else to draw
    from (``wdiff.scene.accumulated.PooledCells``)."""
    cells = read_pooled(out / POOLED)
    for name, grid in cell_grids(shapes, scene.max_points, scene.pool).items():
        found = cells.get(name)
        if found is None or found[1] != tuple(grid.block) or found[2] != scene.pool:
            return False
    return True


# The default (``map_dtype="auto"``) stores the float32 map up to this many bytes (536 million weights)
# and none above: the map is 4 bytes a weight, whatever the checkpoints' dtype, so a 1B model's run
# writes 4.9 GB and a 7B model's 28 GB, which cost more than the rest of the compute (docs/performance.md).
MAP_AUTO_BYTES = 2 << 30


def chosen_map_dtype(old: Summary | None, run: Run, choice: str) -> tuple[str, str]:
    """What was asked for the map (``summary["map_choice"]``) and how it is stored, for ``choice``
    and the earlier results ``old`` in OUT (None: none that can be read).

    ``choice`` itself, or for ``"auto"`` (the default): the storage that was asked for a map
    (float32 or BF16) in earlier results of these same tensors, inherited (the default never drops a
    map somebody asked for, nor one a later run could extend; the parts of a run committed in parts
    store float32 before the last whatever was asked); otherwise float32 when the map takes at most
    ``MAP_AUTO_BYTES`` in float32, ``"none"`` above. A map that "auto" chose is not kept for that.
    """
    if choice != MAP_AUTO:
        return choice, choice
    if old is not None and list(old["tensors"]) == [t.name for t in run.tensors]:
        asked = old.get("map_choice", old.get("map_dtype", "float32"))  # before the keys: float32 or BF16
        if asked not in (MAP_AUTO, NO_MAP):
            return asked, asked
    return MAP_AUTO, "float32" if map_bytes(run) <= MAP_AUTO_BYTES else NO_MAP


def earlier_summary(out: Path) -> Summary | None:
    """The summary of the results in ``out`` (``wdiff.schema.read_summary``), or None when there are
    none or they cannot be read: either way, nothing to extend or keep."""
    try:
        return read_summary(out / SUMMARY)
    except (OSError, ValueError, WdiffError):
        return None


def map_bytes(run: Run) -> int:
    """The bytes of ``run``'s accumulated map in float32."""
    return MAP_DTYPES["F32"] * sum(t.numel for t in run.tensors)


def map_dtypes(run: Run, choice: str = "float32") -> dict[str, str] | None:
    """How each tensor's accumulated map is stored: ``"float32"`` (the default), ``"bfloat16"``, or not
    at all (``"none"``: None).

    The map is summed in float32 either way, and every metric, row sum, cell and frame is taken from
    that sum; a BF16 map is only stored rounded, to the nearest (relative error at most 2^-8, 0.39%),
    which halves the bytes written (docs/performance.md). A BF16 map is never extended: adding
    intervals to a rounded sum again and again drifts (1,000 one-checkpoint extensions would leave
    sums 27% low, as small changes fall below half a BF16 step of a large sum), so results stored in
    BF16 are recomputed in full when the run grows (``previous_results``). Without a map (``"none"``,
    for runs whose map would not fit the disk or the time: a 7B model's is 28 GB in float32) every
    other result is the same; what needs the per-weight values then cannot be had: extending the run
    (it is recomputed), ``Results.accumulated``, and a scene at another budget or pooling."""
    if choice == NO_MAP:
        return None
    dtype = {"float32": "F32", "bfloat16": "BF16"}[choice]
    return {t.name: dtype for t in run.tensors}


def cell_grids(shapes: list[tuple[str, tuple[int, ...]]], max_points: int, pool: str) -> dict[str, Grid]:
    """``wdiff.detail.plan_grids``, a budget too small for the tensors named as the ``max_points``
    parameter it comes from."""
    try:
        return plan_grids(shapes, max_points, pool)
    except ValueError as e:  # the budget cannot give every tensor a point
        raise checks.OptionError("max_points", f"{max_points}: {e}") from None


def previous_results(
    out: Path,
    old: Summary | None,
    run: Run,
    fingerprints: list[str],
    chunk_elements: int,
    dtypes: dict[str, str] | None,
) -> tuple[Previous | None, str]:
    """Earlier results in ``out`` (``old``: their summary, ``earlier_summary``) that this run extends,
    and what kind of update this is.

    Extending is exact (the same bits as a full run) when the earlier run saw the same first K
    checkpoints, unchanged, computed the same tensors with the same chunking, the same selection
    (``same_selection``) and the same wdiff, and stored its map in float32 (a BF16 map, rounded, is
    never extended, nor are results without a map: ``map_dtypes``). Results of every checkpoint are
    "up to date" when their maps are stored as ``dtypes`` asks (None: not stored).
    Anything else, an earlier checkpoint rewritten or removed or a summary that is not wdiff's
    (``wdiff.schema.read_summary``) included, means a full recompute.
    """
    from wdiff.compute import Previous
    from wdiff.readers.safetensors import read_header

    if old is None:
        return None, "full"
    try:
        refs = read_header(out / ACCUMULATED)[0] if map_stored(old) else None
    except (OSError, ValueError, WdiffError):
        return None, "full"
    seen = old["checkpoints"]
    known = len(seen)
    same_start = known <= len(run.checkpoints) and all(
        o.get("path") == c.path and o.get("step") == c.step and o.get("fingerprint") == f
        for o, c, f in zip(seen, run.checkpoints, fingerprints)
    )
    tensors: dict[str, Any] = old["tensors"]
    same_tensors = list(tensors) == [t.name for t in run.tensors] and all(
        tensors[t.name]["shape"] == list(t.shape)
        and (
            refs is None
            or (t.name in refs and refs[t.name].dtype in MAP_DTYPES and refs[t.name].shape == t.shape)
        )
        for t in run.tensors
    )
    same_setup = (
        same_selection(old, run)
        and old.get("wdiff_version") == __version__
        and (old.get("timing") or {}).get("chunk_elements") == chunk_elements
        and (out / NEURON_CHANGE).is_file()
        and all("interval_l1" in entry and "distance_l2" in entry for entry in tensors.values())
    )
    if not (same_start and same_tensors and same_setup):
        return None, "full"
    stored = {n: r.dtype for n, r in refs.items()} if refs is not None else None
    have = [stored[t.name] for t in run.tensors] if stored is not None else None  # None: no map
    wanted = [dtypes[t.name] for t in run.tensors] if dtypes is not None else None
    if known == len(run.checkpoints):  # kept as they are: when stored as asked
        usable = have == wanted
    else:  # summed on: only exact sums
        usable = have is not None and all(d == "F32" for d in have)
    if not usable:
        return None, "full"
    offsets = {n: r.offset for n, r in refs.items()} if refs is not None else {}
    previous = Previous(str(out / ACCUMULATED), offsets, known, tensors, stored or {})
    return previous, ("up to date" if known == len(run.checkpoints) else f"incremental from {known}")


def same_selection(old: dict[str, Any], run: Run) -> bool:
    """Whether earlier results were computed with the selection of ``run`` (``wdiff.select``; results
    without a record were computed over everything). Results of another selection are recomputed in
    full, never mixed, even where the checkpoints and tensors would happen to line up."""
    from wdiff.select import Selection

    return Selection.from_record(old.get("selection")) == (run.selection or Selection())
