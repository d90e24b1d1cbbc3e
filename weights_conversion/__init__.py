"""Hugging Face checkpoints -> ``ModelConfig`` and canonical tensors, one module per family.

Each family module has:

- ``MODEL_TYPES``: the HF ``model_type`` values it reads;
- ``config_from_hf(hf: dict) -> ModelConfig``: every config field that changes the math;
- ``convert_embeddings(cfg, get)``, ``convert_block(cfg, get, layer)``,
  ``convert_final(cfg, get)``: canonical tensors (TransformerLens shapes, see
  shared DESIGN.md) from ``get(hf_name) -> Tensor``, one group at a time, so a
  loader can stream a checkpoint at about one copy of memory.

Architecture quirks live here and in a few ModelConfig fields, nowhere else. Beside the
families: ``groups.py`` (the groups a load streams, in order), ``sources.py`` (checkpoint
readers and errors), ``gguf.py`` (GGUF files), ``converted.py`` (the converted-checkpoint
format) and ``__main__.py`` (the command that writes it). The package imports
``transformer_hooks.config`` only; the loader imports it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from . import gemma, gpt2, gpt_neo, gpt_neox, llama, mistral, olmo2, qwen2, qwen3, transformer_lens
from .common import InvalidConfigError, check_hf_config

FAMILIES: tuple[ModuleType, ...] = (gpt2, gpt_neo, gpt_neox, llama, mistral, qwen2, qwen3, gemma, olmo2)
GetTensor = Callable[[str], torch.Tensor]


class UnsupportedArchitectureError(ValueError):
    """A checkpoint of an architecture no family reads; the message lists the supported ``model_type`` values."""

    pass


def supported_model_types() -> list[str]:
    """Every HF ``model_type`` a family reads."""
    return [t for family in FAMILIES for t in family.MODEL_TYPES]


def family_for(hf_config: dict) -> ModuleType:
    """The family module that reads ``hf_config`` (by its ``model_type``, or a TransformerLens-native
    config); ``UnsupportedArchitectureError`` listing the supported types otherwise.
    """
    if transformer_lens.is_transformer_lens_config(hf_config):
        return transformer_lens
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    arch = ", ".join(hf_config.get("architectures") or []) or "?"
    raise UnsupportedArchitectureError(
        f"unsupported architecture: model_type={model_type!r} (architectures: {arch}). "
        f"transformer_hooks implements {', '.join(supported_model_types())}, and TransformerLens-native "
        f"checkpoints (a config.json with n_layers, d_model and d_head, and no model_type)."
    )


def checked_family(hf_config: dict, where: str = "config.json") -> ModuleType:
    """The family that reads ``hf_config``, after ``check_hf_config`` found its values sound (errors name ``where``,
    the file).
    """
    family = family_for(hf_config)
    check_hf_config(hf_config, where)
    return family


def config_from_hf(hf_config: dict, where: str = "config.json"):
    """``ModelConfig`` of the HF config ``hf_config``: checked once here, then read by its family. A
    key the family needs and the config lacks is an ``InvalidConfigError`` naming it and ``where`` (the file).
    """
    family = checked_family(hf_config, where)
    try:
        return family.config_from_hf(hf_config)
    except KeyError as error:
        key = error.args[0] if error.args else "?"
        raise InvalidConfigError(
            f"{where} has no {key!r}, which a model_type={hf_config.get('model_type')!r} config needs"
        ) from None


# The groups a load streams, and their order (defined once, in groups.py).
from .groups import convert_groups, load_order  # noqa: E402,F401
