"""TransformerLens's ``loading_from_pretrained`` names: model configs and checkpoint labels.

- ``get_official_model_name(name)``: the HF repo id of a preset name (or the name itself if
  it is a repo id or a local path);
- ``get_pretrained_model_config(name)``: the ``ModelConfig`` of a checkpoint, read from its
  config only (no weights are read);
- ``get_checkpoint_labels(name)``: the training checkpoints a suite publishes (Pythia, the
  Stanford CRFM GPT-2s) and their label type, as TransformerLens lists them; for a local
  TransformerLens toy-model directory, the ``checkpoints/*_{N}.pth`` files it holds;
- ``fill_missing_keys(model, state_dict)``: a state dict completed with the model's own
  values, refusing missing weight matrices (TransformerLens's rule).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..presets import PRESETS, preset_repo_id

OFFICIAL_MODEL_NAMES: list[str] = sorted(set(PRESETS.values()))

STANFORD_CRFM_CHECKPOINTS = (
    list(range(0, 100, 10))
    + list(range(100, 2000, 50))
    + list(range(2000, 20000, 100))
    + list(range(20000, 400000 + 1, 1000))
)
# Pythia: log-spaced early checkpoints, then every 1000 steps (2,097,152 tokens a step).
PYTHIA_CHECKPOINTS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143000 + 1, 1000))
PYTHIA_V0_CHECKPOINTS = list(range(1000, 143000 + 1, 1000))


def get_official_model_name(model_name: str) -> str:
    """The HF repo id of the preset ``model_name``; a repo id or a local path is returned as it is."""
    return preset_repo_id(model_name) or model_name


def get_pretrained_model_config(model_name: str, **kwargs: Any) -> ModelConfig:
    """The ``ModelConfig`` of ``model_name`` (a preset name, repo id, local checkpoint or GGUF file),
    read from its config (TransformerLens returns its ``HookedTransformerConfig``; the
    architecture fields have the same names). Settings TransformerLens takes here as keyword
    arguments (``**kwargs``: ``fold_ln``, ``device``, ...) belong to ``from_pretrained``: they
    are refused.
    """
    if kwargs:
        raise ValueError(
            f"get_pretrained_model_config takes no options here ({sorted(kwargs)}): pass them to "
            f"HookedTransformer.from_pretrained"
        )
    from ..loading.resolve import resolve_config  # the loader's resolver, reading no weights

    return resolve_config(model_name, download=True).cfg


def get_checkpoint_labels(model_name: str, **kwargs: Any) -> tuple[list[int], str]:
    """The checkpoint labels of ``model_name``'s training run and their type ("step" or "token").

    Raises for a model that publishes no checkpoints. ``**kwargs``: TransformerLens's, ignored.
    """
    path = Path(str(model_name)).expanduser()
    if path.is_dir():
        labels = sorted(
            int(m.group(1)) for f in path.glob("checkpoints/*.pth") if (m := re.match(r".*_(\d+)\.pth$", f.name))
        )
        if not labels:
            raise ValueError(f"{path} has no checkpoints/*_{{N}}.pth files: it is not checkpointed")
        return labels, "token" if labels[-1] > 1e9 else "step"
    official = get_official_model_name(model_name)
    if official.startswith("stanford-crfm/"):
        return STANFORD_CRFM_CHECKPOINTS, "step"
    if official.startswith("EleutherAI/pythia"):
        return (PYTHIA_V0_CHECKPOINTS if "v0" in official else PYTHIA_CHECKPOINTS), "step"
    raise ValueError(
        f"Model {official} is not checkpointed: transformer_hooks knows the checkpoint labels of Pythia "
        f"and the Stanford CRFM GPT-2s, and of local TransformerLens directories with checkpoints/*_N.pth"
    )


# Weight matrices never filled in: a missing one means the checkpoint and the model disagree on
# names, and a zero-filled matrix silently kills its sublayer (TransformerLens's list).
FAIL_LOUD = {"W_Q", "W_K", "W_V", "W_O", "_W_K", "_W_V", "W_in", "W_gate", "W_out"}


def fill_missing_keys(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TransformerLens's ``fill_missing_keys``: ``state_dict`` with each key ``model.state_dict()``
    has and it lacks filled in with the model's value (in place; returned). A missing attention
    or MLP weight matrix raises a ValueError naming it; other filled weight matrices and norm
    weights are named in a ``logging.warning``, as TransformerLens does."""
    default = model.state_dict()
    missing = set(default) - set(state_dict)
    loud = sorted(k for k in missing if "hf_model" not in k and k.rsplit(".", 1)[-1] in FAIL_LOUD)
    if loud:
        raise ValueError(
            f"the state dict is missing weight matrices the model expects: {loud}. The checkpoint and "
            f"the model disagree on parameter names (e.g. GQA's _W_K/_W_V vs W_K/W_V); refusing to "
            f"fill them in, which would silently give wrong outputs"
        )
    for key in missing:
        if "hf_model" in key:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if "W_" in key:
            logging.warning(f"Missing key for a weight matrix in pretrained, filled in with an empty tensor: {key}")
        elif leaf in ("w", "b") and ("ln" in key or "norm" in key):
            logging.warning(f"Missing normalization key in pretrained, filled with its default (identity norm): {key}")
        state_dict[key] = default[key]
    return state_dict
