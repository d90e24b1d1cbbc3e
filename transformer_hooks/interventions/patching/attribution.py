"""Attribution patching: the first-order estimate of every patch's effect from one corrupted
forward and one backward (the package docstring states the formula). ``get_attr_patch_X``
has the grid and shape of ``get_act_patch_X``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from jaxtyping import Float, Int

from ... import sites as site_table  # `sites` names arguments here
from ...components.softcap import softcap
from ...hooks import HookPoint
from ...protocol import HookedModel
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
    _shape_doc,
    _stacked,
)


def attribution_products(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: PatchingMetric,
    sites: Sequence[str],
) -> dict[str, torch.Tensor] | None:
    """``(clean - corrupted) * d metric / d activation`` at each site, elementwise, from one
    corrupted forward and one backward. Summing it over a patch's elements estimates that
    patch's effect on the metric (to first order).

    The gradient is taken with ``torch.autograd.grad`` of the metric with respect to the
    sites' activations only, so no parameter's ``.grad`` is touched. ``sites`` are full
    hook names; ``model``, ``corrupted_tokens``, ``clean_cache`` and ``patching_metric`` as
    in the package docstring.

    Split over processes (``pipeline_ranks``): every rank calls it (``clean_cache`` is read on
    rank 0; the other ranks may pass None); the gradient crosses the ranks backwards, each
    rank computes its own sites' products and rank 0 returns them all (None elsewhere).
    """
    tokens = _corrupted_tokens(model, corrupted_tokens)
    clean = _clean_sites(model, clean_cache, sites, tokens)
    _trial_metric(model, patching_metric, tokens, vectorized=False)
    acts, grads = _acts_and_grads(model, tokens, patching_metric, list(clean))
    products = {site: (clean[site] - acts[site]) * grads[site] for site in acts}
    return model.blocks.from_sites(products, list(clean))


def _clean_sites(
    model: HookedModel, clean_cache: Any, sites: Sequence[str], tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each site's clean activation, read from the cache where the output is and sent to the
    process that runs the site (``model.blocks.to_sites``)."""
    for site in sites:
        model.resolve_hook_names([site])
        if site_table.split_name(site)[1] == "attn.hook_attn_scores":
            raise ValueError(
                "attention scores hold -inf at masked positions, so (clean - corrupted) is undefined "
                "there; attribute to 'pattern' instead"
            )
    clean = None
    if model.blocks.gets_output:
        clean = {site: _clean_activation(model, clean_cache, site, tokens) for site in sites}
    return model.blocks.to_sites(clean)


def _acts_and_grads(
    model: HookedModel,
    tokens: torch.Tensor,
    patching_metric: PatchingMetric,
    sites: Sequence[str],
    drop_layer: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The corrupted run's activations at ``sites`` and the metric's gradient there (zeros
    where the metric does not depend on a site). ``drop_layer``: GradDrop, the gradient
    flowing back through that block's writes to the residual stream (attn_out, mlp_out) is
    zeroed. Split over processes, each rank returns the sites it runs (``model.blocks.grad``)."""
    acts: dict[str, torch.Tensor] = {}

    def as_leaf(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        # The graph must reach every site even when the weights do not require grad.
        return None if x.requires_grad else x.detach().requires_grad_(True)

    def keep(x: torch.Tensor, hook: HookPoint) -> None:
        acts[hook.name] = x

    def drop(grad: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return torch.zeros_like(grad)

    hooks = [("hook_embed", as_leaf)] + [(site, keep) for site in sites]
    bwd = []
    if drop_layer is not None:
        bwd = [(f"blocks.{drop_layer}.hook_attn_out", drop), (f"blocks.{drop_layer}.hook_mlp_out", drop)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks, bwd_hooks=bwd):
        logits = model(tokens)
        value = None
        if logits is not None:  # None: another process of a split model gets the logits
            value = patching_metric(logits)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                _check_metric_output(value, 1, vectorized=False)
            if not value.requires_grad:
                raise ValueError(
                    "patching_metric's output does not depend differentiably on the logits (no gradient): "
                    "attribution patching needs a metric built from torch ops on the logits, without "
                    ".item(), argmax or comparisons"
                )
            value = value.sum()
        here = [s for s in sites if s in acts]  # the sites this process runs
        grads = model.blocks.grad(value, [acts[s] for s in here])
    return (
        {s: acts[s].detach() for s in here},
        {s: torch.zeros_like(acts[s]) if g is None else g.detach() for s, g in zip(here, grads, strict=True)},
    )


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


METHODS = ("atp", "atp*")


def generic_attribution_patch(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: PatchingMetric,
    activation_name: str,
    index_axis_names: Sequence[str],
    *,
    method: str = "atp",
    grad_drop: bool = False,
) -> torch.Tensor | None:
    """Attribution-patching estimate of ``generic_activation_patch(...) - metric(corrupted logits)``.

    Same grid and shape as the sweep with these ``index_axis_names`` (layer first), for any
    patch setter that writes whole slices (the standard ones): the estimate for an index
    sums ``(clean - corrupted) * grad`` over the batch and every axis not indexed.

    ``method="atp*"`` (Kramar et al. 2024, "AtP*"): for query and key patches the attention
    softmax is recomputed exactly instead of linearised (the QK fix). A patched query at
    position t gives row t the scores ``q'_t . k_s``; a patched key at position s changes
    column s of every row; the new pattern ``A'`` is an exact softmax and the estimate is
    ``sum (A' - A) * d metric / d A`` (linear only after the pattern). Plain AtP misses the
    effect of a key whose score moves a saturated softmax (its gradient there is ~0). A key
    head patched at all positions moves every query head of its GQA group at once; their
    terms are summed (tested against that brute force to 1e-5).

    What the QK fix does not fix is everything after the pattern: when a patch moves the
    pattern far (a row switching keys, |A' - A| ~ 1) and the layers above are far from linear,
    AtP* is the right slope at the corrupted pattern and still misses. SmolLM2-135M on IOI,
    keys at all positions: correlation with exact patching 0.9998 for AtP*, 0.865 for AtP; on
    the 2-layer random test checkpoints AtP* can lose on a layer-0 key whose patch flips a
    random x8-scaled block above it (``benchmarks/RESULTS.md``, circuits).

    ``grad_drop=True`` (GradDrop, from the same paper): the estimate is made once per block
    ``l`` with the gradient through block l's residual writes (attn_out, mlp_out) zeroed, and
    the result is ``sum_l |estimate_l| / (n_layers - 1)``: a non-negative ranking score
    against cancellation of paths, not a signed effect.

    ``activation_name``: the site's short name (``"z"``, ``"resid_pre"``, ...); ``model``,
    ``corrupted_tokens``, ``clean_cache`` and ``patching_metric`` as in the package docstring.
    """
    parts = _attribution(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        [(activation_name, tuple(index_axis_names))],
        method=method,
        grad_drop=grad_drop,
    )
    return None if parts is None else parts[0]


def _attribution(
    model: HookedModel,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: PatchingMetric,
    kinds: Sequence[tuple[str, tuple[str, ...]]],
    method: str = "atp",
    grad_drop: bool = False,
) -> list[torch.Tensor] | None:
    """One forward and backward (per dropped layer with ``grad_drop``) for several (activation_name, axes) kinds.
    Split over processes: rank 0 returns them, the other ranks None."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_layers = model.cfg.n_layers
    for _, axes in kinds:
        _check_axes(axes)
    tokens = _corrupted_tokens(model, corrupted_tokens)
    sites = {name: [_site(model, name, layer) for layer in range(n_layers)] for name, _ in kinds}
    wanted = list(dict.fromkeys(s for names in sites.values() for s in names))
    clean = _clean_sites(model, clean_cache, wanted, tokens)
    qk: dict[str, tuple[str, int, tuple[str, ...]]] = {}  # site -> ("q"|"k", layer, axes) for the QK fix
    if method == "atp*":
        for name, axes in kinds:
            for layer, site in enumerate(sites[name]):
                if site.endswith(("attn.hook_q", "attn.hook_k")):
                    qk[site] = (site[-1], layer, axes)
    extra, clean_post = _qk_sites(model, clean_cache, tokens, sorted({lay for _, lay, _ in qk.values()}))
    _trial_metric(model, patching_metric, tokens, vectorized=False)

    def estimate(drop_layer: int | None) -> list[torch.Tensor] | None:
        acts, grads = _acts_and_grads(model, tokens, patching_metric, list(dict.fromkeys(wanted + extra)), drop_layer)
        local = {}  # each estimate where its site runs, keyed "site/kind" (split over processes)
        for i, (name, axes) in enumerate(kinds):
            for site in sites[name]:
                if site not in acts:
                    continue
                if site in qk:
                    which, layer, _ = qk[site]
                    local[f"{site}/{i}"] = _qk_fixed(model, layer, which, axes[1:], acts, grads, clean_post)
                else:
                    local[f"{site}/{i}"] = _reduce((clean[site] - acts[site]) * grads[site], site, axes[1:])
        names = [f"{site}/{i}" for i, (name, _) in enumerate(kinds) for site in sites[name]]
        got = model.blocks.from_sites(local, names)
        if got is None:  # rank 0 of a split model has them
            return None
        return [torch.stack([got[f"{site}/{i}"] for site in sites[name]]).detach() for i, (name, _) in enumerate(kinds)]

    if not grad_drop:
        return estimate(None)
    runs = [estimate(layer) for layer in range(n_layers)]
    if any(run is None for run in runs):
        return None
    # runs is non-empty (one per layer), so each sum is a tensor.
    return [
        cast(torch.Tensor, sum(cast(list, run)[i].abs() for run in runs)) / max(n_layers - 1, 1)
        for i in range(len(kinds))
    ]


def _post_names(model: HookedModel, layer: int) -> tuple[str, str]:
    """The query and key vectors the scores are made of: after q/k norms and rotary."""
    if model.cfg.qk_norm == "all":
        raise ValueError(
            "method='atp*' patches one head's query or key, but this model's q/k norm reads all heads "
            "at once (qk_norm='all'), so the patched head's score is not the clean one; use method='atp'"
        )
    if model.cfg.positional_embedding == "rotary":
        return f"blocks.{layer}.attn.hook_rot_q", f"blocks.{layer}.attn.hook_rot_k"
    if model.cfg.qk_norm is not None:
        raise ValueError("method='atp*' needs a rotary model when queries and keys are normalised")
    return f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"


def _qk_sites(
    model: HookedModel, clean_cache: Any, tokens: torch.Tensor, layers: Sequence[int]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Sites the QK fix reads in the corrupted run, and the clean query/key vectors (where
    their block runs: ``model.blocks.to_sites``)."""
    extra, names = [], []
    for layer in layers:
        q, k = _post_names(model, layer)
        names += [q, k]
        extra += [q, k, f"blocks.{layer}.attn.hook_attn_scores", f"blocks.{layer}.attn.hook_pattern"]
    clean = None
    if model.blocks.gets_output:
        clean = {site: _clean_activation(model, clean_cache, site, tokens) for site in names}
    return extra, model.blocks.to_sites(clean)


def _scores(attn: Any, q: torch.Tensor, k: torch.Tensor, group: int) -> Float[torch.Tensor, "batch head q_pos k_pos"]:
    """Unmasked attention scores from query vectors [batch, pos, head, d_head] and keys
    [batch, pos, kv_head, d_head]."""
    x = torch.einsum("bthd,bshd->bhts", q * attn.scale, k.repeat_interleave(group, dim=2))
    return x if attn.softcap is None else softcap(x, attn.softcap)


def _qk_fixed(
    model: HookedModel,
    layer: int,
    which: str,
    axes: tuple[str, ...],
    acts: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    clean_post: dict[str, torch.Tensor],
) -> torch.Tensor:
    """AtP*'s estimate for patching the queries or keys of each head: exact softmax, then linear."""
    axes = tuple("head" if a == "head_index" else a for a in axes)
    if axes not in (("pos", "head"), ("head",)):
        raise ValueError(f"method='atp*' estimates {which} patches by (pos, head) or (head,), not {list(axes)}")
    attn = model.blocks[layer].attn
    group = 1 if model.cfg.ungroup_grouped_query_attention else model.cfg.group_size  # k's heads per q head
    qn, kn = _post_names(model, layer)
    dtype = acts[qn].dtype
    pattern = acts[f"blocks.{layer}.attn.hook_pattern"].double()  # [batch, head, t, s]
    g = grads[f"blocks.{layer}.attn.hook_pattern"].double()
    old = acts[f"blocks.{layer}.attn.hook_attn_scores"].double()
    masked = torch.isneginf(old)
    q, k = acts[qn].double(), acts[kn].double()
    pg = pattern * g
    if which == "q" or axes == ("head",):
        # Whole rows (a query) or whole key sets change: recompute the softmax of the new scores.
        new = (
            _scores(attn, clean_post[qn].double(), k, group)
            if which == "q"
            else _scores(attn, q, clean_post[kn].double(), group)
        )
        new_pattern = new.masked_fill(masked, float("-inf")).softmax(-1)
        delta = ((new_pattern - pattern) * g).sum(-1)  # [batch, head, t]
        if which == "q":
            return (delta.sum(0).T if axes == ("pos", "head") else delta.sum((0, 2))).to(dtype)
        return delta.sum((0, 2)).unflatten(0, (-1, group)).sum(1).to(dtype)  # [kv_head]
    # One key position s at a time: row t's score s moves from old[t, s] to new[t, s]; with
    # w = new - logsumexp(old row) and r = 1 - A_s + exp(w) (the ratio of normalisers),
    # A'_j = A_j / r (j != s), A'_s = exp(w) / r, so sum_j (A'_j - A_j) g_j = (P - A_s g_s) / r + exp(w) g_s / r - P
    # with P = sum_j A_j g_j; computed in log space, exact for saturated rows.
    new = _scores(attn, q, clean_post[kn].double(), group)  # [batch, head, t, s]
    w = new - torch.logsumexp(old, -1, keepdim=True)
    log_r = torch.logaddexp(torch.log1p(-pattern.clamp(max=1.0)), w)
    total = pg.sum(-1, keepdim=True)
    delta = (total - pg) * torch.exp(-log_r) + g * torch.exp(w - log_r) - total
    delta = delta.masked_fill(masked, 0.0)
    per_head = delta.sum((0, 2))  # [head, s]
    return per_head.unflatten(0, (-1, group)).sum(1).T.to(dtype)  # [pos (key), kv_head]


def _attr(name: str, activation_name: str, index_axis_names: tuple[str, ...], what: str) -> Callable:
    """The attribution counterpart of ``_sweep``, called ``name``: same site, axes and output shape."""

    def attribution(
        model: HookedModel,
        corrupted_tokens: Int[torch.Tensor, "batch pos"],
        clean_cache: Any,
        patching_metric: PatchingMetric,
        *,
        method: str = "atp",
        grad_drop: bool = False,
    ) -> torch.Tensor | None:
        return generic_attribution_patch(
            model,
            corrupted_tokens,
            clean_cache,
            patching_metric,
            activation_name,
            index_axis_names,
            method=method,
            grad_drop=grad_drop,
        )

    attribution.index_axis_names = index_axis_names  # type: ignore[attr-defined]  # read by the sweep command
    return _named(
        attribution,
        name,
        f"Attribution patching of {what}: "
        f"``{_shape_doc(activation_name, index_axis_names)}``, the first-order estimate "
        f"of each patch's effect on the metric (package docstring). ``method='atp*'`` and "
        f"``grad_drop`` as in ``generic_attribution_patch``.",
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
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    metric: PatchingMetric,
    **kwargs: Any,
) -> Float[torch.Tensor, "3 layer pos"] | None:
    """Attribution estimates for resid_pre, attn_out, mlp_out by (layer, pos): ``[3, layer, pos]``, one backward.

    ``model``, ``corrupted_tokens``, ``clean_cache``, ``metric`` and ``**kwargs`` (``method``,
    ``grad_drop``) as in the package docstring (``transformer_hooks.interventions.patching``).
    """
    parts = _attribution(
        model, corrupted_tokens, clean_cache, metric, [(name, axes) for name, axes, _ in _BLOCK_KINDS], **kwargs
    )
    return _stacked(parts)


def get_attr_patch_attn_head_all_pos_every(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    metric: PatchingMetric,
    **kwargs: Any,
) -> Float[torch.Tensor, "5 layer head"] | None:
    """Attribution estimates for z, q, k, v, pattern per head: ``[5, layer, head]`` (GQA k/v padded with 0).

    ``model``, ``corrupted_tokens``, ``clean_cache``, ``metric`` and ``**kwargs`` (``method``,
    ``grad_drop``) as in the package docstring (``transformer_hooks.interventions.patching``).
    """
    parts = _attribution(
        model, corrupted_tokens, clean_cache, metric, [(name, axes) for name, axes, _ in _HEAD_ALL_POS_KINDS], **kwargs
    )
    return _stacked(parts, model.cfg.n_heads)


def get_attr_patch_attn_head_by_pos_every(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    metric: PatchingMetric,
    **kwargs: Any,
) -> Float[torch.Tensor, "5 layer pos head"] | None:
    """Attribution estimates for z, q, k, v, pattern per head and position: ``[5, layer, pos, head]``.

    ``model``, ``corrupted_tokens``, ``clean_cache``, ``metric`` and ``**kwargs`` (``method``,
    ``grad_drop``) as in the package docstring (``transformer_hooks.interventions.patching``).
    """
    parts = _attribution(
        model, corrupted_tokens, clean_cache, metric, [(name, axes) for name, axes, _ in _HEAD_BY_POS_KINDS], **kwargs
    )
    return _stacked(parts, model.cfg.n_heads, pattern_by_pos=True)
