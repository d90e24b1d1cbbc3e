"""ActivationCache (minimal; extended for DLA in cache work)."""

from __future__ import annotations

from typing import Any

import torch

from .utils import get_act_name


class ActivationCache:
    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        if isinstance(key, tuple):
            name = get_act_name(*key, n_layers=self.model.cfg.n_layers)
        else:
            name = get_act_name(key, n_layers=self.model.cfg.n_layers)
        return self.cache_dict[name]

    def __contains__(self, key: str) -> bool:
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()
