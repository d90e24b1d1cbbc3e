"""Small reshapes shared by the family converters (HF layouts -> canonical shapes)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange


def head_dim(d_model: int, n_heads: int, width_key: str, heads_key: str) -> int:
    """d_model / n_heads, refusing a head count that does not divide the width."""
    if n_heads <= 0 or d_model % n_heads:
        raise ValueError(
            f"{width_key}={d_model} is not a multiple of {heads_key}={n_heads}: the config is "
            f"inconsistent (each head gets d_model / n_heads dims)"
        )
    return d_model // n_heads


def special_token_ids(hf: dict) -> dict[str, Any]:
    """The BOS, EOS and padding token ids an HF config names (None where it names none)."""
    return {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def heads_from_linear(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """nn.Linear weight [head*d_head, d_model] -> [head, d_model, d_head] (a view)."""
    return rearrange(weight, "(head d_head) d_model -> head d_model d_head", head=n_heads)


def heads_from_bias(bias: torch.Tensor | None, n_heads: int, d_head: int) -> torch.Tensor:
    return torch.zeros(n_heads, d_head) if bias is None else bias.reshape(n_heads, d_head)


def out_from_linear(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """nn.Linear weight [d_model, head*d_head] -> W_O [head, d_head, d_model] (a view)."""
    return rearrange(weight, "d_model (head d_head) -> head d_head d_model", head=n_heads)


def rope_parameters(hf: dict) -> dict:
    """Rotary settings from either key format: transformers 5's ``rope_parameters``, or the
    older top-level ``rope_theta`` / ``rope_scaling`` that most hub checkpoints carry."""
    params = dict(hf.get("rope_parameters") or {})
    old_scaling = hf.get("rope_scaling") or {}
    for key, value in old_scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if "rope_theta" in hf and "rope_theta" not in params:
        params["rope_theta"] = hf["rope_theta"]
    return params


def rope_scaling(params: dict):
    from transformer_hooks.config import RopeScaling

    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(params.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(f"unsupported rope scaling {kind!r}; transformer_hooks implements default, linear and llama3")


def layer_windows(hf: dict, layer_types: list[str]) -> tuple[int | None, ...]:
    """Per-layer attention windows from HF's ``layer_types`` (transformers 5 writes them into
    the config; older configs imply them, given here as ``layer_types``) and ``sliding_window``.
    HF's window w lets a query see keys q - w < k <= q, as ``ModelConfig.attn_windows``."""
    types = hf.get("layer_types") or layer_types
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(
            f"unsupported attention layer types {unknown}; transformer_hooks implements "
            f"full_attention and sliding_attention"
        )
    window = hf.get("sliding_window")
    return tuple(window if kind == "sliding_attention" else None for kind in types)


def token_ids(hf: dict) -> dict:
    """bos/eos/pad ids as ModelConfig takes them."""
    return {f"{kind}_token_id": hf.get(f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
