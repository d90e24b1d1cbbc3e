"""``import transformer_lens`` pointed at transformer_hooks, for running TransformerLens's own tests.

Not a TransformerLens install: each TransformerLens module path that ported code imports is an
alias of the transformer_hooks module that defines its names (``sys.modules`` entries), and the
top-level names are transformer_hooks's. A module path with no equivalent here is not aliased, so
its import fails as it would for a user (those tests are in the expected-failure list). The few
TransformerLens internals in ``PRIVATE`` get placeholders here, in the harness, that fail when used.
"""

from __future__ import annotations

import importlib
import sys
import types

import transformer_hooks
from transformer_hooks import (  # noqa: F401 (TransformerLens's top-level names)
    ActivationCache,
    FactoredMatrix,
    HookedRootModule,
    HookedTransformer,
    HookedTransformerConfig,
    HookPoint,
    evals,
    hook_points,
    loading_from_pretrained,
    patching,
)

# TransformerLens module path -> the transformer_hooks module that holds its names (the first of
# several that imports).
ALIASES: dict[str, str | tuple[str, ...]] = {
    "utils": ("transformer_hooks.utilities", "transformer_hooks.utils"),  # TL 3.x: utils is utilities
    "utilities": "transformer_hooks.utilities",
    "hook_points": "transformer_hooks.hook_points",
    "HookedRootModule": "transformer_hooks.hook_points",
    "HookedTransformer": "transformer_hooks.model",
    "ActivationCache": "transformer_hooks.cache",
    "FactoredMatrix": "transformer_hooks.factored_matrix",
    "HookedTransformerConfig": ("transformer_hooks.tl.config", "transformer_hooks.config"),
    "config": ("transformer_hooks.tl.config", "transformer_hooks.config"),
    "config.hooked_transformer_config": ("transformer_hooks.tl.config", "transformer_hooks.config"),
    "evals": "transformer_hooks.evals",
    "patching": "transformer_hooks.patching",
    "loading_from_pretrained": "transformer_hooks.loading_from_pretrained",
    "components": "transformer_hooks.components",
}

# TransformerLens internals that a test module imports at module level beside the public names
# its other tests use: without them the whole module fails to import and its public tests never
# run. Each is a placeholder defined here, in the harness only (never in transformer_hooks), that
# fails when used, so exactly the tests that use it fail (expected_failures.txt: "private").
PRIVATE: dict[str, tuple[str, ...]] = {
    "hook_points": ("HookIntrospectionMixin",),  # test_hook_introspection.py: list_hooks, repr
    "loading_from_pretrained": ("_mxfp4_dequantize_config",),  # ...utilities.py: fill_missing_keys
    "components": ("GroupedQueryAttention",),  # test_grouped_query_attention.py: the ungroup flag
}


class _Private:
    """A TransformerLens internal not ported: making one, or reading a name it would provide
    (also through a test's subclass), raises."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"{type(self).__name__} is a TransformerLens internal, not ported")

    def __getattr__(self, attr: str) -> object:
        raise NotImplementedError(f"{attr}: a TransformerLens internal's name, not ported")


def _private(module: types.ModuleType, name: str) -> object:
    if name[0].isupper():
        return type(name, (_Private,), {"__module__": module.__name__})

    def private(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"{name} is a TransformerLens internal, not ported")

    return private


def _with_private(name: str, module: types.ModuleType) -> types.ModuleType:
    """``module`` as seen from ``transformer_lens.<name>``: its names, plus the placeholders of
    ``PRIVATE[name]`` (a separate module object, so transformer_hooks's module gains nothing)."""
    view = types.ModuleType(f"{__name__}.{name}", module.__doc__)
    view.__dict__["__getattr__"] = lambda attr: getattr(module, attr)
    for private in PRIVATE[name]:
        setattr(view, private, _private(view, private))
    return view


for _name, _targets in ALIASES.items():
    for _target in (_targets,) if isinstance(_targets, str) else _targets:
        try:
            _module = importlib.import_module(_target)
            break
        except ImportError:
            continue
    else:  # not in this version of transformer_hooks: the import fails as it would for a user
        continue
    if _name in PRIVATE:
        _module = _with_private(_name, _module)
    sys.modules[f"{__name__}.{_name}"] = _module
    if "." not in _name and _name not in globals():
        globals()[_name] = _module

__version__ = transformer_hooks.__version__
