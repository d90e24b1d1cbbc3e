"""Name -> config: the one resolver the loader, ``plan`` and TransformerLens's
``get_pretrained_model_config`` share, reading no weights.

A name resolves as ``from_pretrained`` resolves it (resolution.py: a .gguf file, a local
directory, a preset, the embedded default model, a TransformerLens toy name, an HF repo id
in the HF cache), and then to its config: the GGUF metadata, the converted checkpoint's
config, or ``config.json`` read by the family that implements it. Without the files, a
name whose published config this library keeps (presets.PUBLISHED_CONFIGS) still has a
config; ``plan`` also takes a ``config.json`` file, and a cached or local ``config.json``
without weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import weights_conversion
from weights_conversion.converted import CONVERTED_CONFIG, converted_config

from ..config import ModelConfig
from ..presets import PUBLISHED_CONFIGS, preset_repo_id, published_config
from ..resolution import (
    HF_CONFIG,
    Checkpoint,
    CheckpointNotFoundError,
    _cached_snapshot,
    hf_hub_cache_dir,
    resolve_checkpoint,
)


@dataclass(frozen=True)
class ResolvedConfig:
    """A model's config, where it was read (for messages), and its HF config dict (None for
    a converted checkpoint, which stores the ``ModelConfig`` itself)."""

    cfg: ModelConfig
    hf_config: dict[str, Any] | None
    where: str


def resolve_config(name_or_path: str | os.PathLike[str], *, download: bool = False) -> ResolvedConfig:
    """The config of the model ``name_or_path`` names (see the module docstring); weights are
    never read, and downloaded only with ``download`` (then the checkpoint, as a load would)."""
    source = os.fspath(name_or_path)
    path = Path(source).expanduser()
    local = _local_config(path)
    if local is not None:
        return local
    try:
        resolved = checkpoint_config(resolve_checkpoint(source, download=download))
    except CheckpointNotFoundError as error:
        found = _config_without_weights(source)
        if found is None:
            raise CheckpointNotFoundError(
                f"{error}\nOnly the config is needed here: `hf download {preset_repo_id(source) or source} "
                f"config.json` fetches it (kilobytes). Configs known without any file: {sorted(PUBLISHED_CONFIGS)}."
            ) from error
        resolved = found
    return ResolvedConfig(resolved.cfg.replace(model_name=source), resolved.hf_config, resolved.where)


def checkpoint_config(ckpt: Checkpoint) -> ResolvedConfig:
    """The config of the resolved checkpoint ``ckpt`` (GGUF: its metadata only)."""
    if ckpt.kind == "gguf":
        from weights_conversion.gguf import read_gguf

        assert ckpt.gguf_file is not None  # a gguf checkpoint names its file
        hf_config, _, _ = read_gguf(ckpt.gguf_file)
        return _from_hf(hf_config, f"the metadata of {ckpt.gguf_file}")
    assert ckpt.config is not None  # hf and converted checkpoints carry their config
    if ckpt.kind == "converted":
        return ResolvedConfig(converted_config(ckpt.directory, ckpt.config), None, str(ckpt.directory))
    return _from_hf(ckpt.config, str(ckpt.directory / HF_CONFIG))


def _from_hf(hf_config: dict[str, Any], where: str) -> ResolvedConfig:
    return ResolvedConfig(weights_conversion.config_from_hf(hf_config, where), hf_config, where)


def _local_config(path: Path) -> ResolvedConfig | None:
    """A config.json file (HF or converted), or a directory with a config and no weights needed."""
    if path.is_file() and path.suffix.lower() == ".json":
        return _config_file(path, path.parent)
    if path.is_dir():
        for name in (CONVERTED_CONFIG, HF_CONFIG):
            if (path / name).is_file():
                return _config_file(path / name, path)
    return None


def _config_file(file: Path, directory: Path) -> ResolvedConfig:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not a JSON config: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} should hold a JSON object, not {type(data).__name__}")
    if "model_config" in data:  # a converted checkpoint's config file
        return ResolvedConfig(converted_config(directory, data), None, str(file))
    return _from_hf(data, str(file))


def _config_without_weights(name: str) -> ResolvedConfig | None:
    """A repo's config.json in the HF cache (fetched alone), else its published config."""
    repo_id = preset_repo_id(name) or name
    snapshot = _cached_snapshot(repo_id, hf_hub_cache_dir()) if "/" in repo_id else None
    if snapshot is not None and (snapshot / HF_CONFIG).is_file():
        return _config_file(snapshot / HF_CONFIG, snapshot)
    published = published_config(name)
    return _from_hf(published, f"the published config of {repo_id}") if published is not None else None
