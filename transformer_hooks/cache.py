"""ActivationCache: the activations of one forward pass, and the residual stream taken apart.

TransformerLens's class, with its method names, signatures and labels, so DLA and logit
lens code ported from it runs unchanged. Index by full hook name or by TransformerLens's
short names; the stacking and decomposition methods (``decompose_resid``,
``stack_head_results``, ``get_full_resid_decomposition``, ``apply_ln_to_stack``,
``logit_attrs``, ...) are in ``decompositions.py``, a mixin of this class, with the
equations they satisfy.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from jaxtyping import Float

from . import sites
from .decompositions import ResidualDecompositions, _one_device
from .hook_cache import HookCache
from .protocol import HookedModel
from .utils import get_act_name

logger = logging.getLogger(__name__)


class NotCachedError(KeyError):
    """An activation that this cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ActivationCache(ResidualDecompositions, HookCache):
    """Activations by hook name, with TransformerLens's indexing and decomposition helpers.

    Index by full name (``cache["blocks.3.hook_resid_post"]``), by ``(name, layer)``
    (``cache["resid_post", -1]``, ``cache["pattern", 0]``) or ``(name, layer, sublayer)``
    (``cache["scale", 2, "ln1"]``); short names are ``utils.get_act_name``'s.

    Args:
        cache_dict: the activations by full hook name.
        model: the model they came from (None, as TransformerLens allows: a dict of
            activations without the methods that read the architecture).
        has_batch_dim: whether the activations have a batch dimension (False after
            ``run_with_cache(remove_batch_dim=True)``).
    """

    def __init__(
        self, cache_dict: dict[str, torch.Tensor], model: HookedModel | None, has_batch_dim: bool = True
    ) -> None:
        """See the class docstring for ``cache_dict``, ``model`` and ``has_batch_dim``."""
        super().__init__(cache_dict, has_batch_dim)
        self.model: HookedModel = model  # type: ignore[assignment]  # None: cfg says so when read
        # From the architecture, not from what happens to be cached: a decomposition that
        # silently left out a part would not sum to the residual stream.
        self.has_embed = True
        self.has_pos_embed = model is not None and sites.BY_NAME["hook_pos_embed"].when.holds(model.cfg)

    # Dict-like access -----------------------------------------------------------------
    def _name(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key, n_layers=self.cfg.n_layers)
        if isinstance(key, tuple) and key and isinstance(key[0], str) and len(key) <= 3:
            return get_act_name(*key, n_layers=self.cfg.n_layers)  # type: ignore[misc]  # len(key) <= 3
        raise TypeError(f"index the cache with a hook name, (name, layer) or (name, layer, sublayer), got {key!r}")

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self._get(key)

    def _get(self, key: Any, needed_by: str | None = None) -> torch.Tensor:
        name = self._name(key)
        if name not in self.cache_dict:
            raise NotCachedError(self._not_cached_message(name, needed_by))
        return self.cache_dict[name]

    def __contains__(self, key: Any) -> bool:
        try:
            return self._name(key) in self.cache_dict
        except (ValueError, TypeError):
            return False

    def __repr__(self) -> str:
        return f"ActivationCache with {len(self)} activations: {_summarize(list(self.cache_dict))}"

    def to(self, device: Any, move_model: bool = False) -> "ActivationCache":
        """Move every activation (and, with ``move_model``, the model) to ``device``."""
        super().to(device)
        if move_model:
            self.model.to(device)
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)``, as TransformerLens's cache has it. Autograd is
        global state: this switches gradients off (or on) for all of torch, not just the cache."""
        logger.warning("toggle_autodiff(%s): autograd is now %s for all of torch", mode, "on" if mode else "off")
        torch.set_grad_enabled(mode)

    # Any activation ---------------------------------------------------------------------------
    def stack_activation(
        self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None
    ) -> Float[torch.Tensor, "layer ..."]:
        """``activation_name`` (a short name, e.g. ``"pattern"``) of every block before ``layer``,
        stacked; ``sublayer_type`` picks the norm of a per-norm site (``"ln1"``, ``"ln2"``)."""
        layer = self._stack_layer(layer)
        return torch.stack(
            _one_device([self._get((activation_name, L, sublayer_type), "stack_activation") for L in range(layer)])
        )

    # Error messages -----------------------------------------------------------------------------
    def _not_cached_message(self, name: str, needed_by: str | None) -> str:
        who = f"{needed_by} needs {name!r}, which" if needed_by else f"{name!r}"
        hook_dict = getattr(self.model, "hook_dict", {})
        if name not in hook_dict:
            why = sites.why_absent(name, self.cfg)
            return (
                f"{who} is not a hook point of this model{f' ({why})' if why else ''}. "
                f"Cached: {_summarize(list(self.cache_dict))}"
            )
        layer, rel = sites.split_name(name)
        glob = name if layer is None else f"blocks.*.{rel}"
        expansion = sites.is_per_head_expansion(name)
        why = (
            (
                " (run_with_cache leaves per-head expansions out unless names_filter names them, or "
                "model.set_use_attn_result(True) and friends switch them on)"
            )
            if expansion
            else ""
        )
        default = "" if expansion else ", or leave names_filter out to cache every site"
        return (
            f"{who} is not in this cache{why}. It holds {len(self)} activations: "
            f"{_summarize(list(self.cache_dict))}. To cache it, run model.run_with_cache(..., "
            f"names_filter=[..., {glob!r}]) (names and globs){default}"
        )


def _summarize(names: list[str], limit: int = 12) -> str:
    """``['blocks.0.hook_z', 'blocks.1.hook_z']`` -> ``'blocks.{0-1}.hook_z'``, compactly."""
    if not names:
        return "nothing"
    layers: dict[str, list[int]] = {}
    for name in names:
        layer, rel = sites.split_name(name)
        key = f"blocks.{{}}.{rel}" if layer is not None else name
        layers.setdefault(key, []).append(-1 if layer is None else layer)
    shown = []
    for key, ls in layers.items():
        if "{}" not in key:
            shown.append(key)
            continue
        ls = sorted(set(ls))
        span = (
            str(ls[0])
            if len(ls) == 1
            else (f"{ls[0]}-{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ",".join(map(str, ls)))
        )
        shown.append(key.replace("{}", "{" + span + "}") if len(ls) > 1 else key.replace("{}", span))
    more = f", ... ({len(shown) - limit} more kinds; see cache.keys())" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more
