"""The package's layering, read from its imports with ``ast`` (nothing is imported).

Three rules hold the data flow visible in the tree (grid -> emulator -> observe ->
{mdn, fitting, posterior} -> fit -> catalog -> plots / cli / demo):

* no import cycle between modules (lazy, function-level imports included);
* no import from a later stage into an earlier one;
* no ``_underscored`` name imported from another module.

``ALLOWED`` lists the known violations still to be removed; it must only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "payne_lite"

#: Pipeline stage of each top-level module or subpackage of ``payne_lite``: a module
#: may import from its own stage or lower ones only.
STAGES = {
    # layer 0: leaf helpers and settings, import nothing from the package
    "errors": 0,
    "constants": 0,
    "options": 0,
    "_validate": 0,
    "_h5": 0,
    "_serial": 0,
    "_jaxcheck": 0,
    "_version": 0,
    "_datafiles": 0,
    "_compile": 0,
    "_memory": 0,
    "_fusion": 0,
    # layer 1: data in; 2: emulate; 3: the observation model
    "grid": 1,
    "emulator": 2,
    "datasets": 2,  # the shipped example data, loaded as Emulators and arrays
    "observe": 3,
    "spectra": 3,  # specutils spectra in (as observe's arrays and Instrument) and out
    # layer 4: MDN; 5: point fits; 6: posteriors (built on the LM start)
    "mdn": 4,
    "fitting": 5,
    "posterior": 6,
    # layer 7: the public fit; 8: catalogs and results files
    "_api": 7,
    "catalog": 8,
    # layer 9: views and entry points
    "plots": 9,
    "demo": 9,
    "cli": 9,
    "__main__": 9,
    "__init__": 10,
}

#: Known violations, as "importer -> imported" strings. Only ever shrink this.
ALLOWED: set[str] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    """Absolute module named by a ``from X import ...`` inside the package, or None."""
    if node.level == 0:
        mod = node.module or ""
        return mod if mod == "payne_lite" or mod.startswith("payne_lite.") else None
    base = importer.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges() -> list[tuple[str, str, str, int]]:
    """(importer, imported module, imported name, line) for every package import."""
    mods = _modules()
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_pkg, node)
                if target is None:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:  # `from . import synth`: the module itself
                        out.append((name, sub, "", node.lineno))
                    else:
                        out.append((name, target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("payne_lite"):
                        out.append((name, alias.name, "", node.lineno))
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _violations() -> set[str]:
    found = set()
    graph: dict[str, set[str]] = {}
    for importer, target, name, _line in _edges():
        if target == "payne_lite":  # the top-level face: only entry points use it
            target = "payne_lite.__init__"
        graph.setdefault(importer, set()).add(target)
        src, dst = _stage(importer), _stage(target)
        if STAGES[dst] > STAGES[src]:
            found.add(f"{importer} -> {target} (upward: stage {src} imports {dst})")
        if name.startswith("_") and not name.startswith("__"):
            found.add(f"{importer} -> {target}.{name} (private name)")
    # a package's __init__ re-exports its modules: the edges into it are not cycles
    # as long as no module of the package imports its own __init__.
    for comp in _cycles(graph):
        found.add("cycle: " + " <-> ".join(comp))
    return found


def test_every_module_has_a_stage():
    missing = {_stage(m) for m in _modules()} - set(STAGES)
    assert not missing, f"add these modules to STAGES in {__file__}: {sorted(missing)}"


def test_layering_holds_apart_from_the_allow_list():
    found = _violations()
    new = sorted(found - ALLOWED)
    assert not new, "new layering violations:\n  " + "\n  ".join(new)


def test_allow_list_has_no_stale_entries():
    stale = sorted(ALLOWED - _violations())
    assert not stale, "fixed: remove from ALLOWED:\n  " + "\n  ".join(stale)


def test_the_checker_sees_violations():
    """The walk itself: a cycle, an upward edge and a private import are caught."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    node = ast.parse("from ..observe import _embed").body[0]
    assert _resolve("payne_lite.fitting._lm", False, node) == "payne_lite.observe"
    node = ast.parse("from . import _lm").body[0]
    assert _resolve("payne_lite.fitting", True, node) == "payne_lite.fitting"


def test_ruff_lint_and_format_clean():
    """The package, tests and benchmarks pass ``ruff check`` and ``ruff format``."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        import pytest

        pytest.skip("ruff is not installed (it is in the 'test' extra)")
    root = PACKAGE.parent
    dirs = [
        d for d in ("payne_lite", "tests", "benchmarks", "data") if (root / d).is_dir()
    ]
    for args in (["check", "--quiet"], ["format", "--check", "--quiet"]):
        run = subprocess.run(
            [ruff, *args, *dirs], cwd=root, capture_output=True, text=True
        )
        assert run.returncode == 0, f"ruff {' '.join(args)}:\n{run.stdout}{run.stderr}"
