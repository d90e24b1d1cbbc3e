"""A preallocated key/value cache for generation: one buffer per layer, no torch.cat per step."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float

from ..config import ModelConfig


class LayerKVCache:
    def __init__(self, owner: "KVCache", k: torch.Tensor, v: torch.Tensor) -> None:
        self.owner, self.k, self.v = owner, k, v

    def extend(self, k: Float[torch.Tensor, "batch kv_head pos d_head"], v: Float[torch.Tensor, "batch kv_head pos d_head"]):
        """Write this step's keys/values after the cached ones; return all of them."""
        start, end = self.owner.length, self.owner.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; this step needs {end}. "
                             f"Make the cache with a larger max_len.")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for positions ``[0, length)``, plus which are padding.

    The model advances ``length`` after each forward that used the cache.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32,
                 layer_devices=None) -> None:
        """``layer_devices``: each layer's buffers where that block runs (a model placed over
        devices); default ``device`` for all. The padding record stays on ``device``."""
        shape = (batch, cfg.n_kv_heads, max_len, cfg.d_head)
        devices = list(layer_devices) if layer_devices is not None else [device] * cfg.n_layers
        self.layers = [LayerKVCache(self, torch.empty(shape, device=d, dtype=dtype),
                                    torch.empty(shape, device=d, dtype=dtype)) for d in devices]
        self.length = 0
        self.key_is_real: Bool[torch.Tensor, "batch key_pos"] = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.next_position: torch.Tensor | None = None  # [batch], position id of the next token

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]
