"""Imports run one way (issue 17), as ARCHITECTURE.md draws them (issue 22).

ARCHITECTURE.md is the one map: its tables give every module a part, each part the parts it
may import, and the few imports allowed to reach upward. Every import in transformer_hooks/
and weights_conversion/ is read with ``ast``, at module level and inside functions (a lazy
import that reaches upward is still an upward import). Imports under ``if TYPE_CHECKING:`` are
not run, but a type is a dependency too: they count as lazy imports (so a low module cannot
name a type from a module above it).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transformer_hooks", "weights_conversion")


def _load_architecture():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("architecture", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


architecture = _load_architecture()
ARCH = architecture.read()


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name, is_package = module_name(path)
            found[name] = (path, is_package)
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, is_package: bool, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, lazy, line) for every import of our packages in the file."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def add(target: str, lazy: bool, line: int) -> None:
        if target.split(".")[0] in PACKAGES:
            found.append((target, lazy, line))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for sub in child.body:  # not run, but a dependency all the same: counted as lazy
                    visit_stmt(sub, True)
                for sub in child.orelse:  # the else branch does run
                    visit_stmt(sub, lazy)
                continue
            visit_stmt(child, lazy)

    def visit_stmt(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, lazy, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package.
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
            for target in submodules:
                add(target, lazy, node.lineno)
            if len(submodules) < len(node.names):
                add(source, lazy, node.lineno)
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(node, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def path_of(name: str) -> str:
    """A module's file, as ARCHITECTURE.md names it: ``transformer_hooks/cache.py``, and a
    package's ``__init__.py`` (``transformer_hooks/sae/__init__.py``, covered by ``transformer_hooks/sae/``)."""
    return MODULES[name][0].relative_to(ROOT).as_posix()


def part(name: str) -> str | None:
    return ARCH.part_of(path_of(name))


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in found.items()}


MODULES = modules()
GRAPH = graph()


def test_every_module_has_a_part():
    missing = [path_of(name) for name in GRAPH if part(name) is None]
    assert not missing, (
        f"{missing}: no row of ARCHITECTURE.md's module table covers them; add a row (module, part, "
        f"purpose) in the part it belongs to: a module may import only its own part and those below"
    )


def test_the_architecture_file_is_consistent():
    parts = {p.name for p in ARCH.parts}
    bad = [f"part {p.name} imports unknown {i!r}" for p in ARCH.parts for i in p.imports if i not in parts]
    bad += [
        f"part {p.name} imports {i}, which is above it"
        for p in ARCH.parts
        for i in p.imports
        if ARCH.order[i] >= ARCH.order[p.name]
    ]
    bad += [f"{r.path}: unknown part {r.part!r}" for r in ARCH.rows if r.part not in parts]
    paths = {path_of(name) for name in GRAPH}
    bad += [f"{r.path}: no such module or package" for r in ARCH.rows if not any(r.covers(p) for p in paths)]
    bad += [f"{r.path}: no purpose" for r in ARCH.rows if not r.purpose]
    assert not bad, "ARCHITECTURE.md:\n" + "\n".join(bad)


def allowance(name: str, target: str) -> str | None:
    """Why an import that reaches upward is allowed: "upward" or "pending" (a row of those tables)."""
    source, dest = path_of(name), path_of(target)
    if any(e.matches(source, dest) for e in ARCH.upward):
        return "upward"
    if any(e.matches(source, dest) for e in ARCH.pending):
        return "pending"
    return None


def reaches_up(name: str, target: str) -> bool:
    a, b = part(name), part(target)
    return a is not None and b is not None and b not in ARCH.reachable[a]


def test_no_upward_imports():
    upward = []
    for name, imports in GRAPH.items():
        for target, lazy, line in imports:
            if target == name or target not in GRAPH or not reaches_up(name, target):
                continue
            if lazy and allowance(name, target):
                continue
            upward.append(
                f"{name}:{line} imports {target} ({part(name)} -> {part(target)}{', lazily' if lazy else ''})"
            )
    assert not upward, "imports that reach upward (ARCHITECTURE.md's parts):\n" + "\n".join(upward)


def test_allowed_upward_imports_exist():
    """A row of the upward or pending table whose import is gone is stale: delete the row."""
    edges = {(path_of(n), path_of(t)) for n, imports in GRAPH.items() for t, _, _ in imports if t in GRAPH}
    stale = [
        f"{e.source} -> {e.target}"
        for e in ARCH.upward + ARCH.pending
        if not any(e.matches(source, target) for source, target in edges)
    ]
    assert not stale, "ARCHITECTURE.md allows imports that no longer exist; delete their rows:\n" + "\n".join(stale)


def test_old_paths_are_re_exports_only():
    """A module of the compat part (an old import path) is a docstring and star imports of
    the module that now defines its names, and the package's own code never imports one."""
    compat = {name for name in GRAPH if part(name) == "compat"}
    bad = []
    for name in compat:
        tree = ast.parse(MODULES[name][0].read_text())
        body = tree.body[1:] if ast.get_docstring(tree) else tree.body
        if not body or not all(isinstance(s, ast.ImportFrom) and [a.name for a in s.names] == ["*"] for s in body):
            bad.append(f"{name}: not only `from <module> import *`")
        bad += [f"{name} re-exports {t}, itself an old path" for t, _, _ in GRAPH[name] if t in compat]
    bad += [
        f"{name}:{line} imports {target}, an old path: import the module that defines the names"
        for name, imports in GRAPH.items()
        if name not in compat
        for target, _, line in imports
        if target in compat
    ]
    assert not bad, "\n".join(bad)


def test_old_paths_export_every_public_name():
    import importlib

    compat = sorted(name for name in GRAPH if part(name) == "compat")
    missing = []
    for name in compat:
        old = importlib.import_module(name)
        (target,) = [t for t, _, _ in GRAPH[name]]
        new = importlib.import_module(target)
        public = getattr(new, "__all__", None) or [k for k in vars(new) if not k.startswith("_")]
        missing += [f"{name}.{k}" for k in public if getattr(old, k, None) is not getattr(new, k)]
    assert not missing, missing


# Names a module imports from a sibling module that itself imports them: pending the work named.
REEXPORTS_PENDING = {
    # issue 22 part 1: the placement vocabulary (PlacementError, group_of) moves from plan into loading/placement
    ("transformer_hooks.loading.build", "transformer_hooks.loading.placement"),
}


def defined_and_imported(path: Path) -> tuple[set[str], set[str]]:
    """The names a module defines at top level, and those it imports (outside TYPE_CHECKING)."""
    defined: set[str] = set()
    imported: set[str] = set()

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                imported.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.If) and not is_type_checking(node.test):
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for handler in node.handlers:
                    walk(handler.body)
                walk(node.orelse)

    walk(ast.parse(path.read_text()).body)
    return defined, imported - defined


def test_imports_name_the_defining_module():
    """``from m import name`` names the module that defines ``name``, not one that imports it
    (a package's ``__init__`` is its public API and may re-export)."""
    names = {name: defined_and_imported(path) for name, (path, _) in MODULES.items()}
    bad = []
    for name, (path, is_package) in MODULES.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = node.module or ""
            if node.level:
                base = package.split(".")
                source = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            if source not in MODULES or MODULES[source][1] or (name, source) in REEXPORTS_PENDING:
                continue
            for alias in node.names:
                if alias.name in names[source][1] and f"{source}.{alias.name}" not in MODULES:
                    bad.append(f"{name}:{node.lineno} imports {alias.name} from {source}, which imports it")
    assert not bad, "import each name from the module that defines it:\n" + "\n".join(bad)


def test_readme_where_things_are_is_current():
    readme = (ROOT / "README.md").read_text()
    assert architecture.readme_section(ARCH) in readme, (
        'README\'s "Where things are" is stale: run python scripts/architecture.py --write'
    )


# weights_conversion/__main__.py is the converter's command line: an entry point, not part of the
# library the loader imports, so it may use transformer_hooks's public API (it loads the model it
# wrote to check it).
CONVERSION_ENTRY = "weights_conversion.__main__"


def test_weights_conversion_imports_only_config():
    """The converter depends on transformer_hooks.config only; the loader imports it, never the reverse."""
    bad = [
        f"{name}:{line} imports {target}"
        for name, imports in GRAPH.items()
        if name.split(".")[0] == "weights_conversion" and name != CONVERSION_ENTRY
        for target, _, line in imports
        if target.split(".")[0] != "weights_conversion" and target != "transformer_hooks.config"
    ]
    assert not bad, "\n".join(bad)


def test_tokens_imports_only_config_and_utils():
    allowed = {"transformer_hooks.config", "transformer_hooks.utils"}  # utils: TL's padding-mask rule
    bad = [t for t, _, _ in GRAPH["transformer_hooks.tokens"] if t not in allowed]
    assert not bad, f"transformer_hooks.tokens imports {bad}: tokenizer helpers need only the config and utils"


def import_cycles(skip_pending: bool = True) -> list[str]:
    """Every cycle the depth-first walk closes (lazy and TYPE_CHECKING imports counted), without
    ARCHITECTURE.md's allowed upward imports and, with ``skip_pending``, its pending ones."""
    skipped = ("upward", "pending") if skip_pending else ("upward",)
    edges = {
        name: sorted(
            {
                target
                for target, lazy, _ in imports
                if target != name and target in GRAPH and not (lazy and allowance(name, target) in skipped)
            }
        )
        for name, imports in GRAPH.items()
    }
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles()
    pending = import_cycles(skip_pending=False)
    assert not cycles, (
        "import cycles:\n" + "\n".join(cycles) + f"\n({len(pending)} with ARCHITECTURE.md's pending imports counted)"
    )


@pytest.mark.parametrize("source", ["import x", "from . import y"])
def test_the_parser_sees_lazy_and_type_checking_imports(tmp_path, source):
    """The checks above are only as good as the parser: lazy imports count, and so do TYPE_CHECKING
    ones (as lazy: not run, but a dependency)."""
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from transformer_hooks.config import ModelConfig\n"
        "if TYPE_CHECKING:\n"
        "    from transformer_hooks.model import HookedTransformer\n"
        "def f():\n"
        "    from transformer_hooks.loading import load_model\n"
        f"    {source}\n"
    )
    found = imports_of("transformer_hooks.m", path, False, {"transformer_hooks.y"})
    expected = [
        ("transformer_hooks.config", False, 2),
        ("transformer_hooks.model", True, 4),
        ("transformer_hooks.loading", True, 6),
    ]
    if source.startswith("from"):
        expected.append(("transformer_hooks.y", True, 7))
    assert found == expected
