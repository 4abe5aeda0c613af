"""Choosing what a run reads: which tensors (by name) and which checkpoints (by step, every Nth).

A :class:`Selection` is parsed and checked in one place (its constructor: a bad pattern, range or
stride is one line naming the parameter) and applied at scan time, so that compute, the spectrum, the
scene and the report never see what was not selected, and its bytes are never read:

- checkpoints are picked from the listing before any of them is opened (``Selection.pick``): those
  in the ``steps`` range, then every ``every``-th of them starting from the first. The last one is
  kept only when it falls on that stride, so that a run that grows gives the same checkpoints as
  before plus new ones (results extend; ``wdiff watch`` picks what a batch run over the final folder
  picks: ``Selection.following``);
- tensors are chosen after the assembly step (``choose_tensors``), on the names ``summary.json``
  shows: ONNX initializers by their matched names, a LoRA module's effective change by its own name
  (its factors are read for it, whether they are selected or not), a tied weight by any of its names
  (kept when one of them is included and none is excluded).

``summary.json`` records the selection (``Selection.record``); results computed with another one are
never extended (``wdiff.update``); results without one were computed over everything.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from wdiff.checks import OptionError

if TYPE_CHECKING:
    from wdiff.assemble import Assembly
    from wdiff.readers.base import TensorRef
    from wdiff.sequence import Checkpoint, Run, Skipped

__all__ = ["Selection", "choose_tensors", "groups", "scan_document", "trimmed"]

MAX_STEP = 1 << 62
MAX_EVERY = 1 << 30


def _patterns(parameter: str, value: object) -> tuple[str, ...]:
    """``value`` (one glob or several) as a tuple of checked globs."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise OptionError(parameter, f"must be a glob pattern or a list of them, got {value!r}")
    found = tuple(value)
    for pattern in found:
        if not isinstance(pattern, str):
            raise OptionError(parameter, f"must be a glob pattern (a string), got {pattern!r}")
        if not pattern.strip():
            raise OptionError(
                parameter, "is an empty pattern: give a glob such as 'model.layers.*.self_attn.*'"
            )
        if not pattern.isprintable():
            raise OptionError(parameter, f"{pattern!r}: a pattern holds no control characters")
        if _unclosed_bracket(pattern):
            raise OptionError(
                parameter, f"{pattern!r}: '[' is not closed by ']' (write [[] for a literal '[')"
            )
    return found


def _unclosed_bracket(pattern: str) -> bool:
    """Whether a ``[`` of ``pattern`` opens a set that no ``]`` closes (fnmatch's own reading of a
    set: ``[!...]`` negates, a ``]`` right after the opening is a member), which fnmatch would
    quietly take as a literal ``[``: almost always a typo in a tensor-name glob."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:
            return True
        i = j + 1
    return False


_STEP = re.compile(r"\s*([0-9]{0,19})\s*")


def _steps(value: object) -> tuple[int | None, int | None] | None:
    """``"A:B"``, ``"A:"``, ``":B"`` or ``(A, B)`` (None for an open side) as ``(A, B)``."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        matched = [_STEP.fullmatch(p) for p in parts]
        if len(parts) != 2 or not all(matched):
            raise OptionError(
                "steps",
                f"must look like A:B (training steps, either side may be empty: 1000:), got {value!r}",
            )
        bounds = [int(m[1]) if m[1] else None for m in matched]  # type: ignore[index]
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        bounds = list(value)
    else:
        raise OptionError(
            "steps", f"must be 'A:B' or a pair (A, B) with None for an open side, got {value!r}"
        )
    for b in bounds:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_STEP):
            raise OptionError(
                "steps", f"bounds must be training steps (integers from 0) or empty, got {value!r}"
            )
    lo, hi = bounds
    if lo is not None and hi is not None and lo > hi:
        raise OptionError("steps", f"{lo}:{hi} is an empty range (the first step is after the last)")
    return (lo, hi)


@dataclass(frozen=True)
class Selection:
    """What a run reads. ``include``/``exclude``: glob patterns (``fnmatch``, case-sensitive, ``*``
    crosses dots) on tensor names as ``summary.json`` names them; a tensor is kept when it matches any
    include (or there is none) and no exclude. ``steps``: an inclusive range of training steps,
    ``"1000:5000"``, ``"1000:"``, ``":5000"`` or a pair with None for an open side. ``every``: every
    Nth of the checkpoints in that range, starting from the first (the last is kept only when it
    falls on the stride). ``Selection()`` selects everything.

    Values are checked (and normalised: one pattern to a tuple, ``"A:B"`` to a pair) on construction;
    a bad one raises :class:`~wdiff.checks.OptionError` naming the parameter."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    steps: tuple[int | None, int | None] | None = None
    every: int = 1

    def __post_init__(self) -> None:
        from wdiff.checks import number

        object.__setattr__(self, "include", _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        object.__setattr__(self, "steps", _steps(self.steps))
        object.__setattr__(self, "every", int(number("every", self.every, 1, MAX_EVERY)))

    # -- what it selects --------------------------------------------------------------------------
    @property
    def all_tensors(self) -> bool:
        return not (self.include or self.exclude)

    @property
    def everything(self) -> bool:
        return self.all_tensors and self.steps is None and self.every == 1

    @functools.cached_property
    def _included(self) -> re.Pattern | None:
        return re.compile("|".join(fnmatch.translate(p) for p in self.include)) if self.include else None

    @functools.cached_property
    def _excluded(self) -> re.Pattern | None:
        return re.compile("|".join(fnmatch.translate(p) for p in self.exclude)) if self.exclude else None

    def keeps(self, names: Sequence[str]) -> bool:
        """Whether a tensor known by ``names`` (its name, then its tied aliases) is selected."""
        inc, exc = self._included, self._excluded
        if inc is not None and not any(inc.match(n) for n in names):
            return False
        return exc is None or not any(exc.match(n) for n in names)

    def in_range(self, step: int) -> bool:
        if self.steps is None:
            return True
        lo, hi = self.steps
        return (lo is None or step >= lo) and (hi is None or step <= hi)

    def pick(self, steps: Sequence[int | None]) -> list[int]:
        """Indices of the checkpoints (of these steps, in sequence order) selected. A step filter
        needs every step known (the caller says which checkpoint has none)."""
        inside = [
            i for i, s in enumerate(steps) if self.steps is None or (s is not None and self.in_range(s))
        ]
        return inside[:: self.every]

    def following(self, steps: Sequence[int], started: bool) -> list[int]:
        """Indices of the checkpoints of a growing run selected among ``steps``, which come after
        the last checkpoint selected so far (``started``) or are the whole listing: what ``pick``
        gives over the run once it holds them all (``wdiff watch``)."""
        inside = [i for i, s in enumerate(steps) if self.in_range(s)]
        return inside[self.every - 1 :: self.every] if started else inside[:: self.every]

    # -- words and records ------------------------------------------------------------------------
    def describe(self) -> str:
        """``include 'a*', exclude 'b*', steps 1000:, every 10``; ``everything`` for none."""
        parts = [f"include {' '.join(repr(p) for p in self.include)}"] if self.include else []
        parts += [f"exclude {' '.join(repr(p) for p in self.exclude)}"] if self.exclude else []
        if self.steps is not None:
            parts.append(f"steps {_span(self.steps)}")
        parts += [f"every {self.every}"] if self.every != 1 else []
        return ", ".join(parts) or "everything"

    def record(self) -> dict[str, Any]:
        """As ``summary.json`` keeps it (``"selection"``)."""
        return {
            "include": list(self.include),
            "exclude": list(self.exclude),
            "steps": None if self.steps is None else list(self.steps),
            "every": self.every,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> Selection:
        """The selection ``summary.json`` recorded (None: results from before selections: all)."""
        if record is None:
            return cls()
        return cls(record["include"], record["exclude"], record["steps"], record["every"])


def check_record(record: Any) -> None:
    """``ValueError("selection...: expected ...")`` unless ``record`` is what ``Selection.record``
    writes (``wdiff.schema``)."""
    if not isinstance(record, dict):
        raise ValueError("selection: expected an object")
    for key in ("include", "exclude", "steps", "every"):
        if key not in record:
            raise ValueError(f"selection.{key}: expected a value (it is missing)")
    for key in ("include", "exclude"):
        if not isinstance(record[key], list):
            raise ValueError(f"selection.{key}: expected a list of patterns")
    if record["steps"] is not None and not isinstance(record["steps"], list):
        raise ValueError("selection.steps: expected null or a list [first, last]")
    try:
        Selection.from_record(record)
    except OptionError as e:
        raise ValueError(f"selection.{e.parameter}: expected a valid value ({e.detail})") from None
    of = record.get("of", {})
    if not isinstance(of, dict) or not all(type(v) is int and 0 <= v < 2**63 for v in of.values()):
        raise ValueError("selection.of: expected an object of counts")


def _span(steps: tuple[int | None, int | None]) -> str:
    lo, hi = steps
    return f"{'' if lo is None else lo}:{'' if hi is None else hi}"


def too_few(selection: Selection, steps: Sequence[int | None], kept: Sequence[int]) -> OptionError:
    """The error of a selection that keeps fewer than two of these checkpoints, naming the parameter
    that did it: ``steps`` when its range holds fewer than two, else ``every``."""
    in_range = Selection(steps=selection.steps).pick(steps)
    chosen = f"step {steps[kept[0]]}" if kept else "none"
    need = "at least two are needed to see change"
    if len(in_range) < 2:
        assert selection.steps is not None
        span = _span(selection.steps)
        return OptionError(
            "steps", f"{span} keeps {len(in_range)} of {len(steps)} checkpoints ({chosen}); {need}"
        )
    where = (
        f"the {len(in_range)} checkpoints in steps {_span(selection.steps)}"
        if selection.steps
        else f"{len(steps)} checkpoints"
    )
    return OptionError("every", f"{selection.every} keeps {len(kept)} of {where} ({chosen}); {need}")


def choose_tensors(
    assembly: Assembly, selection: Selection | None, where: object
) -> tuple[Assembly, list[str]]:
    """The assembled tensors ``selection`` keeps (by name or tied alias), their aliases, what was
    skipped among the selected names; and the include patterns that matched no tensor. Raises an
    ``OptionError`` when it keeps none (naming ``where``, the run's source)."""
    if selection is None or selection.all_tensors:
        return assembly, []
    aliases = assembly.aliases
    kept = tuple(t for t in assembly.tensors if selection.keeps([t.name, *aliases.get(t.name, ())]))
    if not kept:
        example = assembly.tensors[0].name if assembly.tensors else "-"
        included = Selection(include=selection.include)
        if selection.include and not any(
            included.keeps([t.name, *aliases.get(t.name, ())]) for t in assembly.tensors
        ):
            parameter, patterns, verb = "include", selection.include, "matches"
        else:
            parameter, patterns, verb = "exclude", selection.exclude, "leaves"
        raise OptionError(
            parameter,
            f"{' '.join(repr(p) for p in patterns)} {verb} none of the {len(assembly.tensors)} tensors "
            f"of {where} (names look like {example!r}; `wdiff scan` lists them)",
        )
    names = {t.name for t in kept}
    unmatched = [
        p
        for p in selection.include
        if not any(fnmatch.fnmatchcase(n, p) for t in kept for n in (t.name, *aliases.get(t.name, ())))
    ]
    chosen = replace(
        assembly,
        tensors=kept,
        aliases={n: a for n, a in aliases.items() if n in names},
        skipped=tuple(s for s in assembly.skipped if selection.keeps([s.name])),
    )
    return chosen, unmatched


def _leaves(ref: TensorRef) -> list[TensorRef]:
    """The stored tensors a ref reads: itself, or a LoRA product's factors."""
    from wdiff.readers.lora import LoraRef

    return [*_leaves(ref.a), *_leaves(ref.b)] if isinstance(ref, LoraRef) else [ref]


def _storage(ref: TensorRef) -> tuple:
    return (ref.path, ref.offset, ref.nbytes, ref.dtype, ref.shape, getattr(ref, "pieces", ()))


def trimmed(checkpoint: Checkpoint, selection: Selection | None) -> Checkpoint:
    """``checkpoint`` with only the stored tensors its selected tensors read (a LoRA product's
    factors, every name of tied bytes): what ``wdiff watch`` copies into OUT, so that a selection
    also cuts what the watch reads and keeps. ONNX exports are kept whole (their initializers are
    matched across exports by their places in the graph, which a cut could change)."""
    from wdiff.assemble import assemble
    from wdiff.readers.onnx import OnnxRef

    if selection is None or selection.all_tensors:
        return checkpoint
    if any(isinstance(r, OnnxRef) for r in checkpoint.tensors.values()):
        return checkpoint
    assembly, _ = choose_tensors(assemble([checkpoint, checkpoint]), selection, checkpoint.path)
    wanted = {_storage(leaf) for t in assembly.tensors for leaf in _leaves(t.refs[0])}
    tensors = {n: r for n, r in checkpoint.tensors.items() if _storage(r) in wanted}
    files = {p for r in tensors.values() for p in r.files()}
    return replace(
        checkpoint,
        tensors=tensors,
        files={p: i for p, i in checkpoint.files.items() if p in files},
        headers={p: d for p, d in checkpoint.headers.items() if p in files},
    )


def unmatched_warnings(unmatched: Sequence[str]) -> list[Skipped]:
    """A warning for each include pattern that matched no tensor (a typo, or another model's names)."""
    from wdiff.sequence import Skipped

    return [Skipped("include", f"{p!r} matches no tensor") for p in unmatched]


SCAN_SCHEMA = 1  # the "schema" of ``wdiff scan --json``: raised when a key changes meaning


def scan_document(run: Run) -> dict[str, Any]:
    """What ``run`` reads, as ``wdiff scan --json`` prints it (keys in docs/cli.md): the checkpoints
    with their steps, paths and bytes, the tensors with shapes, dtypes and bytes per pass, the
    selection and what it chose from, and what was skipped, left out or warned about, and why."""
    per_checkpoint = [sum(t.refs[i].nbytes for t in run.tensors) for i in range(len(run.checkpoints))]
    record = (run.selection or Selection()).record()
    return {
        "schema": SCAN_SCHEMA,
        "source": run.source,
        "selection": record | ({"of": dict(run.selected_from)} if run.selected_from else {}),
        "checkpoints": [
            {"step": c.step, "path": c.path, "bytes": n} | (c.origin or {})
            for c, n in zip(run.checkpoints, per_checkpoint)
        ],
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtypes,
                "source": t.source,
                "bytes": sum(r.nbytes for r in t.refs),
            }
            | ({"aliases": run.aliases[t.name]} if t.name in run.aliases else {})
            for t in run.tensors
        ],
        "bytes_per_pass": run.bytes_per_pass,
        "skipped": [{"name": s.name, "reason": s.reason} for s in run.skipped],
        "left_out": [{"path": s.name, "reason": s.reason} for s in run.left_out],
        "warnings": [{"path": s.name, "reason": s.reason} for s in run.warnings],
        "matching": run.matching,
    }


_INDEX = re.compile(r"(?:(?<=\.)|^)[0-9]+(?=\.|$)")


def groups(run: Run) -> list[dict[str, Any]]:
    """The tensors of ``run`` grouped by name with layer numbers as ``*`` (each group's ``pattern``
    is a glob ``--include`` takes), in network order: pattern, count, shapes, dtypes, bytes per pass."""
    found: dict[str, dict[str, Any]] = {}
    for t in run.tensors:
        pattern = _INDEX.sub("*", t.name)
        g = found.setdefault(
            pattern, {"pattern": pattern, "count": 0, "shapes": [], "dtypes": [], "bytes": 0}
        )
        g["count"] += 1
        g["bytes"] += sum(r.nbytes for r in t.refs)
        if list(t.shape) not in g["shapes"]:
            g["shapes"].append(list(t.shape))
        g["dtypes"] = sorted({*g["dtypes"], *t.dtypes})
    return list(found.values())
