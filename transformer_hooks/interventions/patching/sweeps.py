"""TransformerLens's activation-patching sweeps, ``get_act_patch_*``: ``generic_activation_patch``
with the site, patch setter and index axes fixed, each a module-level function with its own
name, signature and docstring. The ``_every`` sweeps run several of them through one stream
of chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float, Int

from ...protocol import HookedModel
from .engine import (
    DEFAULT_MAX_BATCH_BYTES,
    Patch,
    PatchingMetric,
    PatchSetter,
    _corrupted_tokens,
    _grid,
    _site,
    generic_activation_patch,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    sweep_patches,
)

_POS = ("layer", "pos")
_POS_HEAD = ("layer", "pos", "head")
_HEAD = ("layer", "head")
_PATTERN_POS = ("layer", "head_index", "dest_pos")
_PATTERN_DEST_SRC = ("layer", "head_index", "dest_pos", "src_pos")
_PATTERN = ("layer", "head_index")
_KV = " (GQA: kv heads, n_kv_heads of them)"


def _shape_doc(activation_name: str, index_axis_names: tuple[str, ...]) -> str:
    kv = activation_name in ("k", "v")
    names = ["kv_head" if kv and a.startswith("head") else "head" if a == "head_index" else a for a in index_axis_names]
    return f"[{', '.join(names)}]"


def _named(fn: Callable, name: str, doc: str) -> Callable:
    """Give a generated function the identity of the module-level name it is assigned to."""
    fn.__name__ = name
    fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = doc
    return fn


def _sweep(
    name: str, activation_name: str, index_axis_names: tuple[str, ...], patch_setter: PatchSetter, what: str
) -> Callable:
    """A TL-style specialised sweep called ``name``: ``generic_activation_patch`` with its site, setter and
    axes fixed."""

    def sweep(
        model: HookedModel,
        corrupted_tokens: Int[torch.Tensor, "batch pos"],
        clean_cache: Any,
        patching_metric: PatchingMetric,
        *,
        return_index_df: bool = False,
        batch_size: int | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        vectorized_metric: bool = False,
        progress: bool = True,
        metric_positions: int | Sequence[int] | None = None,
    ) -> Any:
        return generic_activation_patch(
            model,
            corrupted_tokens,
            clean_cache,
            patching_metric,
            patch_setter=patch_setter,
            activation_name=activation_name,
            index_axis_names=index_axis_names,
            return_index_df=return_index_df,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            vectorized_metric=vectorized_metric,
            progress=progress,
            metric_positions=metric_positions,
        )

    sweep.index_axis_names = index_axis_names  # type: ignore[attr-defined]  # read by the sweep command
    return _named(
        sweep,
        name,
        f"Activation patching of {what}: ``{_shape_doc(activation_name, index_axis_names)}``, "
        f"the metric after patching each index.\n\n    Keyword options (batch_size, "
        f"max_batch_bytes, vectorized_metric, progress, metric_positions) as in "
        f"``generic_activation_patch``.",
    )


get_act_patch_resid_pre = _sweep(
    "get_act_patch_resid_pre", "resid_pre", _POS, layer_pos_patch_setter, "the residual stream entering each block"
)
get_act_patch_resid_mid = _sweep(
    "get_act_patch_resid_mid",
    "resid_mid",
    _POS,
    layer_pos_patch_setter,
    "the residual stream between attention and MLP",
)
get_act_patch_resid_post = _sweep(
    "get_act_patch_resid_post", "resid_post", _POS, layer_pos_patch_setter, "the residual stream leaving each block"
)
get_act_patch_attn_out = _sweep(
    "get_act_patch_attn_out", "attn_out", _POS, layer_pos_patch_setter, "each attention layer's output"
)
get_act_patch_mlp_out = _sweep(
    "get_act_patch_mlp_out", "mlp_out", _POS, layer_pos_patch_setter, "each MLP layer's output"
)
get_act_patch_attn_head_out_by_pos = _sweep(
    "get_act_patch_attn_head_out_by_pos",
    "z",
    _POS_HEAD,
    layer_pos_head_vector_patch_setter,
    "each head's output z at each position",
)
get_act_patch_attn_head_q_by_pos = _sweep(
    "get_act_patch_attn_head_q_by_pos",
    "q",
    _POS_HEAD,
    layer_pos_head_vector_patch_setter,
    "each head's query at each position",
)
get_act_patch_attn_head_k_by_pos = _sweep(
    "get_act_patch_attn_head_k_by_pos",
    "k",
    _POS_HEAD,
    layer_pos_head_vector_patch_setter,
    "each key head at each position" + _KV,
)
get_act_patch_attn_head_v_by_pos = _sweep(
    "get_act_patch_attn_head_v_by_pos",
    "v",
    _POS_HEAD,
    layer_pos_head_vector_patch_setter,
    "each value head at each position" + _KV,
)
get_act_patch_attn_head_pattern_by_pos = _sweep(
    "get_act_patch_attn_head_pattern_by_pos",
    "pattern",
    _PATTERN_POS,
    layer_head_pos_pattern_patch_setter,
    "each head's attention pattern row (by destination position)",
)
get_act_patch_attn_head_pattern_dest_src_pos = _sweep(
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "pattern",
    _PATTERN_DEST_SRC,
    layer_head_dest_src_pos_pattern_patch_setter,
    "each entry of each head's attention pattern",
)
get_act_patch_attn_head_out_all_pos = _sweep(
    "get_act_patch_attn_head_out_all_pos",
    "z",
    _HEAD,
    layer_head_vector_patch_setter,
    "each head's output z at all positions",
)
get_act_patch_attn_head_q_all_pos = _sweep(
    "get_act_patch_attn_head_q_all_pos",
    "q",
    _HEAD,
    layer_head_vector_patch_setter,
    "each head's queries at all positions",
)
get_act_patch_attn_head_k_all_pos = _sweep(
    "get_act_patch_attn_head_k_all_pos",
    "k",
    _HEAD,
    layer_head_vector_patch_setter,
    "each key head at all positions" + _KV,
)
get_act_patch_attn_head_v_all_pos = _sweep(
    "get_act_patch_attn_head_v_all_pos",
    "v",
    _HEAD,
    layer_head_vector_patch_setter,
    "each value head at all positions" + _KV,
)
get_act_patch_attn_head_pattern_all_pos = _sweep(
    "get_act_patch_attn_head_pattern_all_pos",
    "pattern",
    _PATTERN,
    layer_head_pattern_patch_setter,
    "each head's whole attention pattern",
)


# The _every sweeps run all their patch kinds through one stream of chunks. Their rows are
# the kinds below, in TransformerLens's order.
_BLOCK_KINDS = (
    ("resid_pre", _POS, layer_pos_patch_setter),
    ("attn_out", _POS, layer_pos_patch_setter),
    ("mlp_out", _POS, layer_pos_patch_setter),
)
_HEAD_ALL_POS_KINDS = (
    ("z", _HEAD, layer_head_vector_patch_setter),
    ("q", _HEAD, layer_head_vector_patch_setter),
    ("k", _HEAD, layer_head_vector_patch_setter),
    ("v", _HEAD, layer_head_vector_patch_setter),
    ("pattern", _PATTERN, layer_head_pattern_patch_setter),
)
_HEAD_BY_POS_KINDS = (
    ("z", _POS_HEAD, layer_pos_head_vector_patch_setter),
    ("q", _POS_HEAD, layer_pos_head_vector_patch_setter),
    ("k", _POS_HEAD, layer_pos_head_vector_patch_setter),
    ("v", _POS_HEAD, layer_pos_head_vector_patch_setter),
    ("pattern", _PATTERN_POS, layer_head_pos_pattern_patch_setter),
)


def _every(
    model: HookedModel,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: PatchingMetric,
    kinds: tuple,
    desc: str,
    **run_kwargs: Any,
) -> list[torch.Tensor] | None:
    """One sweep over several sites' grids (``kinds``: name, axes, setter), split back per site
    (None where a split model's output is not). ``run_kwargs``: ``run_patches``'s keywords
    (batch_size, max_batch_bytes, ...)."""
    tokens = _corrupted_tokens(model, corrupted_tokens)
    patches, grids = [], []
    for name, axes, setter in kinds:
        grid, rows = _grid(model, name, axes, tokens.shape[1])
        patches += [Patch(_site(model, name, row[0]), row, setter) for row in rows]
        grids.append(grid)
    values = sweep_patches(model, tokens, clean_cache, patches, patching_metric, desc=desc, **run_kwargs)
    if values is None:
        return None
    return [part.reshape(grid) for part, grid in zip(values.split([_numel(g) for g in grids]), grids, strict=True)]


def _numel(grid: list[int]) -> int:
    n = 1
    for size in grid:
        n *= size
    return n


def _pad_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Pad a kv-head axis (last) to n_heads with 0, as TransformerLens does: those heads do not exist,
    and a 0 keeps sums, maxima and plots of the stacked rows usable."""
    missing = n_heads - t.shape[-1]
    return torch.nn.functional.pad(t, (0, missing), value=0.0) if missing else t


def _stacked(
    parts: list[torch.Tensor] | None, n_heads: int | None = None, pattern_by_pos: bool = False
) -> torch.Tensor | None:
    """The per-site parts of a sweep over several sites (``_every``, or attribution's), stacked;
    None where a split model's output is not. With ``n_heads``, each kv-head axis is padded to
    it (``_pad_heads``); with ``pattern_by_pos``, the last part (the pattern's [layer, head, pos])
    is turned to [layer, pos, head] as the others are."""
    if parts is None:
        return None
    if pattern_by_pos:
        parts = [*parts[:-1], rearrange(parts[-1], "layer head pos -> layer pos head")]
    if n_heads is not None:
        parts = [_pad_heads(p, n_heads) for p in parts]
    return torch.stack(parts)


def get_act_patch_block_every(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    metric: PatchingMetric,
    **kwargs: Any,
) -> Float[torch.Tensor, "3 layer pos"] | None:
    """``resid_pre``, ``attn_out`` and ``mlp_out`` sweeps by (layer, pos), stacked: ``[3, layer, pos]``.

    ``model``, ``corrupted_tokens``, ``clean_cache``, ``metric`` and ``**kwargs`` as in the
    package docstring (``transformer_hooks.interventions.patching``).
    """
    return _stacked(_every(model, corrupted_tokens, clean_cache, metric, _BLOCK_KINDS, "patching block", **kwargs))


def get_act_patch_attn_head_all_pos_every(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    metric: PatchingMetric,
    **kwargs: Any,
) -> Float[torch.Tensor, "5 layer head"] | None:
    """Every head (all positions) for output z, q, k, v and pattern: ``[5, layer, head]``.

    Under GQA the k and v rows have n_kv_heads real entries; the rest are 0 (as TransformerLens).

    ``model``, ``corrupted_tokens``, ``clean_cache``, ``metric`` and ``**kwargs`` as in the
    package docstring (``transformer_hooks.interventions.patching``).
    """
    parts = _every(model, corrupted_tokens, clean_cache, metric, _HEAD_ALL_POS_KINDS, "patching heads", **kwargs)
    return _stacked(parts, model.cfg.n_heads)


def get_act_patch_attn_head_by_pos_every(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    metric: PatchingMetric,
    **kwargs: Any,
) -> Float[torch.Tensor, "5 layer pos head"] | None:
    """Every head at every position for z, q, k, v and pattern (by destination): ``[5, layer, pos, head]``.

    Under GQA the k and v rows have n_kv_heads real entries; the rest are 0 (as TransformerLens).

    ``model``, ``corrupted_tokens``, ``clean_cache``, ``metric`` and ``**kwargs`` as in the
    package docstring (``transformer_hooks.interventions.patching``).
    """
    parts = _every(model, corrupted_tokens, clean_cache, metric, _HEAD_BY_POS_KINDS, "patching heads by pos", **kwargs)
    return _stacked(parts, model.cfg.n_heads, pattern_by_pos=True)
