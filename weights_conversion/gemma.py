"""Gemma 1, 2 and 3 (text): Llama's layout with

- embeddings multiplied by sqrt(d_model), rounded to the model's dtype (``embed_scale``);
- RMSNorms that multiply by ``1 + w``: stored here as the weight ``1 + w`` (computed in
  float32), so every norm is a plain RMSNorm and ``fold_ln`` needs nothing new (as
  TransformerLens stores them);
- a GeGLU MLP (gated, ``gelu_pytorch_tanh``; Gemma 1's legacy ``hidden_act="gelu"`` means
  the tanh approximation too, as HF reads it);
- tied embeddings.

Gemma 2 and 3 add norms on the attention and MLP outputs (``norm_placement = "both"``:
HF's ``post_attention_layernorm`` is ``ln1_post``, ``pre_feedforward_layernorm`` ``ln2``,
``post_feedforward_layernorm`` ``ln2_post``), scores scaled by
``query_pre_attn_scalar ** -0.5``, and local (sliding-window) layers: every other layer from
the first in Gemma 2, five of every six in Gemma 3 (``sliding_window_pattern``), or
transformers 5's ``layer_types``. Gemma 2 soft-caps attention scores (``attn_logit_softcapping``)
and logits (``final_logit_softcapping``). Gemma 3 normalises each head's queries and keys
(``q_norm`` / ``k_norm``, also ``1 + w``) and rotates its local layers with their own base
(``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]``).

Gemma 3's multimodal checkpoints (``model_type="gemma3"``, 4B and up) load as their language
model: the config's ``text_config`` (whose missing keys take Gemma3TextConfig's defaults, as
the hub's configs leave most out), tensors under ``language_model.model.`` (as saved) or
``model.language_model.`` (a transformers 5 model in memory). The vision tower is not loaded.
"""

from __future__ import annotations

import math

import torch

from transformer_hooks.config import ModelConfig

from . import llama
from .common import layer_windows, rope_parameters, rope_scaling

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Gemma3TextConfig's defaults for the keys the hub's multimodal configs leave out of text_config.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
# Where a multimodal checkpoint keeps its language model's "model.*" tensors and its lm_head.
_TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_HEAD_PREFIXES = ("", "language_model.")


def _text_model(get):
    """``get`` that finds ``model.*`` / ``lm_head.*`` names inside a multimodal checkpoint too."""

    def text_get(name: str) -> torch.Tensor:
        head = not name.startswith("model.")
        for prefix in _HEAD_PREFIXES if head else _TEXT_PREFIXES:
            try:
                return get(prefix + (name if head else name.removeprefix("model.")))
            except KeyError:
                continue
        raise KeyError(name)

    return text_get


def _activation(hf: dict) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _rope(hf: dict) -> tuple[dict, float | None]:
    """(global rotary parameters, local base or None) from either key format."""
    nested = hf.get("rope_parameters") or {}
    if "full_attention" in nested:  # transformers 5, Gemma 3: one entry per layer type
        local = nested.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(
                f"unsupported rope scaling {local['rope_type']!r} on Gemma 3's local layers; "
                f"transformer_hooks scales only the global layers' rotary"
            )
        return dict(nested["full_attention"]), float(local.get("rope_theta", 10000.0))
    params = rope_parameters(hf)
    if hf["model_type"] == "gemma3_text":
        params.setdefault("rope_theta", 1_000_000.0)
        return params, float(hf.get("rope_local_base_freq", 10000.0))
    return params, None


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    if hf["model_type"] == "gemma3":  # multimodal: its language model
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings") if k in hf}
        text = {**_GEMMA3_TEXT_DEFAULTS, **hf["text_config"], **ids, "model_type": "gemma3_text"}
        # HF's Gemma3ForConditionalGeneration never soft-caps its logits (None in every released config).
        return config_from_hf(text).replace(
            original_architecture="Gemma3ForConditionalGeneration", final_logit_softcap=None
        )
    model_type, n_layers, d_model = hf["model_type"], hf["num_hidden_layers"], hf["hidden_size"]
    later = model_type != "gemma"  # Gemma 2 and 3
    if hf.get("use_bidirectional_attention"):
        raise ValueError(
            "use_bidirectional_attention=True (an encoder-style Gemma) is not supported: "
            "transformer_hooks implements causal attention"
        )
    rope, local_theta = _rope(hf)
    if model_type == "gemma2":
        implied = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    else:
        pattern = hf.get("sliding_window_pattern", 6)
        implied = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    softcaps = (50.0, 30.0) if model_type == "gemma2" else (None, None)
    base = llama.config_from_hf(
        {
            "head_dim": 256,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            **hf,
            "rope_parameters": rope,
            "rope_scaling": None,
        }
    )
    return base.replace(
        act_fn=_activation(hf),
        embed_scale=float(torch.tensor(d_model**0.5, dtype=torch.float32)),  # HF's float32 buffer
        norm_placement="both" if later else "pre",
        attn_scale=math.sqrt(hf.get("query_pre_attn_scalar", 256)) if later else None,
        attn_windows=layer_windows({"sliding_window": 4096, **hf}, implied) if later else None,
        attn_logit_softcap=hf.get("attn_logit_softcapping", softcaps[0]) if later else None,
        final_logit_softcap=hf.get("final_logit_softcapping", softcaps[1]) if later else None,
        qk_norm="head" if model_type == "gemma3_text" else None,
        local_rope_theta=local_theta,
        rope_scaling=rope_scaling(rope),
        original_architecture=_ARCHITECTURES[model_type],
    )


def _norm(get, name: str) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by ``1 + w`` (in float32): store that."""
    return get(name).float() + 1


def convert_embeddings(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical embedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    return llama.convert_embeddings(cfg, _text_model(get))


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    get = _text_model(get)
    p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
    out = llama.attention_and_mlp(cfg, get, layer)
    out["ln1.w"] = _norm(get, p + "input_layernorm.weight")
    if cfg.norm_placement == "pre":  # Gemma 1: Llama's two norms
        out["ln2.w"] = _norm(get, p + "post_attention_layernorm.weight")
    else:
        out["ln1_post.w"] = _norm(get, p + "post_attention_layernorm.weight")
        out["ln2.w"] = _norm(get, p + "pre_feedforward_layernorm.weight")
        out["ln2_post.w"] = _norm(get, p + "post_feedforward_layernorm.weight")
    if cfg.qk_norm is not None:
        out["attn.q_norm.w"] = _norm(get, a + "q_norm.weight")
        out["attn.k_norm.w"] = _norm(get, a + "k_norm.weight")
    return out


def convert_final(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical final-norm and unembedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    get = _text_model(get)
    return {**llama.convert_final(cfg, get), "ln_final.w": _norm(get, "model.norm.weight")}
