"""Llama (and SmolLM2): rotary on whole heads, RMSNorm, gated SwiGLU MLP, grouped-query
attention, no biases unless ``attention_bias`` / ``mlp_bias``.

Quirks read from the config: ``num_key_value_heads`` (GQA; k/v keep n_kv_heads),
``head_dim`` (may differ from hidden_size / num_attention_heads), ``rope_theta`` and
``rope_scaling`` (``linear`` or Llama 3.1's ``llama3``) in either key format.
"""

from __future__ import annotations

import torch

from transformer_hooks.config import ModelConfig

from .common import head_dim, heads_from_linear, out_from_linear, rope_parameters, rope_scaling, special_token_ids

MODEL_TYPES = ("llama",)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = rope_parameters(hf)
    return ModelConfig(
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        d_head=hf.get("head_dim") or head_dim(d_model, n_heads, "hidden_size", "num_attention_heads"),
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_mlp=hf["intermediate_size"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        act_fn=hf.get("hidden_act", "silu"),
        normalization_type="RMS",
        eps=hf.get("rms_norm_eps", 1e-6),
        positional_embedding="rotary",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling(rope),
        gated_mlp=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        original_architecture="LlamaForCausalLM",
        **special_token_ids(hf),
    )


def convert_embeddings(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical embedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    return {"embed.W_E": get("model.embed_tokens.weight")}


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    p = f"model.layers.{layer}."
    return {
        "ln1.w": get(p + "input_layernorm.weight"),
        "ln2.w": get(p + "post_attention_layernorm.weight"),
        **attention_and_mlp(cfg, get, layer),
    }


def attention_and_mlp(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """A block's q/k/v/o and gated-MLP tensors under HF's Llama key names (shared by the
    Llama-like families: Mistral, Qwen, Gemma, OLMo 2); absent biases are zeros. Block
    ``layer`` of the config ``cfg``, read by ``get(hf_name)``."""
    p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
    h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head

    def bias(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            return get(name).reshape(shape)
        except KeyError:  # attention_bias / mlp_bias off
            return torch.zeros(shape)

    return {
        "attn.W_Q": heads_from_linear(get(a + "q_proj.weight"), h),
        "attn.W_K": heads_from_linear(get(a + "k_proj.weight"), kv),
        "attn.W_V": heads_from_linear(get(a + "v_proj.weight"), kv),
        "attn.b_Q": bias(a + "q_proj.bias", (h, dh)),
        "attn.b_K": bias(a + "k_proj.bias", (kv, dh)),
        "attn.b_V": bias(a + "v_proj.bias", (kv, dh)),
        "attn.W_O": out_from_linear(get(a + "o_proj.weight"), h),
        "attn.b_O": bias(a + "o_proj.bias", (cfg.d_model,)),
        "mlp.W_gate": get(p + "mlp.gate_proj.weight").T,
        "mlp.b_gate": bias(p + "mlp.gate_proj.bias", (cfg.d_mlp,)),
        "mlp.W_in": get(p + "mlp.up_proj.weight").T,
        "mlp.b_in": bias(p + "mlp.up_proj.bias", (cfg.d_mlp,)),
        "mlp.W_out": get(p + "mlp.down_proj.weight").T,
        "mlp.b_out": bias(p + "mlp.down_proj.bias", (cfg.d_model,)),
    }


def convert_final(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical final-norm and unembedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    W_U = get("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight").T
    return {"ln_final.w": get("model.norm.weight"), "unembed.W_U": W_U, "unembed.b_U": torch.zeros(cfg.d_vocab)}
