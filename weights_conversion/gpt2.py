"""GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, sequential residual.

HF quirks: ``Conv1D`` stores weights as [in, out] (the transpose of ``nn.Linear``);
q, k, v are one fused ``c_attn`` of width 3*d_model; ``scale_attn_weights=False`` turns
off the 1/sqrt(d_head) scaling and ``scale_attn_by_inverse_layer_idx`` divides scores
by layer+1. The unembedding is tied to the embedding unless the config says otherwise.
"""

from __future__ import annotations

import torch
from einops import rearrange

from transformer_hooks.config import ModelConfig

from .common import head_dim, special_token_ids

MODEL_TYPES = ("gpt2",)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=n_heads,
        d_head=head_dim(d_model, n_heads, "n_embd", "n_head"),
        d_mlp=hf.get("n_inner") or 4 * d_model,
        d_vocab=hf["vocab_size"],
        n_ctx=hf["n_positions"],
        act_fn=hf.get("activation_function", "gelu_new"),
        normalization_type="LN",
        eps=hf.get("layer_norm_epsilon", 1e-5),
        positional_embedding="learned",
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        original_architecture="GPT2LMHeadModel",
        **special_token_ids(hf),
    )


def convert_embeddings(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical embedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    return {"embed.W_E": get("transformer.wte.weight"), "pos_embed.W_pos": get("transformer.wpe.weight")}


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    p = f"transformer.h.{layer}."
    W_Q, W_K, W_V = rearrange(
        get(p + "attn.c_attn.weight"), "d_model (qkv head d_head) -> qkv head d_model d_head", qkv=3, head=cfg.n_heads
    )
    b_Q, b_K, b_V = rearrange(
        get(p + "attn.c_attn.bias"), "(qkv head d_head) -> qkv head d_head", qkv=3, head=cfg.n_heads
    )
    return {
        "ln1.w": get(p + "ln_1.weight"),
        "ln1.b": get(p + "ln_1.bias"),
        "attn.W_Q": W_Q,
        "attn.W_K": W_K,
        "attn.W_V": W_V,
        "attn.b_Q": b_Q,
        "attn.b_K": b_K,
        "attn.b_V": b_V,
        "attn.W_O": rearrange(
            get(p + "attn.c_proj.weight"), "(head d_head) d_model -> head d_head d_model", head=cfg.n_heads
        ),
        "attn.b_O": get(p + "attn.c_proj.bias"),
        "ln2.w": get(p + "ln_2.weight"),
        "ln2.b": get(p + "ln_2.bias"),
        "mlp.W_in": get(p + "mlp.c_fc.weight"),
        "mlp.b_in": get(p + "mlp.c_fc.bias"),
        "mlp.W_out": get(p + "mlp.c_proj.weight"),
        "mlp.b_out": get(p + "mlp.c_proj.bias"),
    }


def convert_final(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical final-norm and unembedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    W_U = get("transformer.wte.weight" if cfg.tie_word_embeddings else "lm_head.weight").T
    return {
        "ln_final.w": get("transformer.ln_f.weight"),
        "ln_final.b": get("transformer.ln_f.bias"),
        "unembed.W_U": W_U,
        "unembed.b_U": torch.zeros(cfg.d_vocab),
    }
