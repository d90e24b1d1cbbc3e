"""A preallocated key/value cache for generation: one buffer per layer, no torch.cat per step."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int

from ..config import ModelConfig


class LayerKVCache:
    """One layer's part of a ``KVCache``: its keys and values so far, appended to at each step."""

    def __init__(self, owner: "KVCache", k: torch.Tensor, v: torch.Tensor) -> None:
        """One layer's key and value buffers ``k`` and ``v`` [batch, kv_head, max_len, d_head], owned
        by the model's ``KVCache`` ``owner`` (which holds the length).
        """
        self.owner, self.k, self.v = owner, k, v

    def extend(
        self, k: Float[torch.Tensor, "batch kv_head pos d_head"], v: Float[torch.Tensor, "batch kv_head pos d_head"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys ``k`` and values ``v`` [batch, kv_head, pos, d_head] after the cached
        ones; return all of them so far. ValueError past the buffer's ``max_len``.
        """
        start, end = self.owner.length, self.owner.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(
                f"KV cache holds {self.k.shape[2]} positions; this step needs {end}. "
                f"Make the cache with a larger max_len."
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for positions ``[0, length)``, plus which are padding.

    A forward that uses the cache asks it for its tokens' positions (``continue_positions``)
    and for the key mask (``key_mask``), writes each layer's keys and values after the cached
    ones (``cache[layer].extend``), then calls ``advance``. Nothing else writes its fields.
    """

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32, layer_devices=None
    ) -> None:
        """Empty buffers for every layer.

        Args:
            cfg: the model's config (layers, kv heads, d_head; with
                ``ungroup_grouped_query_attention``, one buffer per query head).
            batch: the number of sequences.
            max_len: the most positions it holds (prompt plus new tokens).
            device: where the buffers and the padding record go.
            dtype: the keys' and values' dtype (the model's).
            layer_devices: each layer's device (a model placed over devices); default ``device`` for all.
        """
        heads = cfg.n_heads if cfg.ungroup_grouped_query_attention else cfg.n_kv_heads  # ungrouped: per query head
        shape = (batch, heads, max_len, cfg.d_head)
        devices = list(layer_devices) if layer_devices is not None else [device] * cfg.n_layers
        self.layers = [
            LayerKVCache(self, torch.empty(shape, device=d, dtype=dtype), torch.empty(shape, device=d, dtype=dtype))
            for d in devices
        ]
        self.length = 0
        self.key_is_real: Bool[torch.Tensor, "batch key_pos"] = torch.ones(
            batch, max_len, dtype=torch.bool, device=device
        )
        self.has_padding = False
        self.next_position: torch.Tensor | None = None  # [batch], position id of the next token

    @property
    def batch(self) -> int:
        """The number of sequences."""
        return self.layers[0].k.shape[0]

    @property
    def max_len(self) -> int:
        """The most positions the buffers hold."""
        return self.layers[0].k.shape[2]

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def continue_positions(self, positions: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
        """``positions`` (ids counted from 0 in this step) shifted to follow the cached tokens: each row
        continues from its own count of real (unpadded) tokens so far.
        """
        return positions if self.next_position is None else positions + self.next_position[:, None]

    def key_mask(
        self, q_len: int, attention_mask: Int[torch.Tensor, "batch pos"] | None = None
    ) -> Bool[torch.Tensor, "batch key_pos"] | None:
        """Record which of this step's ``q_len`` keys are real (``attention_mask``; None: all), and
        return which keys in ``[0, length + q_len)`` are real, or None if none ever was padding."""
        start, end = self.length, self.length + q_len
        if attention_mask is None:
            self.key_is_real[:, start:end] = True
        else:
            self.key_is_real[:, start:end] = attention_mask.bool()
            self.has_padding = self.has_padding or not bool(attention_mask.all())
        return self.key_is_real[:, :end] if self.has_padding else None

    def advance(self, q_len: int, attention_mask: Int[torch.Tensor, "batch pos"] | None = None) -> None:
        """After a forward of ``q_len`` tokens: ``length += q_len``, and each row's next position
        moves on by its number of real tokens in the step (``attention_mask``'s ones; None: all).
        """
        real = attention_mask.sum(-1) if attention_mask is not None else q_len
        start = (
            self.next_position
            if self.next_position is not None
            else torch.zeros(self.batch, dtype=torch.long, device=self.key_is_real.device)
        )
        self.next_position = start + real
        self.length += q_len
