"""transformer_hooks: readable hooked transformers (GPT-2, GPT-Neo, Pythia/NeoX, Llama)
with TransformerLens's hook names, for mechanistic interpretability."""

from .cache import ActivationCache
from .config import ModelConfig
from .factored_matrix import FactoredMatrix
from .hooks import HookedRootModule, HookPoint, HookShapeError, UnknownHookError
from .model import HookedTransformer
from .tl.config import HookedTransformerConfig

__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "HookedRootModule",
    "HookedTransformer",
    "HookedTransformerConfig",
    "HookPoint",
    "HookShapeError",
    "ModelConfig",
    "UnknownHookError",
]
__version__ = "0.1.0"
