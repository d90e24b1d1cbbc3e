"""``import transformer_lens`` pointed at transformer_hooks, for running TransformerLens's own tests.

Not a TransformerLens install: each TransformerLens module path that ported code imports is an
alias of the transformer_hooks module that defines its names (``sys.modules`` entries), and the
top-level names are transformer_hooks's. A module path with no equivalent here is not aliased, so
its import fails as it would for a user (those tests are in the expected-failure list).
"""

from __future__ import annotations

import importlib
import sys

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

for _name, _targets in ALIASES.items():
    for _target in (_targets,) if isinstance(_targets, str) else _targets:
        try:
            _module = importlib.import_module(_target)
            break
        except ImportError:
            continue
    else:  # not in this version of transformer_hooks: the import fails as it would for a user
        continue
    sys.modules[f"{__name__}.{_name}"] = _module
    if "." not in _name and _name not in globals():
        globals()[_name] = _module

__version__ = transformer_hooks.__version__
