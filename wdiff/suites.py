"""A checkpoint suite published as revisions of one Hugging Face Hub repository (Pythia: branches
``step0`` ... ``step143000``; OLMo: ``stepN-tokensMB``): which revisions to read, in which order, and the
commit each one is read at.

``--revisions`` takes a comma-separated list whose items are revision names (``step1000``), numeric
ranges in braces (``step{0..143000..1000}``: from, to, by; the ``..by`` part is optional), or patterns
(``step*``, ``step?000``) matched against the repository's branches and tags (``list_repo_refs``).
Names from a list are kept in the order given (a warning when their steps say otherwise); names from a
pattern are ordered by the step in their name. Every revision is pinned to the commit it names when
listed, so a branch that moves while wdiff reads it changes nothing.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from urllib.parse import quote

from wdiff.errors import WdiffError
from wdiff.naming import step_of
from wdiff.readers.remote import RemotePath

MAX_REVISIONS = 100_000  # a range that expands to more is a typo
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")
_HF = re.compile(r"^hf://(?:(models|datasets|spaces)/)?([^/@]+/[^/@]+)(?:@([^/]*))?(/.*)?$")


@dataclass(frozen=True)
class Revision:
    """One revision of the suite: its name, the commit it pointed to, and where its checkpoint is."""

    name: str
    commit: str
    step: int | None
    location: RemotePath  # hf://REPO@COMMIT[/sub/folder]: what is read
    url: str  # hf://REPO@NAME[/sub/folder]: what the user named


def expand(spec: str) -> list[str]:
    """The items of a ``--revisions`` value, numeric ranges expanded (patterns left as they are)."""
    items: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _RANGE.search(item)
        if m is None:
            items.append(item)
            continue
        a, b = int(m.group(1)), int(m.group(2))
        by = int(m.group(3)) if m.group(3) else 1
        if by == 0 or (b - a) * by < 0:
            raise WdiffError(None, f"--revisions {item}: the range {m.group(0)} is empty or never ends")
        count = (b - a) // by + 1
        if count > MAX_REVISIONS:
            raise WdiffError(None, f"--revisions {item}: {count} revisions, over the {MAX_REVISIONS} limit")
        for n in range(a, b + (1 if by > 0 else -1), by):
            items.extend(expand(item[: m.start()] + str(n) + item[m.end() :]))
    if not items:
        raise WdiffError(None, "--revisions names no revision")
    return items


def _is_pattern(item: str) -> bool:
    return any(c in item for c in "*?[")


def parse_hub_url(url: str) -> tuple[str, str, str | None, str]:
    """(repo type, repo id, revision or None, path inside the repo) of an ``hf://`` URL."""
    m = _HF.match(url.rstrip("/"))
    if m is None:
        raise WdiffError(url, "not a Hub URL: use hf://ORG/NAME, optionally @REVISION and /path/inside")
    kind = {"datasets": "dataset", "spaces": "space"}.get(m.group(1) or "", "model")
    return kind, m.group(2), m.group(3) or None, (m.group(4) or "").strip("/")


def _api():
    from huggingface_hub import HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    return HfApi(endpoint=endpoint)


def _refs(url: str, kind: str, repo: str) -> dict[str, str]:
    """Branch and tag names of the repository, each with its commit."""
    from wdiff.readers.remote import store_error

    try:
        refs = _api().list_repo_refs(repo, repo_type=kind)
    except Exception as e:  # noqa: BLE001 - a store error is a one-line error, any other is a bug
        problem = store_error(url, e)
        if problem is None:
            raise WdiffError(url, f"cannot list the repository's revisions: {e}") from None
        raise problem from None
    found = {r.name: r.target_commit for r in refs.tags}
    found.update({r.name: r.target_commit for r in refs.branches})  # a branch wins over a tag
    return found


def hub_revisions(url: str, spec: str) -> tuple[list[Revision], bool]:
    """The revisions ``spec`` names in the repository of ``url`` (``hf://ORG/NAME[/path]``), and
    whether they were given as a plain list (kept in order) rather than found by a pattern (ordered
    by step)."""
    kind, repo, pinned, inside = parse_hub_url(url)
    if pinned is not None:
        raise WdiffError(url, "give the revisions with --revisions, not with @ in the URL as well")
    items = expand(spec)
    refs = _refs(url, kind, repo)
    prefix = "" if kind == "model" else f"{kind}s/"
    names: list[str] = []
    listed = True
    for item in items:
        if _is_pattern(item):
            listed = False
            matched = [n for n in refs if fnmatch.fnmatchcase(n, item)]
            if not matched:
                raise WdiffError(f"hf://{prefix}{repo}", f"no branch or tag matches {item!r}")
            names += matched
        else:
            names.append(item)
    names = list(dict.fromkeys(names))  # each revision once
    if not listed:
        unordered = [n for n in names if step_of(n) is None]
        if unordered:
            raise WdiffError(
                f"hf://{prefix}{repo}@{unordered[0]}",
                "has no step number in its name, so its place in the sequence is unknown; list the "
                "revisions in order instead of a pattern",
            )
        names.sort(key=lambda n: step_of(n))  # type: ignore[arg-type, return-value]
    revisions = []
    for name in names:
        commit = refs.get(name)
        if commit is None and re.fullmatch(r"[0-9a-f]{40}", name):
            commit = name  # a commit named by its sha
        where = f"hf://{prefix}{repo}@{quote(name, safe='')}" + (f"/{inside}" if inside else "")
        if commit is None:
            raise WdiffError(where, "no such revision in the repository (no branch, tag or commit so named)")
        at_commit = f"hf://{prefix}{repo}@{commit}" + (f"/{inside}" if inside else "")
        pinned = RemotePath(at_commit, folder_hint=True)
        revisions.append(Revision(name, commit, step_of(name), pinned, where))
    return revisions, listed
