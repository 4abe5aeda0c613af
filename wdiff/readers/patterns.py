r"""peft's ``rank_pattern`` / ``alpha_pattern``: regular expressions from a file, matched with a bound.

peft gives a module the value of the first key (in file order) for which
``re.match(rf"(.*\.)?({key})$", module)`` matches (``peft.utils.other.get_pattern_key``). A key is a
regular expression someone else wrote, and Python's ``re`` backtracks: ``(a+)+b`` against a module
named ``aaaa...a`` never finishes, holds the GIL, and ``re`` has no time limit. So:

- a key made only of name characters and dots (a module path, or a suffix such as ``q_proj``: what
  peft and its users write) holds no quantifier; it is matched here, where only the fixed
  ``(.*\.)?`` prefix backtracks (at most quadratically in the name's length);
- every other key is matched in a child Python process running the very same expression with the
  very same ``re`` module (peft's semantics exactly), given ``PATTERN_SECONDS`` for all of them. Past
  that the child is killed and the adapter config refused in one line naming the key. A child costs
  ~20 ms, once per distinct (keys, modules) set of a run.

Rejecting "dangerous" syntax instead would refuse real patterns (``.*\.(q|v)_proj``) and still miss
slow ones (``.*.*.*.*x`` is polynomial but astronomically so); a third-party engine without
backtracking (RE2) would change the semantics of lookarounds and back-references and add a
dependency.

A key that is not a valid expression (peft would raise) matches as a literal module-name suffix.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

from wdiff.errors import WdiffError

PATTERN_SECONDS = 5.0  # all non-literal keys of one adapter config, against all its modules
_LITERAL = re.compile(r"[\w.]*")

# The child: reads {"keys": [...], "modules": [...]}, prints for each key, in order, the indices of
# the modules it matches (one JSON line per key, flushed, so the parent knows which key hung).
_CHILD = r"""
import json, re, sys
job = json.load(sys.stdin)
for key in job["keys"]:
    try:
        rx = re.compile(rf"(.*\.)?({key})$")
        hits = [i for i, m in enumerate(job["modules"]) if rx.match(m)]
    except (re.error, RecursionError, OverflowError):
        hits = [i for i, m in enumerate(job["modules"]) if m == key or m.endswith("." + key)]
    print(json.dumps(hits), flush=True)
"""


def _literal_hits(key: str, modules: tuple[str, ...]) -> list[int]:
    rx = re.compile(rf"(.*\.)?({key})$")
    return [i for i, m in enumerate(modules) if rx.match(m)]


@functools.lru_cache(maxsize=16)
def _hits(keys: tuple[str, ...], modules: tuple[str, ...], where: str, field: str) -> tuple:
    """For each key, the indices of the modules it matches."""
    out: list[list[int] | None] = [_literal_hits(k, modules) if _LITERAL.fullmatch(k) else None for k in keys]
    others = [k for k, hits in zip(keys, out) if hits is None]
    if others:
        job = json.dumps({"keys": others, "modules": list(modules)})
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")}
        try:
            child = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _CHILD], input=job.encode("utf-8", "surrogatepass"),
                capture_output=True, timeout=PATTERN_SECONDS, env=env, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            done = (e.stdout or b"").count(b"\n")
            raise WdiffError(
                where,
                f"{field} key {others[done]!r} did not finish matching {len(modules)} module names in "
                f"{PATTERN_SECONDS:g} s (a regular expression that backtracks catastrophically?)",
            ) from None
        lines = child.stdout.splitlines()
        if child.returncode != 0 or len(lines) != len(others):
            why = " ".join(child.stderr.decode("utf-8", "replace").split()[-12:])
            raise WdiffError(where, f"{field} keys could not be matched: {why or 'the matcher failed'}")
        found = iter(json.loads(line) for line in lines)
        out = [hits if hits is not None else next(found) for hits in out]
    return tuple(tuple(h) for h in out)  # type: ignore[union-attr]


def pattern_values(patterns: object, modules: list[str], where: str, field: str) -> dict[str, object]:
    """module -> the value peft's ``get_pattern_key`` gives it from ``patterns`` (a ``rank_pattern``
    or ``alpha_pattern`` dict); modules no key matches are absent. ``where``: the adapter config."""
    if not isinstance(patterns, dict) or not patterns or not modules:
        return {}
    keys = tuple(str(k) for k in patterns)
    values = list(patterns.values())
    unique = tuple(dict.fromkeys(modules))
    result: dict[str, object] = {}
    for key_index, hits in enumerate(_hits(keys, unique, where, field)):
        for i in hits:
            result.setdefault(unique[i], values[key_index])  # the first key in file order wins
    return result
