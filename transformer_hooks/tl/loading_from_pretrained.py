"""TransformerLens's ``loading_from_pretrained`` names: model configs and checkpoint labels.

- ``get_official_model_name(name)``: the HF repo id of a preset name (or the name itself if
  it is a repo id or a local path);
- ``get_pretrained_model_config(name)``: the ``ModelConfig`` of a checkpoint, read from its
  config only (no weights are read);
- ``get_checkpoint_labels(name)``: the training checkpoints a suite publishes (Pythia, the
  Stanford CRFM GPT-2s) and their label type, as TransformerLens lists them; for a local
  TransformerLens toy-model directory, the ``checkpoints/*_{N}.pth`` files it holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
