"""Model components, each small and driven only by ModelConfig."""

from .attention import Attention
from .block import Block, ParallelBlock, SequentialBlock, make_block
from .embed import Embed, PosEmbed, Unembed
from .kv_cache import KVCache
from .masks import AttentionMask
from .mlp import MLP, GatedMLP, make_mlp
from .norms import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, make_norm
from .rotary import Rotary

__all__ = [
    "Attention",
    "AttentionMask",
    "Block",
    "Embed",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "LayerNormPre",
    "MLP",
    "ParallelBlock",
    "PosEmbed",
    "RMSNorm",
    "RMSNormPre",
    "Rotary",
    "SequentialBlock",
    "Unembed",
    "make_block",
    "make_mlp",
    "make_norm",
]
