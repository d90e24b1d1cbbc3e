"""Every public function and class has a docstring that names its parameters (issue 24, point 3).

Public: a module-level or class-level ``def`` / ``class`` whose name does not start with ``_``,
in a module of transformer_hooks/ or weights_conversion/ that is not under a private path
(``_x.py``, ``_pkg/``). A function's docstring must name every parameter (``self`` / ``cls``
aside, ``*args`` and ``**kwargs`` included) as a word; an ``__init__``'s parameters may be
named in its own docstring or in the class's. Property setters (``@x.setter``) share the
getter's docstring and ``@overload`` stubs the implementation's; neither is checked. The
files are read with ``ast``: nothing is imported for the general check.

``HookedTransformer``, ``from_pretrained`` and ``generate`` take keyword arguments through
``**kwargs`` / an options object: their docstrings must list every one by name (checked
against ``LoadOptions``'s fields and ``generate.generate``'s signature).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transformer_hooks", "weights_conversion")

# "path:qualified name" -> why it may lack a docstring or a parameter's name. Keep it empty
# unless a name truly cannot be documented; each entry says why.
ALLOWED: dict[str, str] = {}


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return names


def _unnamed(params: list[str], doc: str) -> list[str]:
    return [p for p in params if not re.search(rf"\b{re.escape(p)}\b", doc)]


def _skipped(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for d in fn.decorator_list:
        if isinstance(d, ast.Name) and d.id == "overload":
            return True
        if isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter"):
            return True
    return False


def problems(source: str, where: str) -> Iterator[str]:
    """One line per public name of ``source`` (a module's text) without a docstring, or with
    a parameter its docstring does not name; ``where`` prefixes each line."""

    def visit(body: list[ast.stmt], prefix: str) -> Iterator[str]:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                name = prefix + node.name
                doc = ast.get_docstring(node)
                if not doc:
                    yield f"{where}:{node.lineno} class {name}: no docstring"
                else:
                    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                    if init is not None and not _skipped(init):
                        both = doc + "\n" + (ast.get_docstring(init) or "")
                        missing = _unnamed(_params(init), both)
                        if missing:
                            yield f"{where}:{node.lineno} class {name}: __init__ parameters not named: {missing}"
                yield from visit(node.body, name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_") or _skipped(node):
                    continue
                name = prefix + node.name
                doc = ast.get_docstring(node)
                if not doc:
                    yield f"{where}:{node.lineno} {name}: no docstring"
                    continue
                missing = _unnamed(_params(node), doc)
                if missing:
                    yield f"{where}:{node.lineno} {name}: parameters not named: {missing}"

    yield from visit(ast.parse(source).body, "")


def public_modules() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT / package).parts
            if any(p.startswith("_") and p not in ("__init__.py", "__main__.py") for p in parts):
                continue
            files.append(path)
    return files


def _key(path: str, line: str) -> str:
    """``path:qualified name`` of a ``problems`` line, as ``ALLOWED`` spells it."""
    return path + ":" + line.split(" ", 1)[1].split(":", 1)[0].removeprefix("class ")


def test_every_public_function_and_class_has_a_docstring_naming_its_parameters():
    found, seen = [], set()
    for path in public_modules():
        rel = path.relative_to(ROOT).as_posix()
        for line in problems(path.read_text(), rel):
            seen.add(_key(rel, line))
            if _key(rel, line) not in ALLOWED:
                found.append(line)
    assert not found, (
        f"{len(found)} public names lack a docstring or do not name a parameter in it (Google style: an "
        f"``Args:`` section, or the name in ``double backquotes`` in the text):\n" + "\n".join(found)
    )
    stale = sorted(set(ALLOWED) - seen)
    assert not stale, f"documented now, remove from ALLOWED: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values()), "every ALLOWED entry needs its reason"


def test_the_check_finds_what_it_should():
    source = '''
def documented(a, *rest, key=1, **options):
    """Uses ``a``, ``rest``, ``key`` and ``options``."""

def bare(x):
    pass

def half(alpha, beta):
    """Only ``alpha``: a word that merely contains the other name (alphabet, betamax) does not count."""

def _private(y):
    pass

class Klass:
    """Takes ``size``."""

    def __init__(self, size, other):
        pass

    @property
    def value(self):
        """The value."""

    @value.setter
    def value(self, new):
        pass

class Quiet:
    def method(self):
        """Documented."""
'''
    found = "\n".join(problems(source, "m.py"))
    assert "bare: no docstring" in found
    assert "half: parameters not named: ['beta']" in found
    assert "class Klass: __init__ parameters not named: ['other']" in found
    assert "class Quiet: no docstring" in found
    assert "documented" not in found and "_private" not in found and "value" not in found
    assert len(found.splitlines()) == 4


def test_from_pretrained_lists_every_load_option():
    from transformer_hooks.loading.options import LoadOptions
    from transformer_hooks.model import HookedTransformer

    doc = inspect.getdoc(HookedTransformer.from_pretrained) or ""
    fields = [f.name for f in dataclasses.fields(LoadOptions)]
    assert fields, "LoadOptions has no fields?"
    missing = _unnamed(fields, doc)
    assert not missing, f"from_pretrained's docstring does not list the LoadOptions fields {missing}"


def test_generate_lists_every_argument_it_forwards():
    from transformer_hooks.generate import generate
    from transformer_hooks.model import HookedTransformer

    doc = inspect.getdoc(HookedTransformer.generate) or ""
    forwarded = [p for p in inspect.signature(generate).parameters if p != "model"]
    missing = _unnamed(forwarded, doc)
    assert not missing, f"HookedTransformer.generate's docstring does not list {missing} (generate.generate's)"


def test_hooked_transformer_lists_its_constructor_arguments():
    from transformer_hooks.model import HookedTransformer

    doc = inspect.getdoc(HookedTransformer) or ""
    params = [p for p in inspect.signature(HookedTransformer.__init__).parameters if p != "self"]
    assert not _unnamed(params, doc), f"HookedTransformer's docstring does not name {_unnamed(params, doc)}"
