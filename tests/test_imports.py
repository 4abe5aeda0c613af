"""wdiff's modules import one way: no module reaches itself through its imports.

Every import counts, wherever it stands (module level, inside a function, under TYPE_CHECKING): a
function-level import that closes a loop is still two modules that each need the other. Imports of
the root package itself (``from wdiff import __version__``) are left out: ``wdiff/__init__.py`` is the
lazy facade over the public API and imports nothing at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wdiff

ROOT = Path(wdiff.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The wdiff modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != "wdiff" and m != name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    edges = graph()
    assert "wdiff.kernels" in edges["wdiff.stream"]
    assert "wdiff.readers.base" in edges["wdiff.readers.safetensors"]
    assert len(edges) > 30


def test_wdiff_has_no_import_cycle():
    assert cycles(graph()) == []


def test_the_results_schema_imports_nothing_that_writes_or_reads_results():
    """``wdiff.schema`` is read by ``wdiff.results`` and everything after it; what it reaches must not
    reach back (compute, the results, the scene, the report)."""
    edges = graph()
    reached: set[str] = set()
    todo = ["wdiff.schema"]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += edges[m]
    above = {"wdiff.compute", "wdiff.results", "wdiff.api", "wdiff.metrics"}
    assert sorted(m for m in reached if m in above or m.startswith(("wdiff.scene", "wdiff.report"))) == []
    assert "wdiff.schema" in edges["wdiff.results"] and "wdiff.schema" in edges["wdiff.compute"]


def test_no_two_modules_share_a_name():
    stems = [p.stem for p in ROOT.rglob("*.py") if p.name != "__init__.py"]
    assert sorted({s for s in stems if stems.count(s) > 1}) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(name: str, package: str, source: str, known: set[str]) -> list[str]:
    """Private names (``_x``) of other wdiff modules that module ``name`` (in ``package``) uses: imported
    (``from wdiff.m import _x``) or reached through an imported module (``m._x``).

    Private modules (``wdiff._files``, ``wdiff.scene._kernels``) are the package's own helpers and may be
    imported inside wdiff; their public names are what they offer.
    """
    tree = ast.parse(source)
    bound: set[str] = set()  # local names that stand for a wdiff module
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base not in known:
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    bound.add(alias.asname or alias.name)
                elif _private(alias.name):
                    found.append(f"{base}.{alias.name}")
        elif isinstance(node, ast.Import):
            bound |= {a.asname for a in node.names if a.asname and a.name in known}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in bound and _private(node.attr):
                found.append(f"{node.value.id}.{node.attr}")
    return sorted(set(found))


def test_the_private_name_finder_sees_imports_and_attributes():
    source = "from wdiff.readers import torch as t\nfrom ..metrics import _x, ok\nt._y(); t.z(); self._w\n"
    found = private_imports("wdiff.readers.probe", "wdiff.readers", source, set(_modules()))
    assert found == ["t._y", "wdiff.metrics._x"]


def test_no_module_imports_a_private_name():
    known = set(_modules())
    found = {}
    for name, path in _modules().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        if got := private_imports(name, package, path.read_text(), known):
            found[name] = got
    assert found == {}


def test_no_public_name_of_the_package_is_also_a_submodule():
    """Importing ``wdiff.x`` binds the module to ``wdiff.x``: a lazy public ``wdiff.x`` of the same name
    would then be the module (``wdiff.watch(...)``: "module object is not callable")."""
    submodules = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()}
    assert sorted(set(wdiff.__all__) & submodules) == []


def test_the_public_api_survives_importing_every_submodule():
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, wdiff\n"
        "for m in pkgutil.walk_packages(wdiff.__path__, 'wdiff.'):\n"
        "    if m.name != 'wdiff.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "import types\n"
        "bad = [n for n in wdiff.__all__ if isinstance(getattr(wdiff, n), types.ModuleType)]\n"
        "assert bad == [], bad\n"
        "assert callable(wdiff.scan) and callable(wdiff.watch) and callable(wdiff.run)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent, timeout=120)
