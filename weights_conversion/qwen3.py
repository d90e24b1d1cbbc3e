"""Qwen 3: Qwen 2's layout (biases only with ``attention_bias``, on q, k, v and o) plus an
RMSNorm on each head's queries and keys before rotary (``q_norm`` / ``k_norm``, over d_head:
``ModelConfig.qk_norm = "head"``), and Qwen 2's optional sliding windows.
"""

from __future__ import annotations

import torch

from transformer_hooks.config import ModelConfig

from . import llama
from .llama import convert_embeddings, convert_final  # noqa: F401
from .qwen2 import qwen_windows

MODEL_TYPES = ("qwen3",)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    return llama.config_from_hf(hf).replace(
        attn_windows=qwen_windows(hf),
        qk_norm="head",
        n_ctx=hf.get("max_position_embeddings", 32768),
        original_architecture="Qwen3ForCausalLM",
        default_prepend_bos=False,  # TransformerLens 3.9's default for this architecture
    )


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    a = f"model.layers.{layer}.self_attn."
    return {
        **llama.convert_block(cfg, get, layer),
        "attn.q_norm.w": get(a + "q_norm.weight"),
        "attn.k_norm.w": get(a + "k_norm.weight"),
    }
