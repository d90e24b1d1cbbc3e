"""OLMo 2: Llama's attention and SwiGLU MLP with the norms moved after them
(``resid + norm(attn(resid))``: ``ModelConfig.norm_placement = "post"``, ``ln1_post`` /
``ln2_post``), and RMSNorms on the whole query and key projections before rotary
(``q_norm`` over head*d_head, ``k_norm`` over kv_head*d_head: ``qk_norm = "all"``).
"""

from __future__ import annotations

import torch

from transformer_hooks.config import ModelConfig

from . import llama
from .llama import convert_embeddings, convert_final  # noqa: F401

MODEL_TYPES = ("olmo2",)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    return llama.config_from_hf({"rms_norm_eps": 1e-5, **hf}).replace(
        norm_placement="post", qk_norm="all", original_architecture="Olmo2ForCausalLM"
    )


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    p = f"model.layers.{layer}."
    return {
        "ln1_post.w": get(p + "post_attention_layernorm.weight"),
        "ln2_post.w": get(p + "post_feedforward_layernorm.weight"),
        "attn.q_norm.w": get(p + "self_attn.q_norm.weight"),
        "attn.k_norm.w": get(p + "self_attn.k_norm.weight"),
        **llama.attention_and_mlp(cfg, get, layer),
    }
