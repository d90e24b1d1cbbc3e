"""transformer_hooks: readable hooked transformers (GPT-2, GPT-Neo, Pythia/NeoX, Llama)
with TransformerLens's hook names, for mechanistic interpretability."""

from .config import ModelConfig
from .factored_matrix import FactoredMatrix
from .hooks import HookPoint, HookShapeError, UnknownHookError
from .model import HookedTransformer

__all__ = ["FactoredMatrix", "HookedTransformer", "HookPoint", "HookShapeError", "ModelConfig", "UnknownHookError"]
__version__ = "0.1.0"
