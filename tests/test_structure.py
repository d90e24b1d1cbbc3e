"""Imports run one way (issue 17): no cycles, no upward imports.

Every import in transformer_hooks/ and weights_conversion/ is read with ``ast``, at module
level and inside functions (a lazy import that reaches upward is still an upward import).
Imports under ``if TYPE_CHECKING:`` are not run, but a type is a dependency too: they count
as lazy imports (so a low module cannot name a type from a module above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transformer_hooks", "weights_conversion")

# The layers, lowest first. A module may import its own layer and the layers below it.
CONFIG, CONVERSION, LOW, HOOKS, COMPONENTS, MODEL, WORKFLOWS, LOADING, ENTRY = range(9)
LAYER_NAMES = ["config", "weights_conversion", "low", "hooks", "components", "model", "workflows", "loading", "entry"]

# transformer_hooks modules by layer (a package's name stands for its __init__.py). A module
# that is not here fails test_every_module_is_ranked: add it to the layer it belongs to.
RANKS: dict[str, int] = {
    "config": CONFIG,
    "tl": CONFIG,  # the TransformerLens compatibility layer (tl/): each module where its imports put it
    "tl.config": CONFIG,  # HookedTransformerConfig: a spelling of ModelConfig (weights_conversion reads it)
    **dict.fromkeys(
        [
            "utils",
            "sites",
            "memory",
            "presets",
            "resolution",
            "factored_matrix",
            "tables",
            "tl_config",
            "tl.loading_from_pretrained",
            "utilities",
            "tl.utilities",
            "dtypes",
            "process_group",
        ],
        LOW,
    ),
    "hooks": HOOKS,
    "hook_points": HOOKS,  # TransformerLens's module name for the registry: re-exports tl.hook_points
    "tl.hook_points": HOOKS,
    **dict.fromkeys(
        [
            "components",
            "components.attention",
            "components.block",
            "components.embed",
            "components.kv_cache",
            "components.linear",
            "components.masks",
            "components.mlp",
            "components.norms",
            "components.rotary",
            "components.softcap",
        ],
        COMPONENTS,
    ),
    "model": MODEL,
    "tokens": MODEL,
    **dict.fromkeys(
        [
            "cache",
            "processing",
            "generate",
            "patching",
            "patching.engine",
            "patching.sweeps",
            "patching.attribution",
            "patching.ablation",
            "trace",
            "circuits",
            "evals",
            "tl.evals",
            "lens",
            "dla",
            "parity",
            "plots",
            "steering",
            "sae",
            "sae.core",
            "sae.features",
            "sae.splice",
            "sae.training",
            "das",
            "activations",
            "plan",
            "distributed",
        ],
        WORKFLOWS,
    ),
    **dict.fromkeys(
        [
            "loading",
            "loading.build",
            "loading.offload",
            "loading.pipeline",
            "loading.placement",
        ],
        LOADING,
    ),
    "loading_from_pretrained": LOADING,  # re-exports tl.loading_from_pretrained (kept where it was)
    **dict.fromkeys(["", "cli", "__main__"], ENTRY),  # "" is transformer_hooks/__init__.py, the public API
}

# The only imports allowed to reach upward. Each is lazy (inside a function), so importing
# the lower module never imports the upper one.
ALLOWED_LAZY_UPWARD = {
    ("transformer_hooks.model", "transformer_hooks.loading"),  # from_pretrained / process_weights_
    ("transformer_hooks.model", "transformer_hooks.cache"),  # run_with_cache wraps ActivationCache
    ("transformer_hooks.model", "transformer_hooks.generate"),  # model.generate
    ("transformer_hooks.model", "transformer_hooks.trace"),  # model.trace
}

# weights_conversion/__main__.py is the converter's command line: an entry point, not part of the
# library the loader imports, so it may use transformer_hooks's public API (it loads the model it
# wrote to check it).
CONVERSION_ENTRY = "weights_conversion.__main__"


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


def rank(name: str) -> int | None:
    if name.split(".")[0] == "weights_conversion":
        return ENTRY if name == CONVERSION_ENTRY else CONVERSION
    return RANKS.get(name.removeprefix("transformer_hooks").removeprefix("."))


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in found.items()}


GRAPH = graph()


def test_every_module_is_ranked():
    unranked = [name for name in GRAPH if rank(name) is None]
    assert not unranked, (
        f"{unranked}: not in tests/test_structure.py's RANKS table; add each to the layer it belongs to "
        f"({', '.join(LAYER_NAMES)}): a module may import only its own layer and those below"
    )


def test_no_upward_imports():
    upward = []
    for name, imports in GRAPH.items():
        for target, lazy, line in imports:
            if target == name or rank(target) is None or rank(name) is None:
                continue
            if rank(target) > rank(name) and not (lazy and (name, target) in ALLOWED_LAZY_UPWARD):
                upward.append(
                    f"{name}:{line} imports {target} ({LAYER_NAMES[rank(name)]} -> {LAYER_NAMES[rank(target)]}"
                    f"{', lazily' if lazy else ''})"
                )
    assert not upward, "imports that reach upward:\n" + "\n".join(upward)


def test_weights_conversion_imports_only_config():
    """The converter depends on transformer_hooks.config only (and tl.config, TransformerLens's spelling
    of it, for TransformerLens checkpoints); the loader imports it, never the reverse."""
    bad = [
        f"{name}:{line} imports {target}"
        for name, imports in GRAPH.items()
        if name.split(".")[0] == "weights_conversion" and name != CONVERSION_ENTRY
        for target, _, line in imports
        if target.split(".")[0] != "weights_conversion"
        and target not in ("transformer_hooks.config", "transformer_hooks.tl.config", "transformer_hooks.tl")
    ]
    assert not bad, "\n".join(bad)


def test_tokens_imports_only_config_and_utils():
    allowed = {"transformer_hooks.config", "transformer_hooks.utils"}  # utils: TL's padding-mask rule
    bad = [t for t, _, _ in GRAPH["transformer_hooks.tokens"] if t not in allowed]
    assert not bad, f"transformer_hooks.tokens imports {bad}: tokenizer helpers need only the config and utils"


def test_no_import_cycles():
    edges = {
        name: sorted(
            {
                target
                for target, lazy, _ in imports
                if target != name and target in GRAPH and not (lazy and (name, target) in ALLOWED_LAZY_UPWARD)
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
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


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
