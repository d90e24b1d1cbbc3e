"""``HookCache``: activations by hook name, what ``HookedRootModule.run_with_cache`` returns for
any hooked module (``HookedTransformer`` wraps it in ``ActivationCache``)."""

from __future__ import annotations

import copy
import difflib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from .utils import CheckError, Slice

logger = logging.getLogger("transformer_hooks.hooks")  # the registry's logger, where this lived


class HookCache:
    """Activations by hook name: what ``HookedRootModule.run_with_cache`` returns for any
    hooked module (``HookedTransformer`` wraps it in ``ActivationCache``).

    Dict-like (``cache[name]``, ``keys``, ``items``, ``values``, ``len``, ``in``), with
    ``to(device)`` and ``remove_batch_dim()``; the tensors are in ``cache_dict``, and
    ``has_batch_dim`` says whether they have a batch dimension.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.has_batch_dim = has_batch_dim

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.cache_dict:
            close = difflib.get_close_matches(str(key), list(self.cache_dict), n=3, cutoff=0.5)
            raise KeyError(
                f"{key!r} is not in this cache{' (closest: ' + ', '.join(close) + ')' if close else ''}; "
                f"it holds {len(self.cache_dict)} activations (see cache.keys())"
            )
        return self.cache_dict[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        """The cached hook names."""
        return self.cache_dict.keys()

    def values(self):
        """The cached activations."""
        return self.cache_dict.values()

    def items(self):
        """(hook name, activation) pairs."""
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"{type(self).__name__} with {len(self)} activations: {list(self.cache_dict)}"

    def to(self, device: Any) -> "HookCache":
        """Move every activation to ``device``, in place."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def _batch_size(self) -> int:
        """The batch size: the most common leading size of the activations (TransformerLens's
        rule). An activation whose leading size is another (a broadcast entry of size 1, a
        position-indexed one) has no batch axis: the batch methods leave it alone."""
        counts = Counter(v.shape[0] for v in self.cache_dict.values() if v.ndim > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "HookCache":
        """A new cache (of the same class) of the examples ``batch_slice`` keeps: an int, a (start,
        stop) tuple, a slice or indices, as ``utils.Slice``; an int index drops the batch dim.
        """
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension to slice")
        batch_slice = Slice.unwrap(batch_slice)
        sliced = copy.copy(self)
        batch = self._batch_size()
        sliced.cache_dict = {
            k: batch_slice.apply(v, dim=0) if v.ndim > 0 and v.shape[0] == batch else v
            for k, v in self.cache_dict.items()
        }
        sliced.has_batch_dim = batch_slice.mode != "int"
        return sliced

    def remove_batch_dim(self) -> "HookCache":
        """Drop the batch dimension of a batch-of-one cache, in place."""
        if not self.has_batch_dim:
            logger.warning("remove_batch_dim: this cache has no batch dimension already")
            return self
        batch = self._batch_size()
        if batch != 1:
            raise CheckError(
                f"remove_batch_dim needs a batch of one; this cache has batch size {batch}. "
                f"Use cache.apply_slice_to_batch_dim(i) to keep one example"
            )
        self.cache_dict = {k: v[0] if v.ndim > 0 and v.shape[0] == 1 else v for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self
