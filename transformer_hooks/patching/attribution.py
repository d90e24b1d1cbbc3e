"""Attribution patching: the first-order estimate of every patch's effect from one corrupted
forward and one backward (the package docstring states the formula). ``get_attr_patch_X``
has the grid and shape of ``get_act_patch_X``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from jaxtyping import Float, Int

from ..hooks import HookPoint
from .engine import (
    PatchingMetric,
    _check_axes,
    _check_metric_output,
    _clean_activation,
    _corrupted_tokens,
    _layout,
    _site,
    _trial_metric,
)
from .sweeps import (
    _BLOCK_KINDS,
    _HEAD,
    _HEAD_ALL_POS_KINDS,
    _HEAD_BY_POS_KINDS,
    _KV,
    _PATTERN,
    _PATTERN_DEST_SRC,
    _PATTERN_POS,
    _POS,
    _POS_HEAD,
    _named,
    _pad_heads,
    _shape_doc,
)

if TYPE_CHECKING:
    from ..model import HookedTransformer


def attribution_products(
    model: HookedTransformer,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: PatchingMetric,
    sites: Sequence[str],
) -> dict[str, torch.Tensor]:
    """``(clean - corrupted) * d metric / d activation`` at each site, elementwise, from one
    corrupted forward and one backward. Summing it over a patch's elements estimates that
    patch's effect on the metric (to first order).

    The gradient is taken with ``torch.autograd.grad`` of the metric with respect to the
    sites' activations only, so no parameter's ``.grad`` is touched. ``sites`` are full
    hook names.
    """
    tokens = _corrupted_tokens(model, corrupted_tokens)
    clean = {}
    for site in sites:
        model.resolve_hook_names([site])
        clean[site] = _clean_activation(model, clean_cache, site, tokens)
        if site.endswith("attn.hook_attn_scores"):
            raise ValueError(
                "attention scores hold -inf at masked positions, so (clean - corrupted) is undefined "
                "there; attribute to 'pattern' instead"
            )
    _trial_metric(model, patching_metric, tokens, vectorized=False)

    acts: dict[str, torch.Tensor] = {}

    def as_leaf(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        # The graph must reach every site even when the weights do not require grad.
        return None if x.requires_grad else x.detach().requires_grad_(True)

    def keep(x: torch.Tensor, hook: HookPoint) -> None:
        acts[hook.name] = x

    hooks = [("hook_embed", as_leaf)] + [(site, keep) for site in clean]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
        value = patching_metric(logits)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            _check_metric_output(value, 1, vectorized=False)
        if not value.requires_grad:
            raise ValueError(
                "patching_metric's output does not depend differentiably on the logits (no gradient): "
                "attribution patching needs a metric built from torch ops on the logits, without "
                ".item(), argmax or comparisons"
            )
        grads = torch.autograd.grad(value.sum(), [acts[s] for s in clean], allow_unused=True)
    return {
        site: (clean[site] - acts[site].detach()) * (torch.zeros_like(acts[site]) if g is None else g)
        for site, g in zip(clean, grads, strict=True)
    }


def _reduce(product: torch.Tensor, site: str, axes: Sequence[str]) -> torch.Tensor:
    """Sum a site's elementwise attribution over every axis not in ``axes`` (the index axes
    after 'layer'), and order the kept axes as ``axes``."""
    layout = _layout(site)
    wanted = ["head" if a == "head_index" else a for a in axes]
    if "dest_pos" in layout:  # a pattern's query axis: TL's sweeps call it dest_pos
        wanted = ["dest_pos" if a == "pos" else a for a in wanted]
    if any(a not in layout for a in wanted):
        raise ValueError(f"{site} has axes {list(layout)}; it cannot be indexed by {list(axes)}")
    names = list(layout) + [f"extra_{i}" for i in range(product.ndim - len(layout))]
    drop = [i for i, a in enumerate(names) if a not in wanted]
    kept = [a for a in names if a in wanted]
    return product.sum(dim=drop).permute([kept.index(a) for a in wanted])


def generic_attribution_patch(
    model: HookedTransformer,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: PatchingMetric,
    activation_name: str,
    index_axis_names: Sequence[str],
) -> torch.Tensor:
    """Attribution-patching estimate of ``generic_activation_patch(...) - metric(corrupted logits)``.

    Same grid and shape as the sweep with these ``index_axis_names`` (layer first), for any
    patch setter that writes whole slices (the standard ones): the estimate for an index
    sums ``(clean - corrupted) * grad`` over the batch and every axis not indexed.
    """
    return _attribution(
        model, corrupted_tokens, clean_cache, patching_metric, [(activation_name, tuple(index_axis_names))]
    )[0]


def _attribution(
    model: HookedTransformer,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: PatchingMetric,
    kinds: Sequence[tuple[str, tuple[str, ...]]],
) -> list[torch.Tensor]:
    """One forward and backward for several (activation_name, axes) kinds."""
    n_layers = model.cfg.n_layers
    for _, axes in kinds:
        _check_axes(axes)
    sites = {name: [_site(model, name, layer) for layer in range(n_layers)] for name, _ in kinds}
    products = attribution_products(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        list(dict.fromkeys(s for names in sites.values() for s in names)),
    )
    return [torch.stack([_reduce(products[s], s, axes[1:]) for s in sites[name]]).detach() for name, axes in kinds]


def _attr(name: str, activation_name: str, index_axis_names: tuple[str, ...], what: str) -> Callable:
    """The attribution counterpart of ``_sweep``, called ``name``: same site, axes and output shape."""

    def attribution(
        model: HookedTransformer,
        corrupted_tokens: Int[torch.Tensor, "batch pos"],
        clean_cache: Any,
        patching_metric: PatchingMetric,
    ) -> torch.Tensor:
        return generic_attribution_patch(
            model, corrupted_tokens, clean_cache, patching_metric, activation_name, index_axis_names
        )

    return _named(
        attribution,
        name,
        f"Attribution patching of {what}: "
        f"``{_shape_doc(activation_name, index_axis_names)}``, the first-order estimate "
        f"of each patch's effect on the metric (package docstring).",
    )


get_attr_patch_resid_pre = _attr(
    "get_attr_patch_resid_pre", "resid_pre", _POS, "the residual stream entering each block"
)
get_attr_patch_resid_mid = _attr(
    "get_attr_patch_resid_mid", "resid_mid", _POS, "the residual stream between attention and MLP"
)
get_attr_patch_resid_post = _attr(
    "get_attr_patch_resid_post", "resid_post", _POS, "the residual stream leaving each block"
)
get_attr_patch_attn_out = _attr("get_attr_patch_attn_out", "attn_out", _POS, "each attention layer's output")
get_attr_patch_mlp_out = _attr("get_attr_patch_mlp_out", "mlp_out", _POS, "each MLP layer's output")
get_attr_patch_attn_head_out_by_pos = _attr(
    "get_attr_patch_attn_head_out_by_pos", "z", _POS_HEAD, "each head's output z at each position"
)
get_attr_patch_attn_head_q_by_pos = _attr(
    "get_attr_patch_attn_head_q_by_pos", "q", _POS_HEAD, "each head's query at each position"
)
get_attr_patch_attn_head_k_by_pos = _attr(
    "get_attr_patch_attn_head_k_by_pos", "k", _POS_HEAD, "each key head at each position" + _KV
)
get_attr_patch_attn_head_v_by_pos = _attr(
    "get_attr_patch_attn_head_v_by_pos", "v", _POS_HEAD, "each value head at each position" + _KV
)
get_attr_patch_attn_head_pattern_by_pos = _attr(
    "get_attr_patch_attn_head_pattern_by_pos", "pattern", _PATTERN_POS, "each head's attention pattern row"
)
get_attr_patch_attn_head_pattern_dest_src_pos = _attr(
    "get_attr_patch_attn_head_pattern_dest_src_pos",
    "pattern",
    _PATTERN_DEST_SRC,
    "each entry of each head's attention pattern",
)
get_attr_patch_attn_head_out_all_pos = _attr(
    "get_attr_patch_attn_head_out_all_pos", "z", _HEAD, "each head's output z at all positions"
)
get_attr_patch_attn_head_q_all_pos = _attr(
    "get_attr_patch_attn_head_q_all_pos", "q", _HEAD, "each head's queries at all positions"
)
get_attr_patch_attn_head_k_all_pos = _attr(
    "get_attr_patch_attn_head_k_all_pos", "k", _HEAD, "each key head at all positions" + _KV
)
get_attr_patch_attn_head_v_all_pos = _attr(
    "get_attr_patch_attn_head_v_all_pos", "v", _HEAD, "each value head at all positions" + _KV
)
get_attr_patch_attn_head_pattern_all_pos = _attr(
    "get_attr_patch_attn_head_pattern_all_pos", "pattern", _PATTERN, "each head's whole attention pattern"
)


def get_attr_patch_block_every(
    model: HookedTransformer, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any, metric: PatchingMetric
) -> Float[torch.Tensor, "3 layer pos"]:
    """Attribution estimates for resid_pre, attn_out, mlp_out by (layer, pos): ``[3, layer, pos]``, one backward."""
    return torch.stack(
        _attribution(model, corrupted_tokens, clean_cache, metric, [(name, axes) for name, axes, _ in _BLOCK_KINDS])
    )


def get_attr_patch_attn_head_all_pos_every(
    model: HookedTransformer, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any, metric: PatchingMetric
) -> Float[torch.Tensor, "5 layer head"]:
    """Attribution estimates for z, q, k, v, pattern per head: ``[5, layer, head]`` (GQA k/v padded with NaN)."""
    parts = _attribution(
        model, corrupted_tokens, clean_cache, metric, [(name, axes) for name, axes, _ in _HEAD_ALL_POS_KINDS]
    )
    return torch.stack([_pad_heads(p, model.cfg.n_heads) for p in parts])


def get_attr_patch_attn_head_by_pos_every(
    model: HookedTransformer, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any, metric: PatchingMetric
) -> Float[torch.Tensor, "5 layer pos head"]:
    """Attribution estimates for z, q, k, v, pattern per head and position: ``[5, layer, pos, head]``."""
    parts = _attribution(
        model, corrupted_tokens, clean_cache, metric, [(name, axes) for name, axes, _ in _HEAD_BY_POS_KINDS]
    )
    parts[-1] = rearrange(parts[-1], "layer head pos -> layer pos head")
    return torch.stack([_pad_heads(p, model.cfg.n_heads) for p in parts])
