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
of ``n`` patches is one forward on ``n * batch`` rows, and a chunk whose patches all sit
at layer ``>= L`` starts at block ``L`` from the corrupted run's ``resid_pre`` (the rows
are identical before that). Every row computes exactly what its own forward would, so
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

Custom sweeps: ``run_patches(model, tokens, clean_activations, [Patch(site, index,
setter), ...], metric)`` runs any list of patches (mixed sites and setters) through the
same stacked engine; ``attribution_products`` gives the elementwise attribution of any
sites for your own reductions.

Axis vocabulary (TL's ``index_axis_names``): ``layer``, ``pos``, ``head`` (alias
``head_index``; key/value sites count ``kv_head``s, n_kv_heads of them), ``dest_pos``,
``src_pos`` (attention patterns). The first axis is always ``layer``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from . import sites
from .hooks import HookPoint
from .utils import get_act_name

Logits = Float[torch.Tensor, "batch pos d_vocab"]
PatchingMetric = Callable[[Logits], Any]
PatchSetter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]

AXES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos")
DEFAULT_MAX_BATCH_BYTES = 512 * 2**20

# sites.py's axis names as TL's sweeps call them: a pattern's query/key positions are
# dest_pos/src_pos, kv heads are indexed as heads, and every feature axis is one "d".
_SWEEP_AXIS = {"query_pos": "dest_pos", "key_pos": "src_pos", "kv_head": "head"}


# Patch setters (TransformerLens's): (corrupted activation [batch, ...], index, clean activation) -> patched.
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, pos); activation [batch, pos, ...]."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, pos, head); activation [batch, pos, head, ...] (q, k, v, z, result)."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head); every position of one head; activation [batch, pos, head, ...]."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head); activation [batch, head, dest_pos, src_pos]."""
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head, dest_pos); activation [batch, head, dest_pos, src_pos]."""
    _, head, dest_pos = index
    corrupted_activation[:, head, dest_pos] = clean_activation[:, head, dest_pos]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head, dest_pos, src_pos); activation [batch, head, dest_pos, src_pos]."""
    _, head, dest_pos, src_pos = index
    corrupted_activation[:, head, dest_pos, src_pos] = clean_activation[:, head, dest_pos, src_pos]
    return corrupted_activation


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """A pandas DataFrame of every index in the grid, last column fastest (as TL's)."""
    pd = _pandas("make_df_from_ranges")
    return pd.DataFrame(list(itertools.product(*(range(n) for n in column_max_ranges))), columns=list(column_names))


def _pandas(what: str) -> Any:
    try:
        import pandas
    except ImportError as e:
        raise ImportError(f"{what} returns a pandas DataFrame, but pandas is not installed: `pip install pandas`, "
                          f"or pass index_df as an integer tensor of rows [n_patches, n_axes]") from e
    return pandas


# Checks, all before any forward --------------------------------------------------------
def _corrupted_tokens(model: Any, corrupted_tokens: Any) -> Int[torch.Tensor, "batch pos"]:
    tokens, mask = model.tokens_and_mask(corrupted_tokens)
    if mask is not None:
        raise ValueError("the corrupted prompts have different lengths (the batch is padded); patching compares "
                         "positions across runs, so give prompts of equal token length")
    return tokens


def _layout(site: str) -> tuple[str, ...]:
    """Axis names of a site's activation (sites.py's, in TL's sweep vocabulary)."""
    row = sites.lookup(site)
    axes = row.axes if row is not None else ("batch", "pos", "d")
    return tuple(_SWEEP_AXIS.get(a, a if a in ("batch", "pos", "head") else "d") for a in axes)


def _site(model: Any, activation_name: str, layer: int | None) -> str:
    """The full hook name (TL: the first index is the layer), checked against the model."""
    try:
        name = get_act_name(activation_name, layer=layer, n_layers=model.cfg.n_layers)
    except ValueError as e:
        raise ValueError(f"activation_name={activation_name!r}: {e}") from None
    model.resolve_hook_names([name])  # raises UnknownHookError, naming the closest sites
    return name


def _clean_activation(model: Any, clean_cache: Any, site: str, tokens: torch.Tensor) -> torch.Tensor:
    """The clean activation of ``site``, checked against the corrupted tokens' shape."""
    if not getattr(clean_cache, "has_batch_dim", True):
        raise ValueError("clean_cache has no batch dimension (made with remove_batch_dim=True); patching needs the "
                         "batch axis: run run_with_cache(clean_tokens) without remove_batch_dim")
    if site not in clean_cache:
        raise KeyError(f"clean_cache holds no {site!r}: cache it with model.run_with_cache(clean_tokens) (no "
                       f"names_filter caches every standard site) or add it to names_filter")
    act = clean_cache[site]
    batch, n_pos = tokens.shape
    pos_dims = [i for i, axis in enumerate(_layout(site)) if axis.endswith("pos")]
    if act.ndim <= max(pos_dims) or act.shape[0] != batch or any(act.shape[i] != n_pos for i in pos_dims):
        raise ValueError(f"clean and corrupted inputs differ in shape: clean_cache[{site!r}] has shape "
                         f"{tuple(act.shape)}, but the corrupted tokens are [batch={batch}, pos={n_pos}]; patching "
                         f"needs clean and corrupted prompts of the same batch size and token length")
    return act.to(model.device)


def _check_metric_output(value: Any, n_patches: int, vectorized: bool) -> torch.Tensor:
    """The metric's output as a float tensor [n_patches], or a clear error."""
    if isinstance(value, (int, float)) and not vectorized:
        return torch.tensor([float(value)])
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"patching_metric returned {type(value).__name__}; it must return a tensor (or a float)")
    if vectorized:
        if value.shape != (n_patches,):
            raise ValueError(f"patching_metric (vectorized_metric=True) returned shape {tuple(value.shape)} for logits "
                             f"of {n_patches} patches; a vectorized metric takes [n_patches, batch, pos, d_vocab] and "
                             f"returns [n_patches]")
        return value.detach().float()
    if value.numel() != 1:
        raise ValueError(f"patching_metric returned shape {tuple(value.shape)}; it must return one number per patched "
                         f"run (reduce over the batch, e.g. with .mean()). To score many patches in one call, "
                         f"write a metric from [n_patches, batch, pos, d_vocab] to [n_patches] and pass "
                         f"vectorized_metric=True")
    return value.detach().float().reshape(1)


def _trial_metric(model: Any, metric: PatchingMetric, tokens: torch.Tensor, vectorized: bool) -> None:
    """Call the metric once on zero logits, to check the shape it returns before any forward."""
    shape = (1, *tokens.shape, model.cfg.d_vocab) if vectorized else (*tokens.shape, model.cfg.d_vocab)
    try:
        value = metric(torch.zeros(shape, dtype=model.dtype, device=model.device))
    except Exception as e:
        e.add_note(f"(raised by patching_metric on trial logits of shape {shape}, called before the sweep to "
                   f"check what it returns)")
        raise
    _check_metric_output(value, 1, vectorized)


def _axis_sizes(model: Any, site: str, n_pos: int) -> dict[str, int]:
    row = sites.lookup(site)
    heads = model.cfg.n_kv_heads if row is not None and "kv_head" in row.axes else model.cfg.n_heads
    return {"layer": model.cfg.n_layers, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos,
            "head": heads, "head_index": heads}


def _check_axes(index_axis_names: Sequence[str]) -> None:
    unknown = [a for a in index_axis_names if a not in AXES]
    if unknown:
        raise ValueError(f"unknown index axis names {unknown}; known: {list(AXES)}")
    if not index_axis_names or index_axis_names[0] != "layer":
        raise ValueError(f"the first index axis must be 'layer' (it picks the hook), got {list(index_axis_names)}")


def _index_rows(index_df: Any) -> list[tuple[int, ...]]:
    """Rows of a pandas DataFrame, a 2-D integer tensor/array, or a list of index tuples."""
    values = index_df.to_numpy() if hasattr(index_df, "to_numpy") else index_df
    rows = torch.as_tensor(values)
    if rows.ndim != 2 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"index_df must be a DataFrame or an integer table [n_patches, n_axes], got "
                         f"{rows.dtype} of shape {tuple(rows.shape)}")
    return [tuple(int(i) for i in row) for row in rows.tolist()]


# The engine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """One patched run: the site, its index (layer first) and how to write the clean values."""

    site: str
    index: tuple[int, ...]
    setter: PatchSetter


def run_patches(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"],
                clean_activations: dict[str, torch.Tensor], patches: Sequence[Patch],
                patching_metric: PatchingMetric, *, batch_size: int | None = None,
                max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, vectorized_metric: bool = False,
                progress: bool = True, desc: str = "patching") -> Float[torch.Tensor, "n_patches"]:
    """The metric of each patched run, stacking patches on the batch axis.

    ``clean_activations`` maps each site to its clean activation; inputs are assumed
    checked (the public sweeps do it). Hooks live inside ``model.hooks()`` for one chunk,
    so an exception (or KeyboardInterrupt) anywhere leaves none attached.
    """
    tokens = corrupted_tokens
    batch = tokens.shape[0]
    # Where a chunk can start: a patch at block L (or later) leaves blocks before L as in the
    # corrupted run, whose resid_pre we cache once. Top-level sites (embed, ln_final) start at 0.
    start_of = [(model.hook_dict[p.site].layer_idx or 0) for p in patches]
    order = sorted(range(len(patches)), key=lambda i: start_of[i])  # stable: grid order within a layer
    per_chunk = _chunk_size(model, tokens, max_batch_bytes) if batch_size is None else batch_size
    if per_chunk < 1:
        raise ValueError(f"batch_size must be at least 1 (patches per forward), got {batch_size}")

    resid_pre: dict[int, torch.Tensor] = {}
    if any(start_of):
        names = [f"blocks.{l}.hook_resid_pre" for l in sorted(set(start_of)) if l > 0]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names, return_cache_object=False)
        resid_pre = {int(n.split(".")[1]): cache[n] for n in names}

    out = torch.empty(len(patches), dtype=torch.float32)
    with tqdm(total=len(patches), desc=desc, disable=not progress) as bar:
        for lo in range(0, len(order), per_chunk):
            chunk = order[lo:lo + per_chunk]
            start = min(start_of[i] for i in chunk)
            n = len(chunk)
            hooks = _chunk_hooks([patches[i] for i in chunk], clean_activations, n, batch)
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                if start == 0:
                    logits = model(tokens.repeat(n, 1))
                else:
                    logits = model(resid_pre[start].repeat(n, 1, 1), start_at_layer=start)
            logits = logits.unflatten(0, (n, batch))  # [patch, batch, pos, d_vocab]
            out[torch.tensor(chunk)] = _metric_per_patch(patching_metric, logits, vectorized_metric).cpu()
            bar.update(n)
    return out.to(model.device)


def _chunk_size(model: Any, tokens: torch.Tensor, max_batch_bytes: int) -> int:
    """Patches per forward that keep the forward's activations under ``max_batch_bytes``.

    Per patch row: the logits (twice: output and the metric's working copy), a few
    residual-sized tensors, the MLP hidden layer (gated: three of them) and, where a
    pattern is observed, one [head, pos, pos] tensor.
    """
    cfg = model.cfg
    batch, n_pos = tokens.shape
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    per_position = 2 * cfg.d_vocab + 8 * cfg.d_model + 4 * cfg.d_mlp + 2 * cfg.n_heads * n_pos
    return max(1, int(max_batch_bytes // (batch * n_pos * per_position * itemsize)))


def _chunk_hooks(patches: list[Patch], clean_activations: dict[str, torch.Tensor], n: int, batch: int
                 ) -> list[tuple[str, Callable]]:
    """One hook per site: row ``i`` of the stacked batch gets patch ``i`` (if it is at that site)."""
    by_site: dict[str, list[tuple[int, Patch]]] = {}
    for row, patch in enumerate(patches):
        by_site.setdefault(patch.site, []).append((row, patch))

    def make_hook(entries: list[tuple[int, Patch]], clean: torch.Tensor) -> Callable:
        def patch_rows(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            # A copy: the incoming tensor may be shared with other parts of the forward.
            activation = activation.clone()
            rows = activation.unflatten(0, (n, batch))  # [patch, batch, ...], a view of the copy
            source = clean.to(activation.dtype)
            for row, patch in entries:
                slot = rows[row]
                patched = patch.setter(slot, patch.index, source)
                if patched is not None and patched is not slot:
                    slot.copy_(patched)
            return activation
        return patch_rows

    return [(site, make_hook(entries, clean_activations[site])) for site, entries in by_site.items()]


def _metric_per_patch(metric: PatchingMetric, logits: Float[torch.Tensor, "patch batch pos d_vocab"],
                      vectorized: bool) -> Float[torch.Tensor, "patch"]:
    n = logits.shape[0]
    if vectorized:
        return _check_metric_output(metric(logits), n, vectorized=True)
    return torch.cat([_check_metric_output(metric(logits[i]), 1, vectorized=False) for i in range(n)])


# TransformerLens's API ----------------------------------------------------------------------
def generic_activation_patch(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                             patching_metric: PatchingMetric, patch_setter: PatchSetter, activation_name: str,
                             index_axis_names: Sequence[str] | None = None, index_df: Any = None,
                             return_index_df: bool = False, *, batch_size: int | None = None,
                             max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, vectorized_metric: bool = False,
                             progress: bool = True) -> Any:
    """Patch ``activation_name`` from ``clean_cache`` into the corrupted run at every index; return the metric.

    As TransformerLens: either ``index_axis_names`` (the full grid over those axes; the
    output has one dimension per axis, e.g. ``("layer", "pos")`` -> ``[n_layers, pos]``)
    or ``index_df`` (rows of indices, layer first: a pandas DataFrame, an integer tensor or
    a list of tuples; the output is flat, one value per row). ``patch_setter(corrupted_act,
    index, clean_act)`` writes the clean values of one index into the corrupted activation
    (the ``*_patch_setter`` functions of this module, or your own); it sees one patch's
    ``[batch, ...]`` slice, as in TL. ``return_index_df`` also returns the indices as a
    pandas DataFrame.

    Beyond TL (keyword-only): ``batch_size`` patches per forward (default: as many as fit
    in ``max_batch_bytes`` of activations); ``vectorized_metric`` (see the module
    docstring); ``progress`` shows a tqdm bar.

    Errors before any forward: an unknown activation name or a site the model lacks, a
    site missing from ``clean_cache``, clean activations whose batch or length differ from
    the corrupted tokens, a metric that does not return one number (one per patch when
    vectorized).
    """
    tokens = _corrupted_tokens(model, corrupted_tokens)
    pd = _pandas("return_index_df=True") if return_index_df else None
    if (index_df is None) == (index_axis_names is None):
        raise ValueError("pass exactly one of index_axis_names (sweep the full grid) and index_df (explicit rows)")
    if index_df is None:
        index_axis_names = tuple(index_axis_names)
        _check_axes(index_axis_names)
        sizes = _axis_sizes(model, _site(model, activation_name, 0), tokens.shape[1])
        grid = [sizes[a] for a in index_axis_names]
        rows = list(itertools.product(*(range(n) for n in grid)))
    else:
        rows = _index_rows(index_df)

    patches = [Patch(_site(model, activation_name, row[0]), row, patch_setter) for row in rows]
    sites = dict.fromkeys(p.site for p in patches)
    clean = {site: _clean_activation(model, clean_cache, site, tokens) for site in sites}
    _trial_metric(model, patching_metric, tokens, vectorized_metric)

    values = run_patches(model, tokens, clean, patches, patching_metric, batch_size=batch_size,
                         max_batch_bytes=max_batch_bytes, vectorized_metric=vectorized_metric, progress=progress,
                         desc=f"patching {activation_name}")
    if index_df is None:
        values = values.reshape(grid)
    if not return_index_df:
        return values
    if index_df is None or not hasattr(index_df, "to_numpy"):
        columns = index_axis_names if index_axis_names is not None else [f"axis_{i}" for i in range(len(rows[0]))]
        index_df = pd.DataFrame(rows, columns=list(columns))
    return values, index_df


def _shape_doc(activation_name: str, index_axis_names: tuple[str, ...]) -> str:
    kv = activation_name in ("k", "v")
    names = ["kv_head" if kv and a.startswith("head") else "head" if a == "head_index" else a for a in index_axis_names]
    return f"[{', '.join(names)}]"


def _sweep(activation_name: str, index_axis_names: tuple[str, ...], patch_setter: PatchSetter, what: str) -> Callable:
    """A TL-style specialised sweep: ``generic_activation_patch`` with its site, setter and axes fixed."""
    def sweep(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
              patching_metric: PatchingMetric, **kwargs: Any) -> torch.Tensor:
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric,
                                        patch_setter=patch_setter, activation_name=activation_name,
                                        index_axis_names=index_axis_names, **kwargs)

    sweep.__doc__ = (f"Activation patching of {what}: ``{_shape_doc(activation_name, index_axis_names)}``, the "
                     f"metric after patching each index.\n\n    Keyword options (batch_size, max_batch_bytes, "
                     f"vectorized_metric, progress) as in ``generic_activation_patch``.")
    return sweep


_POS = ("layer", "pos")
_POS_HEAD = ("layer", "pos", "head")
_HEAD = ("layer", "head")
_PATTERN_POS = ("layer", "head_index", "dest_pos")
_PATTERN = ("layer", "head_index")
_KV = " (GQA: kv heads, n_kv_heads of them)"

get_act_patch_resid_pre = _sweep("resid_pre", _POS, layer_pos_patch_setter, "the residual stream entering each block")
get_act_patch_resid_mid = _sweep("resid_mid", _POS, layer_pos_patch_setter,
                                 "the residual stream between attention and MLP")
get_act_patch_resid_post = _sweep("resid_post", _POS, layer_pos_patch_setter, "the residual stream leaving each block")
get_act_patch_attn_out = _sweep("attn_out", _POS, layer_pos_patch_setter, "each attention layer's output")
get_act_patch_mlp_out = _sweep("mlp_out", _POS, layer_pos_patch_setter, "each MLP layer's output")
get_act_patch_attn_head_out_by_pos = _sweep("z", _POS_HEAD, layer_pos_head_vector_patch_setter,
                                            "each head's output z at each position")
get_act_patch_attn_head_q_by_pos = _sweep("q", _POS_HEAD, layer_pos_head_vector_patch_setter,
                                          "each head's query at each position")
get_act_patch_attn_head_k_by_pos = _sweep("k", _POS_HEAD, layer_pos_head_vector_patch_setter,
                                          "each key head at each position" + _KV)
get_act_patch_attn_head_v_by_pos = _sweep("v", _POS_HEAD, layer_pos_head_vector_patch_setter,
                                          "each value head at each position" + _KV)
get_act_patch_attn_head_pattern_by_pos = _sweep("pattern", _PATTERN_POS, layer_head_pos_pattern_patch_setter,
                                                "each head's attention pattern row (by destination position)")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep(
    "pattern", ("layer", "head_index", "dest_pos", "src_pos"), layer_head_dest_src_pos_pattern_patch_setter,
    "each entry of each head's attention pattern")
get_act_patch_attn_head_out_all_pos = _sweep("z", _HEAD, layer_head_vector_patch_setter,
                                             "each head's output z at all positions")
get_act_patch_attn_head_q_all_pos = _sweep("q", _HEAD, layer_head_vector_patch_setter,
                                           "each head's queries at all positions")
get_act_patch_attn_head_k_all_pos = _sweep("k", _HEAD, layer_head_vector_patch_setter,
                                           "each key head at all positions" + _KV)
get_act_patch_attn_head_v_all_pos = _sweep("v", _HEAD, layer_head_vector_patch_setter,
                                           "each value head at all positions" + _KV)
get_act_patch_attn_head_pattern_all_pos = _sweep("pattern", _PATTERN, layer_head_pattern_patch_setter,
                                                 "each head's whole attention pattern")
for _name, _fn in list(globals().items()):
    if _name.startswith("get_act_patch_"):
        _fn.__name__ = _fn.__qualname__ = _name


# The _every sweeps run all their patch kinds through one stream of chunks. Their rows are
# the kinds below, in TransformerLens's order.
_BLOCK_KINDS = (("resid_pre", _POS, layer_pos_patch_setter), ("attn_out", _POS, layer_pos_patch_setter),
                ("mlp_out", _POS, layer_pos_patch_setter))
_HEAD_ALL_POS_KINDS = (("z", _HEAD, layer_head_vector_patch_setter), ("q", _HEAD, layer_head_vector_patch_setter),
                       ("k", _HEAD, layer_head_vector_patch_setter), ("v", _HEAD, layer_head_vector_patch_setter),
                       ("pattern", _PATTERN, layer_head_pattern_patch_setter))
_HEAD_BY_POS_KINDS = (("z", _POS_HEAD, layer_pos_head_vector_patch_setter),
                      ("q", _POS_HEAD, layer_pos_head_vector_patch_setter),
                      ("k", _POS_HEAD, layer_pos_head_vector_patch_setter),
                      ("v", _POS_HEAD, layer_pos_head_vector_patch_setter),
                      ("pattern", _PATTERN_POS, layer_head_pos_pattern_patch_setter))


def _every(model: Any, corrupted_tokens: Any, clean_cache: Any, patching_metric: PatchingMetric,
           kinds: tuple, desc: str, *, batch_size: int | None = None, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
           vectorized_metric: bool = False, progress: bool = True) -> list[torch.Tensor]:
    tokens = _corrupted_tokens(model, corrupted_tokens)
    patches, grids, clean = [], [], {}
    for name, axes, setter in kinds:
        sizes = _axis_sizes(model, _site(model, name, 0), tokens.shape[1])
        grid = [sizes[a] for a in axes]
        for row in itertools.product(*(range(n) for n in grid)):
            patches.append(Patch(_site(model, name, row[0]), row, setter))
        grids.append(grid)
    for p in patches:
        if p.site not in clean:
            clean[p.site] = _clean_activation(model, clean_cache, p.site, tokens)
    _trial_metric(model, patching_metric, tokens, vectorized_metric)
    values = run_patches(model, tokens, clean, patches, patching_metric, batch_size=batch_size,
                         max_batch_bytes=max_batch_bytes, vectorized_metric=vectorized_metric, progress=progress,
                         desc=desc)
    return [part.reshape(grid) for part, grid in zip(values.split([_numel(g) for g in grids]), grids)]


def _numel(grid: list[int]) -> int:
    n = 1
    for size in grid:
        n *= size
    return n


def _pad_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Pad a kv-head axis (last) to n_heads with NaN: those heads do not exist (TL pads with 0)."""
    missing = n_heads - t.shape[-1]
    return torch.nn.functional.pad(t, (0, missing), value=float("nan")) if missing else t


def get_act_patch_block_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                              metric: PatchingMetric, **kwargs: Any) -> Float[torch.Tensor, "3 layer pos"]:
    """``resid_pre``, ``attn_out`` and ``mlp_out`` sweeps by (layer, pos), stacked: ``[3, layer, pos]``."""
    return torch.stack(_every(model, corrupted_tokens, clean_cache, metric, _BLOCK_KINDS, "patching block", **kwargs))


def get_act_patch_attn_head_all_pos_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"],
                                          clean_cache: Any, metric: PatchingMetric, **kwargs: Any
                                          ) -> Float[torch.Tensor, "5 layer head"]:
    """Every head (all positions) for output z, q, k, v and pattern: ``[5, layer, head]``.

    Under GQA the k and v rows have n_kv_heads real entries; the rest are NaN.
    """
    parts = _every(model, corrupted_tokens, clean_cache, metric, _HEAD_ALL_POS_KINDS, "patching heads", **kwargs)
    return torch.stack([_pad_heads(p, model.cfg.n_heads) for p in parts])


def get_act_patch_attn_head_by_pos_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"],
                                         clean_cache: Any, metric: PatchingMetric, **kwargs: Any
                                         ) -> Float[torch.Tensor, "5 layer pos head"]:
    """Every head at every position for z, q, k, v and pattern (by destination): ``[5, layer, pos, head]``.

    Under GQA the k and v rows have n_kv_heads real entries; the rest are NaN.
    """
    parts = _every(model, corrupted_tokens, clean_cache, metric, _HEAD_BY_POS_KINDS, "patching heads by pos", **kwargs)
    parts[-1] = rearrange(parts[-1], "layer head pos -> layer pos head")
    return torch.stack([_pad_heads(p, model.cfg.n_heads) for p in parts])


# Attribution patching ------------------------------------------------------------------------
def attribution_products(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                         patching_metric: PatchingMetric, sites: Sequence[str]) -> dict[str, torch.Tensor]:
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
            raise ValueError("attention scores hold -inf at masked positions, so (clean - corrupted) is undefined "
                             "there; attribute to 'pattern' instead")
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
            raise ValueError("patching_metric's output does not depend differentiably on the logits (no gradient): "
                             "attribution patching needs a metric built from torch ops on the logits, without "
                             ".item(), argmax or comparisons")
        grads = torch.autograd.grad(value.sum(), [acts[s] for s in clean], allow_unused=True)
    return {site: (clean[site] - acts[site].detach()) * (torch.zeros_like(acts[site]) if g is None else g)
            for site, g in zip(clean, grads)}


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


def generic_attribution_patch(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                              patching_metric: PatchingMetric, activation_name: str,
                              index_axis_names: Sequence[str]) -> torch.Tensor:
    """Attribution-patching estimate of ``generic_activation_patch(...) - metric(corrupted logits)``.

    Same grid and shape as the sweep with these ``index_axis_names`` (layer first), for any
    patch setter that writes whole slices (the standard ones): the estimate for an index
    sums ``(clean - corrupted) * grad`` over the batch and every axis not indexed.
    """
    return _attribution(model, corrupted_tokens, clean_cache, patching_metric,
                        [(activation_name, tuple(index_axis_names))])[0]


def _attribution(model: Any, corrupted_tokens: Any, clean_cache: Any, patching_metric: PatchingMetric,
                 kinds: Sequence[tuple[str, tuple[str, ...]]]) -> list[torch.Tensor]:
    """One forward and backward for several (activation_name, axes) kinds."""
    n_layers = model.cfg.n_layers
    for _, axes in kinds:
        _check_axes(axes)
    sites = {name: [_site(model, name, layer) for layer in range(n_layers)] for name, _ in kinds}
    products = attribution_products(model, corrupted_tokens, clean_cache, patching_metric,
                                    list(dict.fromkeys(s for names in sites.values() for s in names)))
    return [torch.stack([_reduce(products[s], s, axes[1:]) for s in sites[name]]).detach()
            for name, axes in kinds]


def _attr(activation_name: str, index_axis_names: tuple[str, ...], what: str) -> Callable:
    """The attribution counterpart of ``_sweep``: same site, axes and output shape."""
    def attribution(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                    patching_metric: PatchingMetric) -> torch.Tensor:
        return generic_attribution_patch(model, corrupted_tokens, clean_cache, patching_metric,
                                         activation_name, index_axis_names)

    attribution.__doc__ = (f"Attribution patching of {what}: ``{_shape_doc(activation_name, index_axis_names)}``, "
                           f"the first-order estimate of each patch's effect on the metric (module docstring).")
    return attribution


get_attr_patch_resid_pre = _attr("resid_pre", _POS, "the residual stream entering each block")
get_attr_patch_resid_mid = _attr("resid_mid", _POS, "the residual stream between attention and MLP")
get_attr_patch_resid_post = _attr("resid_post", _POS, "the residual stream leaving each block")
get_attr_patch_attn_out = _attr("attn_out", _POS, "each attention layer's output")
get_attr_patch_mlp_out = _attr("mlp_out", _POS, "each MLP layer's output")
get_attr_patch_attn_head_out_by_pos = _attr("z", _POS_HEAD, "each head's output z at each position")
get_attr_patch_attn_head_q_by_pos = _attr("q", _POS_HEAD, "each head's query at each position")
get_attr_patch_attn_head_k_by_pos = _attr("k", _POS_HEAD, "each key head at each position" + _KV)
get_attr_patch_attn_head_v_by_pos = _attr("v", _POS_HEAD, "each value head at each position" + _KV)
get_attr_patch_attn_head_pattern_by_pos = _attr("pattern", _PATTERN_POS, "each head's attention pattern row")
get_attr_patch_attn_head_pattern_dest_src_pos = _attr("pattern", ("layer", "head_index", "dest_pos", "src_pos"),
                                                      "each entry of each head's attention pattern")
get_attr_patch_attn_head_out_all_pos = _attr("z", _HEAD, "each head's output z at all positions")
get_attr_patch_attn_head_q_all_pos = _attr("q", _HEAD, "each head's queries at all positions")
get_attr_patch_attn_head_k_all_pos = _attr("k", _HEAD, "each key head at all positions" + _KV)
get_attr_patch_attn_head_v_all_pos = _attr("v", _HEAD, "each value head at all positions" + _KV)
get_attr_patch_attn_head_pattern_all_pos = _attr("pattern", _PATTERN, "each head's whole attention pattern")
for _name, _fn in list(globals().items()):
    if _name.startswith("get_attr_patch_"):
        _fn.__name__ = _fn.__qualname__ = _name


def get_attr_patch_block_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                               metric: PatchingMetric) -> Float[torch.Tensor, "3 layer pos"]:
    """Attribution estimates for resid_pre, attn_out, mlp_out by (layer, pos): ``[3, layer, pos]``, one backward."""
    return torch.stack(_attribution(model, corrupted_tokens, clean_cache, metric,
                                    [(name, axes) for name, axes, _ in _BLOCK_KINDS]))


def get_attr_patch_attn_head_all_pos_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"],
                                           clean_cache: Any, metric: PatchingMetric
                                           ) -> Float[torch.Tensor, "5 layer head"]:
    """Attribution estimates for z, q, k, v, pattern per head: ``[5, layer, head]`` (GQA k/v padded with NaN)."""
    parts = _attribution(model, corrupted_tokens, clean_cache, metric,
                         [(name, axes) for name, axes, _ in _HEAD_ALL_POS_KINDS])
    return torch.stack([_pad_heads(p, model.cfg.n_heads) for p in parts])


def get_attr_patch_attn_head_by_pos_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"],
                                          clean_cache: Any, metric: PatchingMetric
                                          ) -> Float[torch.Tensor, "5 layer pos head"]:
    """Attribution estimates for z, q, k, v, pattern per head and position: ``[5, layer, pos, head]``."""
    parts = _attribution(model, corrupted_tokens, clean_cache, metric,
                         [(name, axes) for name, axes, _ in _HEAD_BY_POS_KINDS])
    parts[-1] = rearrange(parts[-1], "layer head pos -> layer pos head")
    return torch.stack([_pad_heads(p, model.cfg.n_heads) for p in parts])
