"""TransformerLens's ``hook_points`` module: ``HookPoint`` and ``HookedRootModule`` (defined in
``hooks.py``), so ``from transformer_lens.hook_points import HookPoint, HookedRootModule``
ports with an import change."""

from ..hook_cache import HookCache
from ..hooks import HookedRootModule, HookFn, HookPoint, NameFilter

NamesFilter = NameFilter  # TransformerLens's spelling

__all__ = ["HookCache", "HookFn", "HookPoint", "HookedRootModule", "NameFilter", "NamesFilter"]
