"""The patching engine: ``Patch`` and ``run_patches`` (many patches per forward, stacked
on the batch axis), ``generic_activation_patch``, TransformerLens's patch setters, and the
checks that run before any forward. The method, the metric contract and the axis vocabulary
are stated once, in the package docstring (``transformer_hooks.interventions.patching``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from ... import sites
from ...hooks import HookPoint
from ...progress import tqdm
from ...protocol import HookedModel
from ...utils import check_index, get_act_name

Logits = Float[torch.Tensor, "batch pos d_vocab"]
PatchingMetric = Callable[[Logits], Any]
PatchSetter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]

AXES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos")
DEFAULT_MAX_BATCH_BYTES = 512 * 2**20


# Site layouts: the only place here that knows which axes a site has. -----------------------
# sites.py's axis names as TL's sweeps call them: a pattern's query/key positions are
# dest_pos/src_pos, kv heads are indexed as heads, and every feature axis is one "d".
_SWEEP_AXIS = {"query_pos": "dest_pos", "key_pos": "src_pos", "kv_head": "head"}


def _layout(site: str) -> tuple[str, ...]:
    """Axis names of a site's activation (sites.py's, in TL's sweep vocabulary)."""
    row = sites.lookup(site)
    axes = row.axes if row is not None else ("batch", "pos", "d")
    return tuple(_SWEEP_AXIS.get(a, a if a in ("batch", "pos", "head") else "d") for a in axes)


def _axis_sizes(model: HookedModel, site: str, n_pos: int) -> dict[str, int]:
    row = sites.lookup(site)
    grouped = row is not None and "kv_head" in row.axes and not model.cfg.ungroup_grouped_query_attention
    heads = model.cfg.n_kv_heads if grouped else model.cfg.n_heads
    return {
        "layer": model.cfg.n_layers,
        "pos": n_pos,
        "dest_pos": n_pos,
        "src_pos": n_pos,
        "head": heads,
        "head_index": heads,
    }


# Patch setters (TransformerLens's): (corrupted activation [batch, ...], index, clean activation) -> patched.
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, pos); activation [batch, pos, ...].
    Copies those entries of ``clean_activation`` into ``corrupted_activation`` (in place) and returns it.
    """
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, pos, head); activation [batch, pos, head, ...] (q, k, v, z, result).
    Copies those entries of ``clean_activation`` into ``corrupted_activation`` (in place) and returns it.
    """
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head); every position of one head; activation [batch, pos, head, ...].
    Copies those entries of ``clean_activation`` into ``corrupted_activation`` (in place) and returns it.
    """
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head); activation [batch, head, dest_pos, src_pos].
    Copies those entries of ``clean_activation`` into ``corrupted_activation`` (in place) and returns it.
    """
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head, dest_pos); activation [batch, head, dest_pos, src_pos].
    Copies those entries of ``clean_activation`` into ``corrupted_activation`` (in place) and returns it.
    """
    _, head, dest_pos = index
    corrupted_activation[:, head, dest_pos] = clean_activation[:, head, dest_pos]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = (layer, head, dest_pos, src_pos); activation [batch, head, dest_pos, src_pos].
    Copies those entries of ``clean_activation`` into ``corrupted_activation`` (in place) and returns it.
    """
    _, head, dest_pos, src_pos = index
    corrupted_activation[:, head, dest_pos, src_pos] = clean_activation[:, head, dest_pos, src_pos]
    return corrupted_activation


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """A pandas DataFrame of every index in the grid of sizes ``column_max_ranges``, columns
    ``column_names``, last column fastest (as TL's)."""
    pd = _pandas("make_df_from_ranges")
    return pd.DataFrame(list(itertools.product(*(range(n) for n in column_max_ranges))), columns=list(column_names))


def _pandas(what: str) -> Any:
    try:
        import pandas
    except ImportError as e:
        raise ImportError(
            f"{what} returns a pandas DataFrame, but pandas is not installed: `pip install pandas`, "
            f"or pass index_df as an integer tensor of rows [n_patches, n_axes]"
        ) from e
    return pandas


# Checks, all before any forward --------------------------------------------------------
def _corrupted_tokens(model: HookedModel, corrupted_tokens: Any) -> Int[torch.Tensor, "batch pos"]:
    tokens, mask = model.tokens_and_mask(corrupted_tokens)
    if mask is not None:
        raise ValueError(
            "the corrupted prompts have different lengths (the batch is padded); patching compares "
            "positions across runs, so give prompts of equal token length"
        )
    return tokens


def _site(model: HookedModel, activation_name: str, layer: int | None) -> str:
    """The full hook name (TL: the first index is the layer), checked against the model."""
    try:
        name = get_act_name(activation_name, layer=layer, n_layers=model.cfg.n_layers)
    except ValueError as e:
        raise ValueError(f"activation_name={activation_name!r}: {e}") from None
    model.resolve_hook_names([name])  # raises UnknownHookError, naming the closest sites
    return name


def _clean_activation(model: HookedModel, clean_cache: Any, site: str, tokens: torch.Tensor) -> torch.Tensor:
    """The clean activation of ``site``, checked against the corrupted tokens' shape."""
    if not getattr(clean_cache, "has_batch_dim", True):
        raise ValueError(
            "clean_cache has no batch dimension (made with remove_batch_dim=True); patching needs the "
            "batch axis: run run_with_cache(clean_tokens) without remove_batch_dim"
        )
    if site not in clean_cache:
        raise KeyError(
            f"clean_cache holds no {site!r}: cache it with model.run_with_cache(clean_tokens) (no "
            f"names_filter caches every standard site) or add it to names_filter"
        )
    act = clean_cache[site]
    batch, n_pos = tokens.shape
    pos_dims = [i for i, axis in enumerate(_layout(site)) if axis.endswith("pos")]
    if act.ndim <= max(pos_dims) or act.shape[0] != batch or any(act.shape[i] != n_pos for i in pos_dims):
        raise ValueError(
            f"clean and corrupted inputs differ in shape: clean_cache[{site!r}] has shape "
            f"{tuple(act.shape)}, but the corrupted tokens are [batch={batch}, pos={n_pos}]; patching "
            f"needs clean and corrupted prompts of the same batch size and token length"
        )
    return act.to(model.device)


def _check_metric_output(value: Any, n_patches: int, vectorized: bool) -> torch.Tensor:
    """The metric's output as a float tensor [n_patches], or a clear error."""
    if isinstance(value, (int, float)) and not vectorized:
        return torch.tensor([float(value)])
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"patching_metric returned {type(value).__name__}; it must return a tensor (or a float)")
    if vectorized:
        if value.shape != (n_patches,):
            raise ValueError(
                f"patching_metric (vectorized_metric=True) returned shape {tuple(value.shape)} for logits "
                f"of {n_patches} patches; a vectorized metric takes [n_patches, batch, pos, d_vocab] and "
                f"returns [n_patches]"
            )
        return value.detach().float()
    if value.numel() != 1:
        raise ValueError(
            f"patching_metric returned shape {tuple(value.shape)}; it must return one number per patched "
            f"run (reduce over the batch, e.g. with .mean()). To score many patches in one call, "
            f"write a metric from [n_patches, batch, pos, d_vocab] to [n_patches] and pass "
            f"vectorized_metric=True"
        )
    return value.detach().float().reshape(1)


def _trial_metric(model: HookedModel, metric: PatchingMetric, tokens: torch.Tensor, vectorized: bool) -> None:
    """Call the metric once on zero logits, to check the shape it returns before any forward
    (where the metric runs: the process that gets the logits)."""
    if not model.blocks.gets_output:
        return
    shape = (1, *tokens.shape, model.cfg.d_vocab_out) if vectorized else (*tokens.shape, model.cfg.d_vocab_out)
    try:
        value = metric(torch.zeros(shape, dtype=model.dtype, device=model.device))
    except Exception as e:
        if hasattr(e, "add_note"):  # Python 3.11+
            e.add_note(
                f"(raised by patching_metric on trial logits of shape {shape}, called before the sweep to "
                f"check what it returns)"
            )
        raise
    _check_metric_output(value, 1, vectorized)


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
        raise ValueError(
            f"index_df must be a DataFrame or an integer table [n_patches, n_axes], got "
            f"{rows.dtype} of shape {tuple(rows.shape)}"
        )
    return [tuple(int(i) for i in row) for row in rows.tolist()]


# The engine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """One patched run: the site, its index (layer first) and how to write the clean values."""

    site: str
    index: tuple[int, ...]
    setter: PatchSetter


def _grid(
    model: HookedModel, activation_name: str, axes: Sequence[str], n_pos: int
) -> tuple[list[int], list[tuple[int, ...]]]:
    """A site's grid over ``axes`` (layer first): its sizes, and every index in it in order."""
    sizes = _axis_sizes(model, _site(model, activation_name, 0), n_pos)
    grid = [sizes[a] for a in axes]
    return grid, list(itertools.product(*(range(n) for n in grid)))


def sweep_patches(
    model: HookedModel,
    tokens: torch.Tensor,
    clean_cache: Any,
    patches: list[Patch],
    metric: PatchingMetric,
    **run_kwargs: Any,
) -> torch.Tensor | None:
    """``run_patches`` of ``model`` on ``tokens`` with ``patches`` after reading each patched
    site's clean activation from ``clean_cache`` (checked against ``tokens``) and calling the
    metric once on trial logits; ``**run_kwargs`` go to ``run_patches``.

    Split over processes, ``clean_cache`` is read where ``run_with_cache`` returned it (rank
    0; the other ranks may pass None) and each site's activation goes to the rank that runs it."""
    clean = None
    if model.blocks.gets_output:
        sites_ = dict.fromkeys(p.site for p in patches)
        clean = {site: _clean_activation(model, clean_cache, site, tokens) for site in sites_}
    _trial_metric(model, metric, tokens, run_kwargs.get("vectorized_metric", False))
    return run_patches(model, tokens, model.blocks.to_sites(clean), patches, metric, **run_kwargs)


def run_patches(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_activations: dict[str, torch.Tensor],
    patches: Sequence[Patch],
    patching_metric: PatchingMetric,
    *,
    batch_size: int | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    vectorized_metric: bool = False,
    progress: bool = True,
    desc: str = "patching",
    metric_positions: int | Sequence[int] | None = None,
) -> Float[torch.Tensor, " n_patches"] | None:
    """The metric of each patched run, stacking patches on the batch axis.

    ``clean_activations`` maps each site to its clean activation; inputs are assumed
    checked (the public sweeps do it). Hooks live inside ``model.hooks()`` for one chunk,
    so an exception (or KeyboardInterrupt) anywhere leaves none attached.

    A patch at block ``L`` leaves blocks ``< L`` as in the corrupted run, so its row joins
    the stacked batch at block ``L`` from the corrupted run's cached ``resid_pre``: a chunk
    runs segment by segment, the batch growing as it reaches each patch's layer, and no
    row computes a block below its patch. ``metric_positions``: the only positions whose
    logits the metric reads (e.g. ``-1``); the rest are not unembedded and are NaN in the
    logits the metric gets (a metric reading them fails before any forward).

    ``corrupted_tokens``, ``patching_metric``, ``batch_size``, ``max_batch_bytes``,
    ``vectorized_metric`` and ``progress`` as in ``generic_activation_patch``; ``desc``: the
    progress bar's label.

    Split over processes (``pipeline_ranks``): every rank calls it alike, each with the clean
    activations of the sites it runs (``model.blocks.to_sites``; a meta tensor elsewhere);
    the metric runs on rank 0, which returns the values; the other ranks return None.
    """
    tokens = corrupted_tokens
    batch = tokens.shape[0]
    positions = _metric_positions(model, patching_metric, tokens, metric_positions, vectorized_metric)
    # Top-level sites (embed, ln_final) start at 0.
    start_of = [(model.hook_dict[p.site].layer_idx or 0) for p in patches]
    order = sorted(range(len(patches)), key=lambda i: start_of[i])  # stable: grid order within a layer
    per_chunk = _chunk_size(model, tokens, max_batch_bytes) if batch_size is None else batch_size
    if per_chunk < 1:
        raise ValueError(f"batch_size must be at least 1 (patches per forward), got {batch_size}")

    # The corrupted run's residual stream entering each layer where patches join, one
    # segment of the forward after another (split over processes, each stays on the rank
    # that runs that layer).
    resid_pre: dict[int, torch.Tensor] = {}
    x, start = tokens, None
    with torch.no_grad():
        for layer in sorted(L for L in set(start_of) if L > 0):
            x = resid_pre[layer] = model(x, start_at_layer=start, stop_at_layer=layer)
            start = layer

    out = torch.empty(len(patches), dtype=torch.float32)
    with tqdm(total=len(patches), desc=desc, disable=not progress) as bar:
        for lo in range(0, len(order), per_chunk):
            chunk = order[lo : lo + per_chunk]  # rows in order of their start layer
            n = len(chunk)
            hooks = _chunk_hooks([patches[i] for i in chunk], clean_activations, batch)
            joins = list(Counter(start_of[i] for i in chunk).items())  # [(layer, rows joining there)], ascending
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                logits = _growing_forward(model, tokens, resid_pre, joins, positions)
            if logits is not None:  # None: another process of a split model gets the output
                logits = logits.unflatten(0, (n, batch))  # [patch, batch, pos, d_vocab]
                out[torch.tensor(chunk)] = _metric_per_patch(patching_metric, logits, vectorized_metric).cpu()
            bar.update(n)
    return out.to(model.device) if model.blocks.gets_output else None


def _growing_forward(
    model: HookedModel,
    tokens: torch.Tensor,
    resid_pre: dict[int, torch.Tensor],
    joins: list[tuple[int, int]],
    positions: list[int] | None,
) -> Float[torch.Tensor, "rows pos d_vocab"] | None:
    """One stacked forward whose rows join at their start layers: ``joins`` lists (layer,
    number of patch rows joining there) in ascending layer order; each patch row is a copy
    of the corrupted batch. Rows already in the batch run blocks ``[L_i, L_{i+1})``, then the
    rows joining at ``L_{i+1}`` (the cached corrupted ``resid_pre``) are appended."""
    n_layers = model.cfg.n_layers
    resid: torch.Tensor | None = None
    bounds = [layer for layer, _ in joins[1:]] + [n_layers]
    for (layer, count), stop in zip(joins, bounds, strict=True):
        x: torch.Tensor
        if layer == 0:  # only ever first: these rows start from the tokens
            x, start = tokens.repeat(count, 1), None
        else:
            fresh = resid_pre[layer].repeat(count, 1, 1)
            x, start = (fresh if resid is None else torch.cat([resid.to(fresh.device), fresh])), layer
        if stop == n_layers:
            return _final(model, x, start, positions)
        resid = model(x, start_at_layer=start, stop_at_layer=stop)
    raise AssertionError(f"joins {joins} end below the last block")  # unreachable: the last segment returns


def _final(
    model: HookedModel, input: torch.Tensor, start: int | None, positions: list[int] | None
) -> Float[torch.Tensor, "rows pos d_vocab"] | None:
    """The rest of the forward from block ``start`` (tokens if None); with ``positions``,
    only those positions are unembedded and the others are NaN. None where the output is
    not (another process of a split model)."""
    if positions is None:
        return model(input, start_at_layer=start)

    def pick(module: Any, args: tuple) -> tuple:
        return (args[0][:, positions], *args[1:])  # the unembedding reads only these positions

    handle = model.unembed.register_forward_pre_hook(pick)
    try:
        picked = model(input, start_at_layer=start)
    finally:
        handle.remove()
    if picked is None:
        return None
    logits = picked.new_full((picked.shape[0], input.shape[1], picked.shape[-1]), float("nan"))
    logits[:, positions] = picked
    return logits


def _metric_positions(
    model: HookedModel,
    metric: PatchingMetric,
    tokens: torch.Tensor,
    metric_positions: int | Sequence[int] | None,
    vectorized: bool,
) -> list[int] | None:
    """``metric_positions`` checked (negative counts from the end), and the metric checked
    not to read other positions: on trial logits NaN elsewhere it must give a number."""
    if metric_positions is None:
        return None
    n_pos = tokens.shape[1]
    values = [metric_positions] if isinstance(metric_positions, int) else list(metric_positions)
    if not values:
        raise ValueError("metric_positions is empty: give the positions the metric reads (e.g. -1), or None")
    of = f"tokens of {n_pos} positions (metric_positions)"
    positions = sorted({check_index(int(p), n_pos, "position", of) for p in values})
    if not model.blocks.gets_output:  # the metric runs where the logits are
        return positions
    shape = (1, *tokens.shape, model.cfg.d_vocab_out) if vectorized else (*tokens.shape, model.cfg.d_vocab_out)
    trial = torch.full(shape, float("nan"), dtype=model.dtype, device=model.device)
    trial[..., positions, :] = 0
    value = torch.as_tensor(metric(trial))
    if bool(value.detach().isnan().any()):
        raise ValueError(
            f"patching_metric reads logits outside metric_positions={metric_positions!r} (it returned NaN on "
            f"trial logits that are NaN at the other positions); add the positions it reads, or drop "
            f"metric_positions"
        )
    return positions


def _chunk_size(model: HookedModel, tokens: torch.Tensor, max_batch_bytes: int) -> int:
    """Patches per forward that keep the forward's activations under ``max_batch_bytes``.

    Per patch row: the logits (twice: output and the metric's working copy), a few
    residual-sized tensors, the MLP hidden layer (gated: three of them) and, where a
    pattern is observed, one [head, pos, pos] tensor.
    """
    cfg = model.cfg
    batch, n_pos = tokens.shape
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    per_position = 2 * cfg.d_vocab_out + 8 * cfg.d_model + 4 * cfg.d_mlp + 2 * cfg.n_heads * n_pos
    return max(1, int(max_batch_bytes // (batch * n_pos * per_position * itemsize)))


def _chunk_hooks(
    patches: list[Patch], clean_activations: dict[str, torch.Tensor], batch: int
) -> list[tuple[str, Callable]]:
    """One hook per site: row ``i`` of the stacked batch gets patch ``i`` (if it is at that site).

    The batch holds the rows that have joined by that site's layer (``_growing_forward``),
    a prefix of the chunk that includes every patch at that site."""
    by_site: dict[str, list[tuple[int, Patch]]] = {}
    for row, patch in enumerate(patches):
        by_site.setdefault(patch.site, []).append((row, patch))

    def make_hook(entries: list[tuple[int, Patch]], clean: torch.Tensor) -> Callable:
        def patch_rows(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            # A copy: the incoming tensor may be shared with other parts of the forward.
            activation = activation.clone()
            rows = activation.unflatten(0, (-1, batch))  # [patch, batch, ...], a view of the copy
            source = clean.to(activation.dtype)
            for row, patch in entries:
                slot = rows[row]
                patched = patch.setter(slot, patch.index, source)
                if patched is not None and patched is not slot:
                    slot.copy_(patched)
            return activation

        return patch_rows

    return [(site, make_hook(entries, clean_activations[site])) for site, entries in by_site.items()]


def _metric_per_patch(
    metric: PatchingMetric, logits: Float[torch.Tensor, "patch batch pos d_vocab"], vectorized: bool
) -> Float[torch.Tensor, " patch"]:
    n = logits.shape[0]
    if vectorized:
        return _check_metric_output(metric(logits), n, vectorized=True)
    return torch.cat([_check_metric_output(metric(logits[i]), 1, vectorized=False) for i in range(n)])


# TransformerLens's API ----------------------------------------------------------------------
def generic_activation_patch(
    model: HookedModel,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: PatchingMetric,
    patch_setter: PatchSetter,
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
    *,
    batch_size: int | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    vectorized_metric: bool = False,
    progress: bool = True,
    metric_positions: int | Sequence[int] | None = None,
) -> Any:
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
    docstring); ``progress`` shows a tqdm bar; ``metric_positions`` the only positions the
    metric reads (the rest are not unembedded: ``run_patches``).

    Errors before any forward: an unknown activation name or a site the model lacks, a
    site missing from ``clean_cache``, clean activations whose batch or length differ from
    the corrupted tokens, a metric that does not return one number (one per patch when
    vectorized). ``corrupted_tokens`` and ``patching_metric`` as in the package docstring.
    """
    tokens = _corrupted_tokens(model, corrupted_tokens)
    pd = _pandas("return_index_df=True") if return_index_df else None
    if (index_df is None) == (index_axis_names is None):
        raise ValueError("pass exactly one of index_axis_names (sweep the full grid) and index_df (explicit rows)")
    if index_df is None:
        assert index_axis_names is not None  # checked just above
        index_axis_names = tuple(index_axis_names)
        _check_axes(index_axis_names)
        grid, rows = _grid(model, activation_name, index_axis_names, tokens.shape[1])
    else:
        rows = _index_rows(index_df)

    patches = [Patch(_site(model, activation_name, row[0]), row, patch_setter) for row in rows]
    values = sweep_patches(
        model,
        tokens,
        clean_cache,
        patches,
        patching_metric,
        batch_size=batch_size,
        max_batch_bytes=max_batch_bytes,
        vectorized_metric=vectorized_metric,
        progress=progress,
        desc=f"patching {activation_name}",
        metric_positions=metric_positions,
    )
    if values is None:  # split over processes: rank 0 has the values
        return None
    if index_df is None:
        values = values.reshape(grid)
    if not return_index_df:
        return values
    if index_df is None or not hasattr(index_df, "to_numpy"):
        columns = index_axis_names if index_axis_names is not None else [f"axis_{i}" for i in range(len(rows[0]))]
        assert pd is not None  # imported when return_index_df
        index_df = pd.DataFrame(rows, columns=list(columns))
    return values, index_df
