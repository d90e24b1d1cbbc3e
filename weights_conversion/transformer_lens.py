"""TransformerLens-native checkpoints: a TransformerLens ``state_dict`` (``.pth`` or safetensors)
beside a ``config.json`` in ``HookedTransformerConfig``'s keys (the toy attention-only and GELU
models of its tutorials, and any model saved with ``torch.save(model.state_dict())``).

TransformerLens's parameter names and shapes are this library's canonical ones
(``embed.W_E`` [d_vocab, d_model], ``blocks.0.attn.W_Q`` [n_heads, d_model, d_head],
``blocks.0.attn.W_O`` [n_heads, d_head, d_model], ``blocks.0.mlp.W_in`` [d_model, d_mlp],
``unembed.W_U`` [d_model, d_vocab], ...), so conversion is a key-for-key copy, except:

- grouped-query attention stores ``attn._W_K`` / ``attn._W_V`` / ``attn._b_K`` / ``attn._b_V``
  ([n_kv_heads, ...]; TransformerLens repeats them per query head on the fly);
- the buffers ``attn.IGNORE``, ``attn.mask``, ``attn.rotary_sin`` / ``rotary_cos`` are not weights.

Recognised by the config: no ``model_type`` (every HF config has one), and TransformerLens's
``n_layers``, ``d_model`` and ``d_head``.
"""

from __future__ import annotations

import dataclasses

import torch

from transformer_hooks.config import ModelConfig
from transformer_hooks.tl.config import HookedTransformerConfig

MODEL_TYPES: tuple[str, ...] = ()  # recognised by is_transformer_lens_config, not by model_type
BUFFERS = ("attn.IGNORE", "attn.mask", "attn.rotary_sin", "attn.rotary_cos")


def is_transformer_lens_config(config: dict) -> bool:
    """Whether ``config`` is in TransformerLens's ``HookedTransformerConfig`` keys (``n_layers``, ``d_model``, ...)."""
    return "model_type" not in config and all(k in config for k in ("n_layers", "d_model", "d_head"))


def tl_config_from_dict(config: dict) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` a checkpoint's config.json describes. As TransformerLens
    reads its toy models' configs, keys that are not config fields (training settings such as
    ``lr`` or ``batch_size``) are dropped."""
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)} - {"extra"}
    renamed = {"normalization", "shortformer_pos"}
    kept = {k: v for k, v in config.items() if k in known or k in renamed}
    kept.pop("device", None)  # where it was trained, not where it loads
    kept.pop("n_params", None)
    return HookedTransformerConfig.from_dict(kept)


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig of a TransformerLens config dict (the name matches the HF families')."""
    return tl_config_from_dict(config).to_model_config()


def _norm_names(cfg: ModelConfig, norm: str) -> list[str]:
    if cfg.norm_folded:
        return []
    return [f"{norm}.w", f"{norm}.b"] if cfg.norm_centres else [f"{norm}.w"]


def convert_embeddings(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical embedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    tensors = {"embed.W_E": get("embed.W_E")}
    if cfg.positional_embedding == "learned":
        tensors["pos_embed.W_pos"] = get("pos_embed.W_pos")
    return tensors


def convert_block(cfg: ModelConfig, get, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s canonical tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    p = f"blocks.{layer}."

    def read(name: str) -> torch.Tensor:
        try:
            return get(p + name)
        except KeyError:
            # GQA: TransformerLens keeps the n_kv_heads tensors under a leading underscore.
            head, leaf = name.rsplit(".", 1)
            return get(f"{p}{head}._{leaf}")

    names = _norm_names(cfg, "ln1") + [f"attn.{w}_{x}" for w in "Wb" for x in "QKVO"]
    if not cfg.attn_only:
        names += _norm_names(cfg, "ln2") + ["mlp.W_in", "mlp.b_in", "mlp.W_out", "mlp.b_out"]
        if cfg.gated_mlp:
            names += ["mlp.W_gate"]
    tensors = {name: read(name) for name in names}
    if cfg.gated_mlp and not cfg.attn_only:
        try:
            tensors["mlp.b_gate"] = read("mlp.b_gate")
        except KeyError:  # TransformerLens's gated MLP has no gate bias
            tensors["mlp.b_gate"] = torch.zeros(cfg.d_mlp)
    return tensors


def convert_final(cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """The canonical final-norm and unembedding tensors, read by ``get(hf_name)`` for the config ``cfg``."""
    tensors = {name: get(name) for name in _norm_names(cfg, "ln_final")}
    tensors["unembed.W_U"] = get("unembed.W_U")
    tensors["unembed.b_U"] = get("unembed.b_U")
    return tensors


def to_transformer_lens_state_dict(model) -> dict[str, torch.Tensor]:
    """A model's weights under TransformerLens's names (GQA key/value weights as ``_W_K`` ...),
    as ``HookedTransformer.state_dict()`` gives them there; for tests and for export."""
    tensors = {}
    for name, param in model.named_parameters():
        head, leaf = name.rsplit(".", 1)
        if model.cfg.n_kv_heads != model.cfg.n_heads and head.endswith("attn") and leaf in ("W_K", "W_V", "b_K", "b_V"):
            leaf = "_" + leaf
        tensors[f"{head}.{leaf}"] = param.detach().clone()
    if model.cfg.tie_word_embeddings and "unembed.W_U" not in tensors:
        tensors["unembed.W_U"] = model.embed.W_E.detach().T.clone()
    return tensors
