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

from . import gemma, gpt2, gpt_neo, gpt_neox, llama, mistral, olmo2, qwen2, qwen3

FAMILIES: tuple[ModuleType, ...] = (gpt2, gpt_neo, gpt_neox, llama, mistral, qwen2, qwen3, gemma, olmo2)
GetTensor = Callable[[str], torch.Tensor]


class UnsupportedArchitectureError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.MODEL_TYPES]


def family_for(hf_config: dict) -> ModuleType:
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    arch = ", ".join(hf_config.get("architectures") or []) or "?"
    raise UnsupportedArchitectureError(
        f"unsupported architecture: model_type={model_type!r} (architectures: {arch}). "
        f"transformer_hooks implements {', '.join(supported_model_types())}."
    )


def config_from_hf(hf_config: dict):
    return family_for(hf_config).config_from_hf(hf_config)


# The groups a load streams, and their order (defined once, in groups.py).
from .groups import convert_groups, load_order  # noqa: E402,F401
