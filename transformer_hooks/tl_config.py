"""TransformerLens's ``HookedTransformerConfig``, so a tutorial's ``HookedTransformer(cfg)`` runs here.

It is only a spelling: ``to_model_config()`` maps its fields onto ``ModelConfig`` (the one
config the model reads), and settings this library does not implement are refused by name
rather than ignored. ``init_weights`` initialises a new model as TransformerLens does.

Field mapping (TransformerLens -> ModelConfig): ``positional_embedding_type`` "standard" ->
``positional_embedding="learned"``; ``n_key_value_heads`` -> ``n_kv_heads``; ``rotary_base``
-> ``rope_theta``; ``parallel_attn_mlp`` -> ``parallel_residual``; ``use_attn_scale=False`` ->
``attn_scale=1``; ``attn_scale`` (TransformerLens divides scores by it) -> ``attn_scale``;
``use_local_attn`` with ``attn_types`` / ``window_size`` -> ``attn_windows``. The
``use_attn_result`` / ``use_split_qkv_input`` / ``use_attn_in`` / ``use_hook_mlp_in`` switches
are accepted: here a site's hooks work without them (see the README).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import HookedTransformerConfig, ModelConfig  # noqa: F401 (HookedTransformerConfig lives in config.py)


def init_weights(model: nn.Module, cfg: HookedTransformerConfig) -> None:
    """TransformerLens's ``init_weights``: with ``init_mode="gpt2"`` every weight matrix
    (a parameter named ``W_*``) ~ N(0, initializer_range^2), where ``initializer_range``
    defaults to 0.8 / sqrt(d_model); biases 0 and norm weights 1. ``seed`` seeds torch first.
    Other init modes (xavier/kaiming/muP) are refused by name."""
    if cfg.init_mode != "gpt2":
        raise ValueError(f"init_mode={cfg.init_mode!r} is not implemented; use 'gpt2' (TransformerLens's default)")
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("W_"):
                nn.init.normal_(param, std=cfg.initializer_range)
            elif leaf.startswith("b_"):
                param.zero_()
            else:  # norm weights
                param.fill_(1.0)
