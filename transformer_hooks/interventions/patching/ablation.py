"""Ablations: replace part of an activation with zeros, a mean, or resampled values, and see
what the metric does.

    zero:      act[sel] <- 0
    mean:      act[sel] <- mean_{reference prompts r} act_r[sel]          (per position, or
                          pooled over the reference prompts' real positions as well)
    resample:  act[b, sel] <- act_{r(b)}[sel],  r(b) ~ Uniform(reference prompts), seeded

``sel`` is any selection of a site's activation: heads (sites with a head or kv_head axis),
neurons (the last axis of ``mlp.hook_pre`` / ``hook_post``, or any feature axis), positions,
or any combination. An ablation is an activation patch whose "clean" activation is the
ablation value, so ablations run through ``patching.engine.run_patches``: a sweep stacks many
ablations on the batch axis of one forward, and gives the numbers of one forward per
ablation (tested).

One call: ``ablate(model, tokens, "blocks.1.attn.hook_z", heads=[3], kind="mean",
reference=ref_tokens)`` -> logits (or ``metric(logits)``). Several at once:
``ablate(model, tokens, [Ablation(...), Ablation(...)])``. Sweeps: ``ablation_sweep(model,
tokens, metric, "z", over="head")`` -> ``[layer, head]``; ``over="neuron"`` on ``post`` ->
``[layer, d_mlp]``; ``over="pos"`` -> ``[layer, pos]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from ... import sites
from ...protocol import HookedModel
from ...utils import check_index, get_act_name
from .engine import (
    DEFAULT_MAX_BATCH_BYTES,
    Patch,
    PatchingMetric,
    _trial_metric,
    run_patches,
)

Kind = Literal["zero", "mean", "resample"]
KINDS = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Ablation:
    """One ablated part of one site: ``heads`` / ``neurons`` / ``positions`` (None: all)."""

    site: str
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    kind: Kind = "zero"
    extra: dict = field(default_factory=dict, compare=False)


class _Selection:
    """A patch setter writing the ablation value at (positions, heads, neurons) of one row."""

    def __init__(self, pos_dim: int | None, head_dim: int | None, feat_dim: int | None, ab: Ablation) -> None:
        self.dims: dict[int, tuple[int, ...]] = {}
        for d, v in ((pos_dim, ab.positions), (head_dim, ab.heads), (feat_dim, ab.neurons)):
            if v:
                assert d is not None, ab  # _resolve rejects a selection on an axis the site lacks
                self.dims[d] = v

    def index(self, ndim: int) -> tuple:
        # One advanced index per selected axis, shaped to broadcast against each other.
        chosen = sorted(self.dims)
        idx: list[Any] = [slice(None)] * ndim
        for k, d in enumerate(chosen):
            shape = [1] * len(chosen)
            shape[k] = -1
            idx[d] = torch.tensor(self.dims[d]).reshape(shape)
        return tuple(idx)

    def __call__(self, act: torch.Tensor, index: Any, value: torch.Tensor) -> torch.Tensor:
        # act and value: one row's [batch, ...]; dims counted with the batch axis.
        idx = self.index(act.ndim)
        act[idx] = value[idx]
        return act


def _axes(model: HookedModel, site: str) -> tuple[str, ...]:
    row = sites.lookup(site)
    if row is None:
        return ("batch", "pos", "d")
    return row.axes_in(model.cfg)


def _resolve(model: HookedModel, ab: Ablation, n_pos: int) -> tuple[Ablation, _Selection]:
    """Check the indices of ``ab`` against its site (negative indices count from the end)."""
    model.resolve_hook_names([ab.site])  # an unknown site raises UnknownHookError here
    if ab.kind not in KINDS:
        raise ValueError(f"ablation kind must be one of {KINDS}, got {ab.kind!r} (site {ab.site})")
    axes = _axes(model, ab.site)
    row = sites.lookup(ab.site)
    shape = row.shape(model.cfg, 1, n_pos) if row else None
    pos_dim = axes.index("query_pos") if "query_pos" in axes else (axes.index("pos") if "pos" in axes else None)
    head_dim = next((i for i, a in enumerate(axes) if a in ("head", "kv_head")), None)
    feat_dim = len(axes) - 1 if axes[-1] not in ("key_pos", "1") else None

    def check(values: Sequence[int] | None, dim: int | None, what: str) -> tuple[int, ...] | None:
        if values is None:
            return None
        values = (values,) if isinstance(values, int) else tuple(values)
        if dim is None:
            raise ValueError(f"{ab.site} has axes {list(axes)}: it has no {what} axis to ablate {what}s of")
        size = shape[dim] if shape is not None else n_pos
        of = f"{ab.site} ({axes[dim]} axis of size {size})"
        return tuple(check_index(int(v), size, what, of) for v in values)

    checked = Ablation(
        ab.site,
        heads=check(ab.heads, head_dim, "head"),
        neurons=check(ab.neurons, feat_dim, "neuron"),
        positions=check(ab.positions, pos_dim, "position"),
        kind=ab.kind,
    )
    return checked, _Selection(pos_dim, head_dim, feat_dim, checked)


# Ablation values ----------------------------------------------------------------------------
def _reference_activations(
    model: HookedModel, reference: Any, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
    """Activations of the reference prompts at ``names`` and their padding mask (or None).

    ``reference``: strings, tokens [n_ref, pos], or a cache / dict of activations by name.
    Split over processes, the activations are on rank 0 (None on the others, which may pass
    None for a cache)."""
    if isinstance(reference, torch.Tensor) or isinstance(reference, str) or _is_strings(reference):
        if isinstance(reference, torch.Tensor):
            if reference.dtype.is_floating_point or reference.ndim != 2:
                raise ValueError(
                    f"reference tokens must be integer ids [n_prompts, pos], got {reference.dtype} of shape "
                    f"{tuple(reference.shape)} (for the ablation of {', '.join(names)})"
                )
            if reference.numel() and (int(reference.min()) < 0 or int(reference.max()) >= model.cfg.d_vocab):
                raise ValueError(
                    f"reference tokens hold ids outside this model's vocabulary [0, {model.cfg.d_vocab}) "
                    f"(max {int(reference.max())}): were they made by another tokenizer? (ablating "
                    f"{', '.join(names)})"
                )
        tokens, mask = model.tokens_and_mask(reference, padding_side="right")
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=list(names))
        return (None if cache is None else {n: cache[n] for n in names}), mask
    if not model.blocks.gets_output:
        return None, None
    acts = {}
    for n in names:
        if n not in reference:
            raise KeyError(f"the reference activations hold no {n!r}: cache it (names_filter) to ablate it")
        acts[n] = reference[n].to(model.device)
    return acts, None


def _is_strings(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(s, str) for s in x)


def ablation_value(
    model: HookedModel,
    site: str,
    kind: Kind,
    tokens: Int[torch.Tensor, "batch pos"],
    reference: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    per_position: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The full-size activation [batch, ...] whose selected entries replace the site's.

    ``reference`` is the reference prompts' activation at ``site`` [n_ref, ...]. Mean with
    ``per_position``: the mean over prompts at each position (right-padded prompts count
    only where they have a real token); pooled: the mean over prompts and real positions.
    Resample: row ``b`` takes reference prompt ``r(b)``, drawn with ``torch.Generator(seed)``.
    ``kind``: ``"zero"``, ``"mean"`` or ``"resample"``; ``tokens`` [batch, pos]: the ablated
    run's tokens (the value's shape); ``reference_mask``: the reference prompts' padding mask;
    ``model``: the model (its config, dtype and device).
    """
    batch, n_pos = tokens.shape
    row = sites.lookup(site)
    shape = row.shape(model.cfg, batch, n_pos) if row is not None else None
    if kind == "zero":
        if shape is None:
            raise ValueError(f"zero ablation of {site} needs its shape: it is not in the site table")
        return torch.zeros(shape, dtype=model.dtype, device=model.device)
    if reference is None:
        raise ValueError(f"{kind} ablation of {site} needs reference prompts (reference=...)")
    axes = _axes(model, site)
    if shape is not None and (
        reference.ndim != len(shape)
        or _feature_shape(reference, axes) != _feature_shape(torch.empty(shape, device="meta"), axes)
    ):
        raise ValueError(
            f"the reference activation of {site} has shape {tuple(reference.shape)}, but the site is "
            f"{list(axes)} = {list(shape)} for these tokens; give reference prompts for this model"
        )
    pos_dims = [i for i, a in enumerate(axes) if a.endswith("pos")]
    if reference.shape[0] == 0 or (reference_mask is not None and not bool(reference_mask.any())):
        raise ValueError(
            f"{kind} ablation of {site}: the reference set is empty (no prompt, or no real token): its mean or "
            f"sample does not exist; give at least one reference prompt"
        )
    ref_len = reference.shape[pos_dims[0]] if pos_dims else n_pos
    real = None
    if reference_mask is not None and pos_dims:
        real = (
            reference_mask.to(reference.dtype)
            .reshape(reference_mask.shape + (1,) * (reference.ndim - 2))
            .movedim(1, pos_dims[0])
        )
    if kind == "mean":
        if per_position and ref_len != n_pos:
            raise ValueError(
                f"per-position mean ablation of {site}: the reference prompts have {ref_len} positions but "
                f"the tokens have {n_pos}; give references of the same length, or per_position=False to pool"
            )
        weight = torch.ones_like(reference) if real is None else real.expand_as(reference)
        dims = [0] + ([] if per_position else pos_dims[:1])
        mean = (reference * weight).sum(dims, keepdim=True) / weight.sum(dims, keepdim=True).clamp(min=1)
        return mean.expand(shape if shape is not None else (batch, *reference.shape[1:])).contiguous()
    if ref_len != n_pos:
        raise ValueError(
            f"resample ablation of {site}: the reference prompts have {ref_len} positions but the tokens "
            f"have {n_pos}; resampling takes whole prompts, so give references of the same length"
        )
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, reference.shape[0], (batch,), generator=g).to(reference.device)
    return reference[rows].contiguous()


def _feature_shape(t: torch.Tensor, axes: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(s for s, a in zip(t.shape, axes, strict=True) if a not in ("batch", "pos", "query_pos", "key_pos"))


def _values(
    model: HookedModel,
    tokens: torch.Tensor,
    ablations: Sequence[Ablation],
    reference: Any,
    per_position: bool,
    seed: int,
) -> dict[tuple[str, str], torch.Tensor]:
    """(site, kind) -> ablation value, from one reference forward for every site that needs it.
    Split over processes, the values are made on rank 0 and each goes to the rank that runs its
    site (``model.blocks.to_sites``; a meta tensor stands in elsewhere)."""
    needs = sorted({a.site for a in ablations if a.kind != "zero"})
    here = model.blocks.gets_output
    if needs and reference is None and here:
        raise ValueError(f"mean and resample ablations need reference prompts (reference=...): {needs}")
    if needs and here and not isinstance(reference, dict) and len(reference) == 0:
        raise ValueError(f"the reference set is empty: mean and resample ablations of {needs} need at least one prompt")
    ref_acts, ref_mask = _reference_activations(model, reference, needs) if needs else ({}, None)
    out: dict[tuple[str, str], torch.Tensor] = {}
    for kind in dict.fromkeys(a.kind for a in ablations):
        by_site = None
        if here:
            assert ref_acts is not None  # the process with the output has the reference activations
            by_site = {
                a.site: ablation_value(model, a.site, kind, tokens, ref_acts.get(a.site), ref_mask, per_position, seed)
                for a in ablations
                if a.kind == kind
            }
        out.update({(site, kind): value for site, value in model.blocks.to_sites(by_site).items()})
    return out


def _tokens(model: HookedModel, tokens: Any) -> torch.Tensor:
    toks, mask = model.tokens_and_mask(tokens)
    if mask is not None:
        raise ValueError("ablation compares positions across prompts: give prompts of equal token length")
    return toks


# One call ---------------------------------------------------------------------------------
def ablate(
    model: HookedModel,
    tokens: Any,
    ablations: str | Ablation | Sequence[Ablation],
    *,
    heads: int | Sequence[int] | None = None,
    neurons: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    kind: Kind = "zero",
    reference: Any = None,
    per_position: bool = True,
    seed: int = 0,
    metric: PatchingMetric | None = None,
) -> Any:
    """One forward with ablations; the logits, or ``metric(logits)``.

    ``ablations``: a hook name (or TL short name with ``.layer``, e.g. ``"blocks.1.attn.hook_z"``)
    with ``heads`` / ``neurons`` / ``positions`` / ``kind``, or ``Ablation``s (each with its own
    selection and kind). ``reference``: the prompts (strings or tokens) that mean and resample
    ablations draw from, or a cache of their activations. ``per_position`` and ``seed`` as in
    ``ablation_value``; ``model`` is run on ``tokens`` (strings or token ids).
    """
    toks = _tokens(model, tokens)
    if isinstance(ablations, str):
        ablations = [Ablation(ablations, _tup(heads), _tup(neurons), _tup(positions), kind)]
    elif isinstance(ablations, Ablation):
        ablations = [ablations]
    resolved = [_resolve(model, a, toks.shape[1]) for a in ablations]
    values = _values(model, toks, [a for a, _ in resolved], reference, per_position, seed)

    def make_hook(entries: list[tuple[Ablation, _Selection]]):
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            for a, sel in entries:
                sel(act, None, values[(a.site, a.kind)].to(act.dtype))
            return act

        return hook

    by_site: dict[str, list] = {}
    for a, sel in resolved:
        by_site.setdefault(a.site, []).append((a, sel))
    with torch.no_grad(), model.hooks(fwd_hooks=[(s, make_hook(e)) for s, e in by_site.items()]):
        logits = model(toks)
    return logits if metric is None or logits is None else metric(logits)


def _tup(x: Any) -> tuple[int, ...] | None:
    if x is None:
        return None
    return (int(x),) if isinstance(x, int) else tuple(int(v) for v in x)


def run_ablations(
    model: HookedModel,
    tokens: Any,
    ablations: Sequence[Ablation],
    metric: PatchingMetric,
    *,
    reference: Any = None,
    per_position: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    vectorized_metric: bool = False,
    progress: bool = False,
    metric_positions: int | Sequence[int] | None = None,
) -> Float[torch.Tensor, " n_ablations"] | None:
    """The metric of each ablated run (one ablation per run), many runs per forward.

    Each run joins the stacked batch at its site's block, and with ``metric_positions``
    (the only positions the metric reads, e.g. ``-1``) only those positions are
    unembedded (``patching.run_patches``).

    ``model`` runs on ``tokens``; ``ablations``: ``Ablation``s; ``reference``,
    ``per_position`` and ``seed`` as in ``ablate``; ``batch_size``, ``max_batch_bytes``,
    ``vectorized_metric`` and ``progress`` as in ``generic_activation_patch``."""
    toks = _tokens(model, tokens)
    resolved = [_resolve(model, a, toks.shape[1]) for a in ablations]
    values = _values(model, toks, [a for a, _ in resolved], reference, per_position, seed)
    _trial_metric(model, metric, toks, vectorized_metric)
    # run_patches keys "clean" activations by site: one pseudo-site per (site, kind) would need
    # another engine, so kinds are grouped and run as separate streams.
    out = torch.empty(len(resolved))
    for kind in KINDS:
        rows = [i for i, (a, _) in enumerate(resolved) if a.kind == kind]
        if not rows:
            continue
        patches = [Patch(resolved[i][0].site, (i,), resolved[i][1]) for i in rows]
        clean = {p.site: values[(p.site, kind)] for p in patches}
        scores = run_patches(
            model,
            toks,
            clean,
            patches,
            metric,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            vectorized_metric=vectorized_metric,
            progress=progress,
            desc=f"{kind} ablation",
            metric_positions=metric_positions,
        )
        if scores is not None:  # None: another process of a split model has them
            out[rows] = scores.cpu()
    return out.to(model.device) if model.blocks.gets_output else None


# Sweeps -------------------------------------------------------------------------------------
def ablation_sweep(
    model: HookedModel,
    tokens: Any,
    metric: PatchingMetric,
    activation_name: str = "z",
    over: Literal["head", "neuron", "pos"] = "head",
    *,
    kind: Kind = "mean",
    reference: Any = None,
    positions: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    per_position: bool = True,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> Float[torch.Tensor, "layer index"] | None:
    """The metric with each (layer, head), (layer, neuron) or (layer, pos) ablated on its own.

    ``activation_name``: a TL short name (``"z"``, ``"q"``, ``"result"``, ``"post"``, ...).
    ``positions`` / ``heads`` restrict every ablation of the sweep (e.g. only the last
    position). ``layers``: sweep only these layers (the rows of the result, in that order).
    Keyword options of ``run_ablations`` (batch_size, max_batch_bytes, vectorized_metric,
    progress, metric_positions) pass through as ``**kwargs``. Returns ``[n_layers (or
    len(layers)), n_index]``. ``over``: what is ablated one at a time (``"head"``,
    ``"neuron"`` or ``"pos"``); ``model``, ``tokens``, ``kind``, ``reference``,
    ``per_position`` and ``seed`` as in ``ablate``.
    """
    if over not in ("head", "neuron", "pos"):
        raise ValueError(f"over must be 'head', 'neuron' or 'pos', got {over!r}")
    toks = _tokens(model, tokens)
    n_layers = model.cfg.n_layers
    layers = (
        range(n_layers)
        if layers is None
        else [check_index(int(layer), n_layers, "layer", f"a model with {n_layers} layers") for layer in layers]
    )
    names = [get_act_name(activation_name, layer, n_layers=n_layers) for layer in layers]
    model.resolve_hook_names(names)
    row = sites.lookup(names[0])
    if row is None:
        raise ValueError(f"{names[0]} is not in the site table: sweep it with run_ablations")
    size = dict(zip(row.axes_in(model.cfg), row.shape(model.cfg, 1, toks.shape[1]), strict=True))
    n = {"head": size.get("head", size.get("kv_head")), "pos": size.get("pos", size.get("query_pos"))}.get(over)
    if over == "neuron":
        n = row.shape(model.cfg, 1, toks.shape[1])[-1]
    if n is None:
        raise ValueError(f"{names[0]} has axes {list(row.axes_in(model.cfg))}: it has no {over} axis to sweep")
    base: dict[str, Any] = dict(positions=_tup(positions), heads=_tup(heads), kind=kind)
    ablations = []
    for name in names:
        for i in range(n):
            ablations.append(Ablation(name, **{**base, ("positions" if over == "pos" else over + "s"): (i,)}))
    out = run_ablations(
        model, toks, ablations, metric, reference=reference, per_position=per_position, seed=seed, **kwargs
    )
    return None if out is None else out.reshape(len(names), n)
