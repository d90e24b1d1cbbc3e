"""SAE training checkpoints: one safetensors file (never pickle) replaced atomically, with
the SAE, Adam's state, the dead-feature counters and the resampling generator as tensors,
and the step, the log and the run's key as JSON in its metadata.

The key is everything that decides the result (the recipe, the sizes, the data's
fingerprint, the world size and the per-rank batch); a run that finds a checkpoint with
another key refuses, naming each entry that changed, as every resumable run of the library
does (``scale.resume``). Under ``torchrun`` rank 0 writes and every rank reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..scale.resume import check_same
from .core import SAE

# 2: the key holds the world size and the dataset's stream (windows of shards) changed.
CHECKPOINT_VERSION = 2


def fingerprint(source: Any) -> str:
    """What identifies the training data ``source``: a content hash of a tensor, or of a dataset's manifest."""
    h = hashlib.sha256()
    if isinstance(source, torch.Tensor):
        h.update(str((tuple(source.shape), source.dtype)).encode())
        h.update(source.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(json.dumps(source.manifest, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Checkpoint:
    """One training run's checkpoint in ``directory`` (see the module docstring); ``recipe``: the
    resume key, everything that decides the result (a checkpoint with another one is refused)."""

    def __init__(self, directory: Path, recipe: dict[str, Any]) -> None:
        self.directory, self.recipe = directory, recipe
        self.path = directory / "state.safetensors"

    def load(self) -> dict[str, Any] | None:
        """The checkpoint's state (its JSON fields and ``"tensors"``), or None when there is none yet.

        Raises ValueError, saying to delete it, for an unreadable file, another version, or
        another recipe (naming each entry that changed)."""
        if not self.path.exists():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
            tensors = load_file(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"the SAE training checkpoint {self.path} is unreadable ({e}); delete it to start over"
            ) from None
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{self.path} is an SAE training checkpoint of version {meta.get('version')!r}, this library "
                f"writes version {CHECKPOINT_VERSION}; delete it to start over"
            )
        check_same(
            self.directory,
            "an SAE training checkpoint",
            meta["recipe"],
            self.recipe,
            f"delete the directory {self.directory} (or pass another checkpoint_dir)",
        )
        return {**meta, "tensors": tensors}

    def save(
        self,
        step_done: int,
        sae: SAE,
        opt: torch.optim.Optimizer,
        since_fired: torch.Tensor,
        resample_gen: torch.Generator,
        batch_threshold: float,
    ) -> None:
        """Write the state after ``step_done`` steps atomically: the ``sae``'s parameters, the
        ``opt``imiser's moments, the ``since_fired`` counters, the ``resample_gen`` generator's
        state and BatchTopK's ``batch_threshold`` (NaN: none yet)."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"sae.{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
        names = {id(p): n for n, p in sae.named_parameters()}
        for p, state in opt.state.items():
            for key, value in state.items():
                tensors[f"adam.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["since_fired"] = since_fired.cpu().contiguous()
        tensors["resample_generator"] = resample_gen.get_state().contiguous()
        meta = {
            "version": CHECKPOINT_VERSION,
            "step": step_done,
            "batch_threshold": None if math.isnan(batch_threshold) else batch_threshold,
            "log": sae.training_log,
            "recipe": self.recipe,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
        os.replace(tmp, self.path)  # a kill leaves the previous checkpoint or this one, never half of one


@torch.no_grad()
def restore(
    sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, resample_gen: torch.Generator, state: dict
) -> None:
    """Put a loaded checkpoint's ``state`` (``Checkpoint.load``) into the run's ``sae``, optimiser
    ``opt``, ``since_fired`` counters and ``resample_gen`` generator, in place."""
    tensors = state["tensors"]
    for n, p in sae.named_parameters():
        p.copy_(tensors[f"sae.{n}"])
    for n, p in sae.named_parameters():
        keys = {k.rsplit(".", 1)[1] for k in tensors if k.startswith(f"adam.{n}.") and k.count(".") == n.count(".") + 2}
        if keys:
            opt.state[p] = {key: tensors[f"adam.{n}.{key}"].to(p.device) for key in keys}
            if "step" in opt.state[p]:
                opt.state[p]["step"] = opt.state[p]["step"].cpu()
    since_fired.copy_(tensors["since_fired"])
    resample_gen.set_state(tensors["resample_generator"])
