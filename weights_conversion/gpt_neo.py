"""GPT-Neo: GPT-2's layout with ``nn.Linear`` weights and separate q/k/v (no q/k/v bias).

Quirks: attention scores are *not* scaled by 1/sqrt(d_head) (``attn_scale=1``), and
layers alternate global and local attention; a local layer lets a query see only the
``window_size`` most recent positions (itself included).
"""

from __future__ import annotations

import torch

from transformer_hooks.config import ModelConfig

from . import gpt2
from .common import head_dim, heads_from_bias, heads_from_linear, out_from_linear, special_token_ids

MODEL_TYPES = ("gpt_neo",)
# The embeddings, final norm and unembedding are stored under GPT-2's names.
convert_embeddings, convert_final = gpt2.convert_embeddings, gpt2.convert_final


def attention_layers(hf: dict) -> list[str]:
    """Each layer's attention kind (``global`` or ``local``) from the HF config ``hf``."""
    if hf.get("attention_layers"):
        return list(hf["attention_layers"])
    return [kind for kinds, repeat in hf["attention_types"] for _ in range(repeat) for kind in kinds]


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    d_model, n_heads = hf["hidden_size"], hf["num_heads"]
    window = hf.get("window_size", 256)
    return ModelConfig(
        d_model=d_model,
        n_layers=hf["num_layers"],
        n_heads=n_heads,
        d_head=head_dim(d_model, n_heads, "hidden_size", "num_heads"),
        d_mlp=hf.get("intermediate_size") or 4 * d_model,
        d_vocab=hf["vocab_size"],
        n_ctx=hf["max_position_embeddings"],
        act_fn=hf.get("activation_function", "gelu_new"),
        normalization_type="LN",
        eps=hf.get("layer_norm_epsilon", 1e-5),
        positional_embedding="learned",
        attn_scale=1.0,
        attn_windows=tuple(window if kind == "local" else None for kind in attention_layers(hf)),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        original_architecture="GPTNeoForCausalLM",
        **special_token_ids(hf),
    )


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    p, h, dh = f"transformer.h.{layer}.", cfg.n_heads, cfg.d_head
    a = p + "attn.attention."
    return {
        "ln1.w": get(p + "ln_1.weight"),
        "ln1.b": get(p + "ln_1.bias"),
        "attn.W_Q": heads_from_linear(get(a + "q_proj.weight"), h),
        "attn.W_K": heads_from_linear(get(a + "k_proj.weight"), h),
        "attn.W_V": heads_from_linear(get(a + "v_proj.weight"), h),
        "attn.b_Q": heads_from_bias(None, h, dh),
        "attn.b_K": heads_from_bias(None, h, dh),
        "attn.b_V": heads_from_bias(None, h, dh),
        "attn.W_O": out_from_linear(get(a + "out_proj.weight"), h),
        "attn.b_O": get(a + "out_proj.bias"),
        "ln2.w": get(p + "ln_2.weight"),
        "ln2.b": get(p + "ln_2.bias"),
        "mlp.W_in": get(p + "mlp.c_fc.weight").T,
        "mlp.b_in": get(p + "mlp.c_fc.bias"),
        "mlp.W_out": get(p + "mlp.c_proj.weight").T,
        "mlp.b_out": get(p + "mlp.c_proj.bias"),
    }
