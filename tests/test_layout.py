"""The package's layout rules, checked on the source (ast, nothing imported):

* a lower layer never imports a higher one (imports under ``if TYPE_CHECKING:`` are type
  annotations, not dependencies, and are skipped);
* no module imports another module's private (``_``-prefixed) name, and no module outside a
  package imports that package's private modules (a C extension's Python wrapper is its own
  package's business);
* no two modules share a name; every package says in a one-line docstring what lives there.
"""
from __future__ import annotations

import ast
import os
from collections import Counter

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deltackpt")

#: layers from the bottom up; a module may import its own layer and those below it.
#: The longest matching prefix decides a module's layer.
LAYERS: dict[str, int] = {
    "deltackpt.errors": 0,
    "deltackpt.runtime": 0,
    "deltackpt.format": 1,
    "deltackpt.codecs": 2,
    "deltackpt.store": 3,
    "deltackpt.engine": 4,
    "deltackpt.ops": 5,
    "deltackpt.interop": 5,        # file readers/writers and export take a repository as an argument
    "deltackpt.repository": 6,     # the public facade: engine + operations
    "deltackpt.interop.importer": 7,  # opens repositories itself
    "deltackpt.integrations": 7,
    "deltackpt.dcp": 7,
    "deltackpt.testing": 8,
    "deltackpt.cli": 8,
    "deltackpt": 8,                # the package's __init__: open() and the lazy public names
    "deltackpt.__main__": 9,
}


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every runtime import of a deltackpt module."""
    path = MODULES[module]
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rsplit(".", 1)[0]
    out: list[tuple[int, str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "deltackpt" or target.startswith("deltackpt."):
                    names = [a.name for a in child.names]
                    # ``from pkg import submodule`` imports the submodule
                    subs = [n for n in names if f"{target}.{n}" in MODULES]
                    for n in subs:
                        out.append((child.lineno, f"{target}.{n}", []))
                    rest = [n for n in names if n not in subs]
                    if rest or not subs:
                        out.append((child.lineno, target, rest))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "deltackpt" or a.name.startswith("deltackpt."):
                        out.append((child.lineno, a.name, []))
            visit(child)

    visit(tree)
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        assert any(m == p or m.startswith(p + ".") for p in LAYERS), m


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = layer(module)
    bad = [f"line {ln}: {target} (layer {layer(target)})" for ln, target, _ in imports(module)
           if layer(target) > mine]
    assert not bad, f"{module} (layer {mine}) imports a higher layer: {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_of_another_module(module):
    bad = []
    for ln, target, names in imports(module):
        if target == module:
            continue
        own_package = module.rsplit(".", 1)[0] if not MODULES[module].endswith(
            "__init__.py") else module
        leaf = target.rsplit(".", 1)[-1]
        # a package's own private C extension (format/_planes) is imported by its wrapper
        if leaf.startswith("_") and not leaf.startswith("__") and \
                target.rsplit(".", 1)[0] != own_package:
            bad.append(f"line {ln}: private module {target}")
        pkg_dir = os.path.join(os.path.dirname(PKG), *target.split("."))
        bad += [f"line {ln}: {target}.{n}" for n in names
                if n.startswith("_") and not n.startswith("__")
                and not (target == own_package and os.path.exists(os.path.join(pkg_dir, n + ".c")))]
    assert not bad, f"{module} imports private names: {bad}"


def test_module_names_are_unique():
    leaves = Counter(m.rsplit(".", 1)[-1] for m, p in MODULES.items()
                     if not p.endswith("__init__.py"))
    assert [n for n, c in leaves.items() if c > 1] == []


def test_every_package_says_what_lives_there():
    for m, p in MODULES.items():
        if p.endswith("__init__.py"):
            doc = ast.get_docstring(ast.parse(open(p).read()))
            assert doc and doc.strip(), f"package {m} has no docstring"


def test_the_checker_sees_a_violation():
    """The rules above are not vacuous: the checker finds what it should on real modules."""
    assert layer("deltackpt.repository") > layer("deltackpt.ops.gc") > layer("deltackpt.format.frame")
    found = {t for _, t, _ in imports("deltackpt.repository")}
    assert "deltackpt.ops.gc" in found and "deltackpt.engine.policy" in found
    # TYPE_CHECKING imports are skipped: ops modules name Repository only for annotations
    assert all(t != "deltackpt.repository" for _, t, _ in imports("deltackpt.ops.gc"))
