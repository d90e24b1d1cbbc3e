"""Mistral: Llama's layout and math, with sliding-window attention on every layer.

Quirks read from the config: ``sliding_window`` (None in Mistral 7B v0.2 and later: global
attention), and Llama's: ``num_key_value_heads`` (GQA), ``head_dim``, rotary settings in
either key format. The window is ``ModelConfig.attn_windows``, as GPT-Neo's local layers.
"""

from __future__ import annotations

from transformer_hooks.config import ModelConfig

from . import llama
from .common import layer_windows
from .llama import convert_block, convert_embeddings, convert_final  # noqa: F401  (HF's Llama key names)

MODEL_TYPES = ("mistral",)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    n_layers = hf["num_hidden_layers"]
    return llama.config_from_hf(hf).replace(
        attn_windows=layer_windows({"sliding_window": hf.get("sliding_window")}, ["sliding_attention"] * n_layers),
        n_ctx=hf.get("max_position_embeddings", 32768),
        original_architecture="MistralForCausalLM",
    )
