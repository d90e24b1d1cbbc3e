"""Activation patching sweeps and attribution patching, with TransformerLens's names.

Activation patching runs the model on the *corrupted* input, replaces one activation
(one site, at some layer, position or head) with its value from the *clean* run, and
records ``patching_metric`` of the patched logits. A sweep does this for every index of
a grid, e.g. every (layer, pos) of ``resid_pre``::

    out[layer, pos] = metric(model(corrupted, with resid_pre[layer][:, pos] := clean[:, pos]))

Signatures and output shapes are TransformerLens's (``patching.py`` of TL 2.x/3.x):
``get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)`` ->
``[layer, pos]``, heads ``[layer, pos, head]`` / ``[layer, head]``, patterns
``[layer, head, dest_pos]``, ``get_act_patch_block_every`` -> ``[3, layer, pos]``.

What is different: many patches run in one forward. Each patch is a copy of the
corrupted batch with one site patched; copies are stacked on the batch axis, so a chunk
of ``n`` patches is one forward on up to ``n * batch`` rows, and a patch at layer ``L``
joins the stacked batch at block ``L`` from the corrupted run's ``resid_pre`` (its rows are
identical before that), so no row runs a block below its patch. ``metric_positions=-1`` (or
any positions) declares the only positions the metric reads: the others are not unembedded
(NaN in the logits the metric gets). Every row computes exactly what its own forward would, so
the numbers are those of one patch per forward (tested against that loop). Chunks are
sized to a memory budget (``max_batch_bytes``) or a fixed ``batch_size`` (patches per
forward).

The metric contract
-------------------
``patching_metric(logits)`` takes the logits of ONE patched run, ``[batch, pos,
d_vocab]`` (the corrupted batch's shape), and returns one number (a 0-d tensor, a
one-element tensor or a float), exactly as in TransformerLens. The sweep calls it once
per patch on that patch's slice of the stacked logits, so any TL metric works
unchanged. For speed, ``vectorized_metric=True`` declares instead a metric that takes
``[n_patches, batch, pos, d_vocab]`` and returns ``[n_patches]``; it is called once per
chunk. Before any forward, the metric is called once on zero logits of the right shape
to check what it returns (shapes do not depend on values; a wrong shape fails here,
not after minutes of forwards).

Attribution patching
--------------------
The first-order Taylor estimate of every patch's *effect* (patched metric minus the
corrupted run's metric), from one corrupted forward and one backward (the clean
forward is the one that made ``clean_cache``)::

    attr[layer, idx] = sum_{elements e of the patched slice} (clean[e] - corrupted[e]) * d metric / d act[e]

evaluated at the corrupted run. ``get_attr_patch_X`` estimates ``get_act_patch_X -
metric(corrupted logits)`` with the same shape; the ``_every`` variants share one
backward. The estimate is exact when the metric is affine in the patched activation.

AtP* (Kramar et al. 2024): ``method="atp*"`` on any ``get_attr_patch_*`` recomputes the
attention softmax exactly for query and key patches instead of linearising through it, and
``grad_drop=True`` averages |estimate| over runs that each drop one block's gradient. On the
IOI prompt of ``notebooks/ioi_circuit.ipynb`` (SmolLM2-135M, each head's queries at all
positions, layers 20-29), the Pearson correlation with exact patching is 0.967 for AtP and
0.997 for AtP*; on two prompts over all 30 layers, 0.71 and 0.92 (queries) and 0.865 and
0.9998 (key heads at all positions). Tests: AtP* beats AtP on
small models whose attention saturates (``tests/test_circuits.py``).

Ablations (``ablation``): zero, mean and resample ablations of any site, head, neuron or
position set, as one call (``ablate``), a list (``run_ablations``) or a sweep
(``ablation_sweep``), through the same stacked engine.

Custom sweeps: ``run_patches(model, tokens, clean_activations, [Patch(site, index,
setter), ...], metric)`` runs any list of patches (mixed sites and setters) through the
same stacked engine; ``attribution_products`` gives the elementwise attribution of any
sites for your own reductions.

Arguments the sweeps share: ``model``; ``corrupted_tokens`` [batch, pos], the input that is
run and patched; ``clean_cache``, the clean run's cache (``model.run_with_cache(clean_tokens)``),
with at least the patched sites, of the same batch and length; ``patching_metric`` (``metric``
in the ``_every`` sweeps), as the metric contract above; and, as ``**kwargs`` of a sweep,
``generic_activation_patch``'s keyword options (``batch_size``, ``max_batch_bytes``,
``vectorized_metric``, ``progress``, ``metric_positions``), or for attribution
``generic_attribution_patch``'s (``method``, ``grad_drop``).

Axis vocabulary (TL's ``index_axis_names``): ``layer``, ``pos``, ``head`` (alias
``head_index``; key/value sites count ``kv_head``s, n_kv_heads of them), ``dest_pos``,
``src_pos`` (attention patterns). The first axis is always ``layer``.

Layout: ``engine`` (``Patch``, ``run_patches``, ``generic_activation_patch``, the patch
setters and the checks), ``sweeps`` (TL's ``get_act_patch_*``), ``attribution``
(``attribution_products``, ``generic_attribution_patch``, ``get_attr_patch_*``, AtP*),
``ablation`` (``ablate``, ``run_ablations``, ``ablation_sweep``). Every
public name is importable from ``transformer_hooks.interventions.patching``.
"""

from .ablation import Ablation, ablate, ablation_sweep, ablation_value, run_ablations
from .attribution import (
    attribution_products,
    generic_attribution_patch,
    get_attr_patch_attn_head_all_pos_every,
    get_attr_patch_attn_head_by_pos_every,
    get_attr_patch_attn_head_k_all_pos,
    get_attr_patch_attn_head_k_by_pos,
    get_attr_patch_attn_head_out_all_pos,
    get_attr_patch_attn_head_out_by_pos,
    get_attr_patch_attn_head_pattern_all_pos,
    get_attr_patch_attn_head_pattern_by_pos,
    get_attr_patch_attn_head_pattern_dest_src_pos,
    get_attr_patch_attn_head_q_all_pos,
    get_attr_patch_attn_head_q_by_pos,
    get_attr_patch_attn_head_v_all_pos,
    get_attr_patch_attn_head_v_by_pos,
    get_attr_patch_attn_out,
    get_attr_patch_block_every,
    get_attr_patch_mlp_out,
    get_attr_patch_resid_mid,
    get_attr_patch_resid_post,
    get_attr_patch_resid_pre,
)
from .engine import (
    AXES,
    DEFAULT_MAX_BATCH_BYTES,
    Logits,
    Patch,
    PatchingMetric,
    PatchSetter,
    generic_activation_patch,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    make_df_from_ranges,
    run_patches,
)
from .sweeps import (
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_by_pos_every,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_post,
    get_act_patch_resid_pre,
)

__all__ = [
    "Ablation",
    "ablate",
    "ablation_sweep",
    "ablation_value",
    "run_ablations",
    "attribution_products",
    "AXES",
    "DEFAULT_MAX_BATCH_BYTES",
    "generic_activation_patch",
    "generic_attribution_patch",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_block_every",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_post",
    "get_act_patch_resid_pre",
    "get_attr_patch_attn_head_all_pos_every",
    "get_attr_patch_attn_head_by_pos_every",
    "get_attr_patch_attn_head_k_all_pos",
    "get_attr_patch_attn_head_k_by_pos",
    "get_attr_patch_attn_head_out_all_pos",
    "get_attr_patch_attn_head_out_by_pos",
    "get_attr_patch_attn_head_pattern_all_pos",
    "get_attr_patch_attn_head_pattern_by_pos",
    "get_attr_patch_attn_head_pattern_dest_src_pos",
    "get_attr_patch_attn_head_q_all_pos",
    "get_attr_patch_attn_head_q_by_pos",
    "get_attr_patch_attn_head_v_all_pos",
    "get_attr_patch_attn_head_v_by_pos",
    "get_attr_patch_attn_out",
    "get_attr_patch_block_every",
    "get_attr_patch_mlp_out",
    "get_attr_patch_resid_mid",
    "get_attr_patch_resid_post",
    "get_attr_patch_resid_pre",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
    "Logits",
    "make_df_from_ranges",
    "Patch",
    "PatchingMetric",
    "PatchSetter",
    "run_patches",
]
