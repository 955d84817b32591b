"""The package's import layering (docs/architecture.md), read from the source with ``ast``: nothing is imported.

A module may import ifunc modules of its own layer or of lower layers, never of a higher one; there are no
import cycles among ifunc modules and no ifunc import inside a function (the usual way to dodge a cycle).
Extra rules: the ranks group (``distributed.py``, ``_ranks.py``) is a leaf (it imports no ifunc module outside
the ranks group), ``store/`` imports only the base modules, ``curvature.py`` never imports ``distributed.py``, and
the scoring modules never import the Kronecker package (the scoring loop knows no method: a closure brings its
scorer). A private name (``_x``) is never imported from another package, nor a private module from outside its
package; no public name is defined in two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ifunc"

# group -> (layer, files relative to ifunc/; a trailing "/" takes every module below that folder)
GROUPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "base": (
        0,
        (
            "_types.py",
            "_data.py",
            "_chunks.py",
            "_order.py",
            "_errors.py",
            "_progress.py",
            "_version.py",
            "functional.py",
        )
        + ("_memory.py", "_identity.py", "_hash_walk.py", "_batches.py"),
    ),
    "ranks": (0, ("distributed.py", "_ranks.py")),
    "store": (1, ("store/",)),
    "grads": (2, ("grads.py",)),
    "loop": (2, ("_score_loop.py", "_sinks.py", "_store_sinks.py", "_topk_sink.py")),  # the one chunk loop, its sinks
    "curvature": (3, ("curvature.py", "likelihood.py")),
    "kronecker": (4, ("ihvp/kronecker/",)),  # before "solvers": the first group that matches a file is its group
    "solvers": (4, ("ihvp/",)),
    "index": (5, ("index/",)),
    "scoring": (5, ("attribute.py", "_store_meta.py", "ensemble.py", "quality.py", "evaluate/")),
    "models": (5, ("language.py", "measurements.py", "testing/")),
    "face": (6, ("__init__.py", "__main__.py")),
}
# group -> the only groups it may import (on top of the layer rule); absent = any group of its layer or below
ONLY: dict[str, set[str]] = {
    "ranks": {"ranks"},  # a leaf: no ifunc import outside the ranks group
    "store": {"base", "store"},  # HDF5 I/O only: never distributed, ihvp or attribute
    "loop": {"base", "ranks", "store", "loop"},  # knows no method, no gradient, no index: chunks, sinks, stores
}
NEVER: dict[str, set[str]] = {"curvature": {"ranks"}, "scoring": {"kronecker"}, "index": {"scoring"}}


class Import(NamedTuple):
    source: str  # dotted name of the importing module
    target: str  # dotted name of the imported ifunc module
    line: int
    in_function: bool
    names: tuple[str, ...] = ()  # names taken from the target module (``from target import a, b``)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _group_of(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE).as_posix()
    for group, (_, files) in GROUPS.items():
        for f in files:
            if rel == f or (f.endswith("/") and rel.startswith(f)):
                return group
    return None


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is an ifunc module (``ifunc.x.func`` -> ``ifunc.x``)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in modules:
            return prefix
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, path: Path, modules: dict[str, Path]):
        self.name, self.modules, self.depth = name, modules, 0
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.found: list[Import] = []

    def _add(self, target: str | None, node: ast.AST, names: tuple[str, ...] = ()):
        imp = Import(self.name, target, node.lineno, self.depth > 0, names)
        if target is not None and target != self.name and imp not in self.found:
            self.found.append(imp)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name == "ifunc" or alias.name.startswith("ifunc."):
                self._add(_known(alias.name, self.modules), node)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package.split(".")
            if node.level - 1 >= len(base):
                raise AssertionError(f"{self.name}:{node.lineno}: relative import beyond the ifunc package")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        if not (origin == "ifunc" or origin.startswith("ifunc.")):
            return
        for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub when there is one
            sub = f"{origin}.{alias.name}"
            if sub in self.modules:
                self._add(sub, node)
            else:
                target = _known(origin, self.modules)
                self._add(target, node, (alias.name,) if target == origin else ())


def _imports() -> tuple[dict[str, Path], list[Import]]:
    modules = _modules()
    found: list[Import] = []
    for name, path in modules.items():
        collector = _Collector(name, path, modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(collector.found)
    return modules, found


MODULES, IMPORTS = _imports()


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(PACKAGE.parent)}:{imp.line}"


def test_every_module_has_a_layer():
    unknown = [str(p.relative_to(PACKAGE.parent)) for p in MODULES.values() if _group_of(p) is None]
    assert not unknown, (
        f"modules without a layer: {unknown}; add each to GROUPS in tests/test_layering.py "
        "(and to the layer diagram in docs/architecture.md)"
    )


def test_no_module_imports_a_higher_layer():
    bad = []
    for imp in IMPORTS:
        src, dst = _group_of(MODULES[imp.source]), _group_of(MODULES[imp.target])
        if src is None or dst is None:
            continue  # reported by test_every_module_has_a_layer
        if GROUPS[dst][0] > GROUPS[src][0]:
            bad.append(
                f"{_where(imp)}: {imp.source} ({src}, layer {GROUPS[src][0]}) imports {imp.target} "
                f"({dst}, layer {GROUPS[dst][0]})"
            )
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("group", sorted(set(ONLY) | set(NEVER)))
def test_group_import_rules(group):
    bad = []
    for imp in IMPORTS:
        if _group_of(MODULES[imp.source]) != group:
            continue
        dst = _group_of(MODULES[imp.target])
        if (group in ONLY and dst not in ONLY[group]) or dst in NEVER.get(group, set()):
            bad.append(f"{_where(imp)}: {imp.source} imports {imp.target} ({dst})")
    allowed = f"may import only {sorted(ONLY[group])}" if group in ONLY else f"must never import {sorted(NEVER[group])}"
    assert not bad, f"{group} {allowed}:\n" + "\n".join(bad)


def test_no_function_level_imports_of_ifunc_modules():
    bad = [f"{_where(imp)}: {imp.source} imports {imp.target} inside a function" for imp in IMPORTS if imp.in_function]
    assert not bad, (
        "import at module level (a function-level import hides a cycle or a layer violation):\n" + "\n".join(bad)
    )


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        edges[imp.source].add(imp.target)
    cycles = _cycles(edges)
    detail = []
    for component in cycles:
        members = set(component)
        detail.append(
            " <-> ".join(component)
            + "\n    "
            + "\n    ".join(
                f"{_where(imp)}: {imp.source} -> {imp.target}"
                for imp in IMPORTS
                if imp.source in members and imp.target in members
            )
        )
    assert not cycles, "import cycles among ifunc modules:\n" + "\n".join(detail)


def test_the_checker_resolves_relative_imports():
    """Self-check on the collector: relative, submodule and absolute forms resolve to the right module."""
    source = (
        "from . import _base\nfrom .. import functional\nfrom ..curvature import hvp\n"
        "import ifunc.store\nfrom ifunc import testing\nimport torch\n"
        "def f():\n    from ..grads import per_sample_grads\n"
    )
    modules = {
        n: PACKAGE
        for n in (
            "ifunc",
            "ifunc.ihvp",
            "ifunc.ihvp._base",
            "ifunc.functional",
            "ifunc.curvature",
            "ifunc.store",
            "ifunc.testing",
            "ifunc.grads",
        )
    }
    collector = _Collector("ifunc.ihvp.cg", PACKAGE / "ihvp" / "cg.py", modules)
    collector.visit(ast.parse(source))
    assert [(i.target, i.in_function) for i in collector.found] == [
        ("ifunc.ihvp._base", False),
        ("ifunc.functional", False),
        ("ifunc.curvature", False),
        ("ifunc.store", False),
        ("ifunc.testing", False),
        ("ifunc.grads", True),
    ]
    package = _Collector("ifunc.ihvp", PACKAGE / "ihvp" / "__init__.py", modules)
    package.visit(ast.parse("from ._base import IHVP\nfrom .. import store\n"))
    assert [i.target for i in package.found] == ["ifunc.ihvp._base", "ifunc.store"]


def _package(module: str) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    return module if (PACKAGE.parent / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]


def test_no_private_name_or_module_is_imported_from_another_package():
    bad = []
    for imp in IMPORTS:
        parts = imp.target.split(".")
        private = [i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")]
        if private:  # a private module is for the package that holds it (and that package's subpackages)
            home = ".".join(parts[: private[0]])
            if not (imp.source == home or imp.source.startswith(home + ".")):
                bad.append(f"{_where(imp)}: {imp.source} imports the private module {imp.target} of {home}")
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__") and _package(imp.source) != _package(imp.target):
                bad.append(f"{_where(imp)}: {imp.source} imports the private name {name} from {imp.target}")
    assert not bad, "import what another package offers publicly (re-export it, or drop the underscore):\n" + "\n".join(
        bad
    )


def _is_overload(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any((d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")) == "overload" for d in decorators)


def test_no_public_name_is_defined_in_two_modules():
    where: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not _is_overload(node):
                    where.setdefault(node.name, set()).add(name)
    twice = {n: sorted(m) for n, m in where.items() if len(m) > 1}
    assert not twice, f"one name, one meaning: public names defined in several modules: {twice}"
