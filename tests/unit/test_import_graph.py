"""clap_core's import graph, read from the source (AST, nothing imported): no circle, no Ray, no clap_demo; and
every third-party import of the shipped packages declared in pyproject.

Both module-level and function-level `clap_core` imports count (a function-level import only defers a circle
to call time). Imports under `if TYPE_CHECKING:` never run, so they are left out: that is how a module names
another's class in type hints without importing it.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "clap_demo", "pipelines")  # the library runs without Ray and never reaches into the apps


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, this: str, is_package: bool) -> list[str]:
    """Absolute dotted names of every import in `tree` (any depth), `TYPE_CHECKING` blocks left out.
    `from a.b import c` yields both `a.b` and `a.b.c` (c may be a submodule); the caller keeps the real modules."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if is_type_checking_block(node):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = this.split(".") if is_package else this.split(".")[:-1]
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package's modules it imports, module -> top-level names of everything it imports).
    Importing a.b.c runs a/__init__ and a/b/__init__ too, so those count as imported."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph, external = {}, {}
    for name, path in files.items():
        found = imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        edges = set()
        for target in found:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module itself and every package above it
                prefix = ".".join(parts[:i])
                if prefix in files and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
        external[name] = {t.split(".")[0] for t in found if t}
    return graph, external


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_clap_core_has_no_import_circle():
    graph, _ = import_graph(REPO / "clap_core")
    assert len(graph) > 30 and graph["clap_core.model.clap"]  # the walk found the package and its edges
    assert circles(graph) == []


def test_clap_core_never_imports_ray_clap_demo_or_pipelines():
    _, external = import_graph(REPO / "clap_core")
    offenders = {module: sorted(names & set(FORBIDDEN)) for module, names in external.items()
                 if names & set(FORBIDDEN)}
    assert offenders == {}


def test_the_walk_finds_function_level_and_relative_circles_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def load():\n    from .. import c\n    return c\n")  # deferred, still a circle
    (pkg / "c.py").write_text("import ray\nimport pkg.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n")
    (pkg / "e.py").write_text("from pkg import d\n")
    graph, external = import_graph(pkg)
    assert circles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert graph["pkg.d"] == set() and "pkg.d" in graph["pkg.e"]
    assert "ray" in external["pkg.c"]


def test_every_third_party_import_of_the_shipped_packages_is_declared_in_pyproject():
    """A package imported by clap_core, clap_demo or pipelines must be named in pyproject (dependencies or an
    extra), not only arrive through another one's requirements."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    declared = {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for group in groups for r in group}
    distributions = md.packages_distributions()  # import name -> distribution names
    first_party = {"clap_core", "clap_demo", "pipelines"}
    missing = {}
    for package in sorted(first_party):
        _, external = import_graph(REPO / package)
        for module, names in external.items():
            for name in names - first_party - set(sys.stdlib_module_names) - {"__future__"}:
                dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(name, [name])}
                if not dists & declared:
                    missing.setdefault(name, []).append(module)
    assert missing == {}


def test_old_flat_module_names_fail_with_the_new_place():
    """The 0.1 flat modules are gone; importing one names the module that replaced it (no silent alias)."""
    import importlib

    import clap_core

    with pytest.raises(ImportError, match="ClapModel moved to clap_core.model.clap"):
        exec("from clap_core.model import ClapModel", {})  # the 0.1 path of the class
    for old, new in (("metrics", "clap_core.eval.metrics"), ("preprocess_config", "clap_core.preprocess.config"),
                     ("synth", "clap_demo.synth")):
        with pytest.raises(ImportError, match=f"clap_core.{old} moved to {new}"):
            importlib.import_module(f"clap_core.{old}")
        with pytest.raises(ImportError, match=f"clap_core.{old} moved to {new}"):
            exec(f"from clap_core import {old}", {})
        importlib.import_module(new)  # and the new place imports
    assert all(importlib.util.find_spec(new) for new in clap_core.MOVED_MODULES.values())
