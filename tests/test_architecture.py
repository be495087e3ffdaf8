"""The shape of the package, read from its source: imports point down the layers and never in a circle,
no module reaches into another's underscore names, experiments stay independent recipes, modules stay
readable in length.

Every module of ``src/rosettalens`` is parsed (nothing is imported or run); module-level *and*
in-function imports count, relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "rosettalens"
MAX_LINES = 900

# The layers, lowest first. An import may point to its own layer or a lower one, never higher. An entry
# "pkg.*" holds every module below pkg; a plain entry holds exactly that module (an exact entry wins,
# then the longest "pkg.*"). Every ``cli`` and ``*_cli`` module is in the top layer.
ANALYSIS = ("mapping", "sae", "similarity", "circuits", "steering", "organisms", "crosscoder", "transcoders")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "io", "names", "config", "offsets", "data.hfspec")),
    ("models and data", ("models.*", "data", "data.*", "report", "report.*")),
    ("hooks", ("hooks", "", "models", "models.loading")),
    ("store", ("store", "align", "data.generate")),
    ("analysis", tuple(f"{p}{s}" for p in ANALYSIS for s in ("", ".*"))),
    ("experiments", ("experiments", "experiments.*")),
    ("command line", ("cli", "options", "demo")),
]

# Experiment modules that are shared parts, not experiments: every experiment may import them.
EXPERIMENT_SHARED = {"__init__", "base", "cli"}


# --------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` (the importer) takes ``target`` (a module), or ``name`` from it."""

    module: str
    target: str
    name: str | None  # the name taken from ``target``; None for ``import target``
    line: int


def _short(module: str) -> str:
    return module.removeprefix(ROOT).removeprefix(".")


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for p in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text("utf-8"), filename=str(modules()[module]))


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package, or None."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _from_base(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


@cache
def imports(module: str) -> tuple[Import, ...]:
    """Every import of ``module`` of a module of the package, at any depth of the file."""
    out = []
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                if target:
                    out.append(Import(module, target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules():  # from package import submodule
                    out.append(Import(module, sub, None, node.lineno))
                else:
                    target = _known(base)
                    if target:
                        out.append(Import(module, target, alias.name, node.lineno))
    return tuple(out)


def all_imports() -> Iterator[Import]:
    """Every import of the package, once per (importer, target, line)."""
    seen = set()
    for m in modules():
        for imp in imports(m):
            if (imp.module, imp.target, imp.line) not in seen:
                seen.add((imp.module, imp.target, imp.line))
                yield imp


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in all_imports():
        if imp.target != imp.module:
            g[imp.module].add(imp.target)
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of the graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(g):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(g[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(g[nxt])))
    return None


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a module; AssertionError for a module the table does not place."""
    short = _short(module)
    if short.rpartition(".")[2] == "cli" or short.endswith("_cli"):
        return len(LAYERS) - 1
    best: tuple[int, int] | None = None
    for i, (_, entries) in enumerate(LAYERS):
        for e in entries:
            if e == short:
                return i
            prefix = e.removesuffix(".*")
            if (
                e.endswith(".*")
                and short.startswith(prefix + ".")
                and (best is None or len(prefix) > best[1])
            ):
                best = (i, len(prefix))
    assert best is not None, f"{module} has no layer: add it to LAYERS in {Path(__file__).name}"
    return best[0]


def private_uses() -> Iterator[tuple[str, str, str, int]]:
    """``(importer, owner, name, line)`` for every underscore name one module takes from another:
    ``from owner import _name``, ``owner._name`` on an imported module, a private module imported from
    outside its package, and a private member of ``HookedModel`` used outside ``hooks.py``."""
    mods = modules()
    hm_private = _hooked_model_private()
    for m in mods:
        bound: dict[str, str] = {}  # local name -> imported module
        for imp in imports(m):
            owner_pkg, _, tail = imp.target.rpartition(".")
            if _private(tail) and not _inside(m, owner_pkg):  # a private module from outside its package
                yield _short(m), _short(owner_pkg), tail, imp.line
            elif imp.name is not None and _private(imp.name) and imp.target != m:
                yield _short(m), _short(imp.target), imp.name, imp.line
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        bound[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(m, node)
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        bound[a.asname or a.name] = f"{base}.{a.name}"
        for node in ast.walk(tree(m)):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in bound and bound[value.id] != m:
                yield _short(m), _short(bound[value.id]), node.attr, node.lineno
            elif m != f"{ROOT}.hooks" and node.attr in hm_private:
                if not (isinstance(value, ast.Name) and value.id in ("self", "cls")):
                    yield _short(m), "hooks.HookedModel", node.attr, node.lineno


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@cache
def _hooked_model_private() -> frozenset[str]:
    """The underscore methods and attributes that ``HookedModel`` defines for itself."""
    names = set()
    for node in ast.walk(tree(f"{ROOT}.hooks")):
        if isinstance(node, ast.ClassDef) and node.name == "HookedModel":
            for n in ast.walk(node):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(n.name)
                elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                    if isinstance(n.value, ast.Name) and n.value.id == "self":
                        names.add(n.attr)
    return frozenset(n for n in names if _private(n))


def _where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(SRC.parent)}:{line}"


# --------------------------------------------------------------------------------------------- the checks
def test_the_walker_sees_relative_in_function_and_package_imports():
    """The reader of the graph is right on imports whose answer is known from the source itself."""
    g = graph()
    assert f"{ROOT}.errors" in g[f"{ROOT}.names"]  # from .errors import HookPointError
    assert f"{ROOT}.models.checks" in g[f"{ROOT}.models.loading"]  # from .checks import ... (relative)
    assert f"{ROOT}.hooks" in g[f"{ROOT}.models.loading"]  # from ..hooks import HookedModel, inside load()
    assert f"{ROOT}.models.zoo" in g[f"{ROOT}.models.loading"]  # from . import zoo (a submodule)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(_short(m) for m in cycle or [])


def test_no_module_takes_another_modules_private_names():
    found = [f"{_where(ROOT + '.' + imp, line)}: {owner}.{name}" for imp, owner, name, line in private_uses()]
    assert not found, "underscore names used across modules (make them public):\n" + "\n".join(found)


def test_the_private_name_check_sees_attribute_access(tmp_path, monkeypatch):
    """``zoo._x`` on an imported module and ``hm._member`` of HookedModel are found, not only imports."""
    pkg = tmp_path / ROOT
    (pkg / "models").mkdir(parents=True)
    for f in ("__init__.py", "models/__init__.py", "models/zoo.py"):
        (pkg / f).write_text("")
    (pkg / "hooks.py").write_text("class HookedModel:\n    def __init__(self):\n        self._secret = 1\n")
    (pkg / "user.py").write_text(
        "from .models import zoo\nfrom . import hooks\n\ndef f(hm):\n    return zoo._find(hm._secret)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    for fn in (modules, tree, imports, _hooked_model_private):
        fn.cache_clear()
    try:
        found = {(i, o, n) for i, o, n, _ in private_uses()}
    finally:
        for fn in (modules, tree, imports, _hooked_model_private):
            fn.cache_clear()
    assert found == {("user", "models.zoo", "_find"), ("user", "hooks.HookedModel", "_secret")}


def test_no_experiment_imports_another_experiment():
    def experiment(m: str) -> bool:
        return m.startswith(f"{ROOT}.experiments.") and m.rpartition(".")[2] not in EXPERIMENT_SHARED

    found = [
        f"{_where(imp.module, imp.line)}: {_short(imp.module)} imports {_short(imp.target)}"
        for imp in all_imports()
        if experiment(imp.module) and experiment(imp.target) and imp.target != imp.module
    ]
    assert not found, "what two experiments share belongs in a package:\n" + "\n".join(found)


def test_no_module_is_longer_than_the_limit():
    found = {m: n for m, p in modules().items() if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert not found, f"modules over {MAX_LINES} lines (split along a real seam): {found}"


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_imports_point_down_the_layers():
    found = []
    for imp in all_imports():
        a, b = layer_of(imp.module), layer_of(imp.target)
        if a < b:
            found.append(
                f"{_where(imp.module, imp.line)}: {_short(imp.module)} ({LAYERS[a][0]}) imports "
                f"{_short(imp.target)} ({LAYERS[b][0]})"
            )
    assert not found, "imports that point up the layers:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("module", "layer"),
    [("errors", "base"), ("models.zoo", "models and data"), ("models", "hooks"), ("store", "store"),
     ("circuits.patching", "analysis"), ("experiments.base", "experiments"), ("circuits.cli", "command line"),
     ("options", "command line")],
)  # fmt: skip
def test_layer_table_places_modules(module, layer):
    assert LAYERS[layer_of(f"{ROOT}.{module}")][0] == layer
