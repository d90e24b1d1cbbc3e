"""GPT-NeoX / Pythia: rotary on a fraction of each head, LayerNorm, GELU MLP, and
(by default) a parallel residual: attention and MLP both read resid_pre.

HF quirks: q, k, v are one ``query_key_value`` Linear whose output is laid out per head
as [head, (q|k|v), d_head]; rotary settings are ``rotary_pct`` / ``rotary_emb_base`` in
older configs and ``rope_parameters.partial_rotary_factor`` / ``rope_theta`` in
transformers 5; the unembedding ``embed_out`` is untied (``lm_head`` in memory in transformers 5).
Prompts do not start with BOS by default, as in TransformerLens 3.9.
"""

from __future__ import annotations

import torch
from einops import rearrange

from transformer_hooks.config import ModelConfig

from .common import head_dim, out_from_linear, rope_parameters, rope_scaling, special_token_ids

MODEL_TYPES = ("gpt_neox",)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = head_dim(d_model, n_heads, "hidden_size", "num_attention_heads")
    rope = rope_parameters(hf)
    fraction = rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
    theta = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    return ModelConfig(
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=hf.get("intermediate_size") or 4 * d_model,
        d_vocab=hf["vocab_size"],
        n_ctx=hf["max_position_embeddings"],
        act_fn=hf.get("hidden_act", "gelu"),
        normalization_type="LN",
        eps=hf.get("layer_norm_eps", 1e-5),
        positional_embedding="rotary",
        rotary_dim=int(d_head * fraction),
        rope_theta=float(theta),
        rope_scaling=rope_scaling(rope),
        parallel_residual=hf.get("use_parallel_residual", True),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        original_architecture="GPTNeoXForCausalLM",
        default_prepend_bos=False,  # TransformerLens 3.9's default for this architecture
        **special_token_ids(hf),
    )


def _maybe(get, name: str):
    try:
        return get(name)
    except KeyError:
        return None


def convert_embeddings(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical embedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    return {"embed.W_E": get("gpt_neox.embed_in.weight")}


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    p, h = f"gpt_neox.layers.{layer}.", cfg.n_heads
    W_Q, W_K, W_V = rearrange(
        get(p + "attention.query_key_value.weight"),
        "(head qkv d_head) d_model -> qkv head d_model d_head",
        head=h,
        qkv=3,
    )
    qkv_bias = _maybe(get, p + "attention.query_key_value.bias")
    if qkv_bias is None:  # attention_bias=False
        qkv_bias = torch.zeros(3 * cfg.d_model)
    b_Q, b_K, b_V = rearrange(qkv_bias, "(head qkv d_head) -> qkv head d_head", head=h, qkv=3)
    b_O = _maybe(get, p + "attention.dense.bias")
    return {
        "ln1.w": get(p + "input_layernorm.weight"),
        "ln1.b": get(p + "input_layernorm.bias"),
        "attn.W_Q": W_Q,
        "attn.W_K": W_K,
        "attn.W_V": W_V,
        "attn.b_Q": b_Q,
        "attn.b_K": b_K,
        "attn.b_V": b_V,
        "attn.W_O": out_from_linear(get(p + "attention.dense.weight"), h),
        "attn.b_O": torch.zeros(cfg.d_model) if b_O is None else b_O,
        "ln2.w": get(p + "post_attention_layernorm.weight"),
        "ln2.b": get(p + "post_attention_layernorm.bias"),
        "mlp.W_in": get(p + "mlp.dense_h_to_4h.weight").T,
        "mlp.b_in": get(p + "mlp.dense_h_to_4h.bias"),
        "mlp.W_out": get(p + "mlp.dense_4h_to_h.weight").T,
        "mlp.b_out": get(p + "mlp.dense_4h_to_h.bias"),
    }


def convert_final(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical final-norm and unembedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    W_U = (get("gpt_neox.embed_in.weight") if cfg.tie_word_embeddings else _unembedding(get)).T
    return {
        "ln_final.w": get("gpt_neox.final_layer_norm.weight"),
        "ln_final.b": get("gpt_neox.final_layer_norm.bias"),
        "unembed.W_U": W_U,
        "unembed.b_U": torch.zeros(cfg.d_vocab),
    }


def _unembedding(get) -> torch.Tensor:
    """``embed_out.weight`` in checkpoints; a transformers 5 model in memory calls it ``lm_head.weight``."""
    try:
        return get("embed_out.weight")
    except KeyError:
        try:
            return get("lm_head.weight")
        except KeyError:
            raise KeyError("embed_out.weight") from None
