"""Small reshapes shared by the family converters (HF layouts -> canonical shapes), and the one
check of an HF config's values (``check_hf_config``) that runs before any family reads it."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from einops import rearrange


class InvalidConfigError(ValueError):
    """A checkpoint's config has a missing, mistyped or out-of-range value."""


# Counts and sizes: a positive integer (JSON ``2.0`` is a float, and refused).
POSITIVE_INT_KEYS = frozenset(
    {
        "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "n_ctx", "vocab_size", "hidden_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "max_position_embeddings", "head_dim", "num_layers", "num_heads", "window_size", "sliding_window",
        "rotary_dim", "original_max_position_embeddings", "query_pre_attn_scalar", "max_window_layers",
        "sliding_window_pattern",
    }
)  # fmt: skip
# Real numbers (an int is fine): epsilons, rotary bases, fractions, soft caps.
NUMBER_KEYS = frozenset(
    {
        "layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "rope_theta", "rotary_emb_base",
        "rotary_pct", "partial_rotary_factor", "attn_logit_softcapping", "final_logit_softcapping",
        "rope_local_base_freq", "factor", "low_freq_factor", "high_freq_factor",
    }
)  # fmt: skip
OPTIONAL_INT_KEYS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id"})
ROPE_KINDS_WITH_FACTOR = ("linear", "llama3", "dynamic", "yarn", "longrope")


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_hf_config(hf: Any, where: str = "config.json") -> None:
    """Refuse an HF config whose values cannot mean a model, naming the key, the value found
    and what is accepted: counts and sizes must be positive integers, epsilons and rotary
    settings numbers, ``rope_scaling`` a dict with a numeric ``factor``. Run before a family
    reads the config, so no bad value reaches arithmetic or the first forward. ``hf``: the
    config dict; ``where``: the file, for the messages."""
    if not isinstance(hf, dict):
        raise InvalidConfigError(f"{where} should hold a JSON object, found {_type_name(hf)}")
    for key, value in hf.items():
        if value is None:
            continue
        if key in POSITIVE_INT_KEYS:
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise InvalidConfigError(
                    f"{where}: {key} must be an integer, found {value!r} ({_type_name(value)}); "
                    f"write it as a whole number without a decimal point"
                )
            if value <= 0:
                raise InvalidConfigError(f"{where}: {key} must be a positive integer (at least 1), found {value}")
        elif key in NUMBER_KEYS:
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise InvalidConfigError(f"{where}: {key} must be a number, found {value!r} ({_type_name(value)})")
        elif key in OPTIONAL_INT_KEYS:
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
                raise InvalidConfigError(
                    f"{where}: {key} must be a token id (an integer) or null, found {value!r} ({_type_name(value)})"
                )
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope(hf.get(key), f"{where}: {key}")
    if isinstance(hf.get("text_config"), dict):
        check_hf_config(hf["text_config"], f"{where} (text_config)")


def _check_rope(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidConfigError(
            f"{where} must be a dict like {{'rope_type': 'linear', 'factor': 2.0}} or null, "
            f"found {value!r} ({_type_name(value)})"
        )
    kind = value.get("rope_type", value.get("type", "default"))
    if kind in ROPE_KINDS_WITH_FACTOR:
        if "factor" not in value:
            raise InvalidConfigError(f"{where} has rope_type {kind!r} but no 'factor' (the scaling factor, a number)")
    check_hf_config({k: v for k, v in value.items() if k in NUMBER_KEYS or k in POSITIVE_INT_KEYS}, where)


def head_dim(d_model: int, n_heads: int, width_key: str, heads_key: str) -> int:
    """d_model / n_heads, refusing a head count that does not divide the width (the error names
    the config keys ``width_key`` and ``heads_key``)."""
    if n_heads <= 0 or d_model % n_heads:
        raise ValueError(
            f"{width_key}={d_model} is not a multiple of {heads_key}={n_heads}: the config is "
            f"inconsistent (each head gets d_model / n_heads dims)"
        )
    return d_model // n_heads


def special_token_ids(hf: dict) -> dict[str, Any]:
    """The BOS, EOS and padding token ids the HF config ``hf`` names (None where it names none;
    several EOS ids, as Llama 3's instruct configs give, as a tuple: a ``ModelConfig`` is hashable)."""
    ids = {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {key: tuple(v) if isinstance(v, list) else v for key, v in ids.items()}


def heads_from_linear(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """nn.Linear ``weight`` [n_heads*d_head, d_model] -> [n_heads, d_model, d_head] (a view)."""
    return rearrange(weight, "(head d_head) d_model -> head d_model d_head", head=n_heads)


def heads_from_bias(bias: torch.Tensor | None, n_heads: int, d_head: int) -> torch.Tensor:
    """A q/k/v ``bias`` [n_heads * d_head] as [n_heads, d_head] (zeros for ``None``)."""
    return torch.zeros(n_heads, d_head) if bias is None else bias.reshape(n_heads, d_head)


def out_from_linear(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """nn.Linear ``weight`` [d_model, n_heads*d_head] -> W_O [n_heads, d_head, d_model] (a view)."""
    return rearrange(weight, "d_model (head d_head) -> head d_head d_model", head=n_heads)


def rope_parameters(hf: dict) -> dict:
    """Rotary settings of the HF config ``hf`` from either key format: transformers 5's ``rope_parameters``, or the
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
    """The ``RopeScaling`` of an HF ``rope_scaling`` dict ``params`` (None for the default)."""
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
    """Per-layer attention windows from the HF config ``hf``'s ``layer_types`` (transformers 5 writes them into
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
    """The bos/eos/pad ids of the HF config ``hf`` as ModelConfig takes them."""
    return {f"{kind}_token_id": hf.get(f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
