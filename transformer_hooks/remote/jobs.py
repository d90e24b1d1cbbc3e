"""Requests run on a model: checked first, then run alone or batched with others.

Everything a request can do is here, as data turned into the library's own calls:
``prepare_run`` checks a ``RunRequest`` against the model (sites, selectors, tensor shapes)
before anything runs, and ``run_batch`` runs several prepared requests as one forward, each
request's rows edited only by its own interventions; the other jobs call the library's
workflows (the patching sweeps, attribution patching, DLA, the logit lens, generate).

Batching is exact: requests share a forward only when they have the same number of
positions and the same padding kind (with or without a mask), and each request keeps its
own padding. Rows of a forward do not mix, and CPU kernels give a row the same bits
whatever the batch size, so a request's result is bit for bit what it gets alone (tested).
A padded batch of different lengths is not bit-identical on CPU (the attention's sums run
over more keys), so requests of different lengths are never batched together.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import sites
from ..analysis.dla import direct_logit_attribution
from ..analysis.lens import LENS_SITES, logit_lens
from ..interventions import patching
from ..interventions.patching.ablation import ablation_value
from ..interventions.steering import steering
from ..protocol import HookedModel
from ..scale.distributed import logit_diff_metric
from .schema import (
    AttributionRequest,
    DLARequest,
    GenerateRequest,
    Intervention,
    LensRequest,
    Metric,
    ParamsRequest,
    PatchRequest,
    RunRequest,
    TokenizeRequest,
    decode_tensors,
)

__all__ = [
    "BadRequest",
    "Cancelled",
    "Prepared",
    "dataclass_fields",
    "param_names",
    "prepare_run",
    "run_attribution",
    "run_batch",
    "run_dla",
    "run_generate",
    "run_lens",
    "run_params",
    "run_patch",
    "run_tokenize",
    "sweep_names",
]


class BadRequest(ValueError):
    """A request the model cannot run (an unknown site, a wrong shape, a bad selector): HTTP 400."""


class Cancelled(RuntimeError):
    """Every request of a forward was cancelled (timeout, or the client went away)."""


# Inputs --------------------------------------------------------------------------------------
def _tokens(model: HookedModel, req: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The request's tokens [batch, pos] and padding mask (None when there is no padding)."""
    try:
        if req.prompts is not None:
            if model.tokenizer is None:
                raise BadRequest("this model has no tokenizer: send token ids ('tokens') instead of prompts")
            tokens, mask = model.tokens_and_mask(req.prompts, req.prepend_bos, req.padding_side)
        else:
            lengths = {len(t) for t in req.tokens}
            if len(lengths) != 1 or 0 in lengths:
                raise BadRequest(f"'tokens' rows must be non-empty and of one length, got lengths {sorted(lengths)}")
            tokens = torch.tensor(req.tokens, dtype=torch.long)
            mask_in = torch.tensor(req.attention_mask, dtype=torch.long) if req.attention_mask is not None else None
            if mask_in is not None and mask_in.shape != tokens.shape:
                raise BadRequest(f"'attention_mask' is {list(mask_in.shape)} but 'tokens' is {list(tokens.shape)}")
            tokens, mask = model.tokens_and_mask(tokens, attention_mask=mask_in)
    except BadRequest:
        raise
    except (ValueError, TypeError, IndexError) as e:
        raise BadRequest(f"bad input: {e}") from None
    if mask is not None and bool(mask.all()):
        mask = None  # an all-ones mask runs exactly as no mask
    return tokens, mask


def _resolve(model: HookedModel, names: Sequence[str], what: str) -> list[str]:
    try:
        return model.resolve_hook_names(list(names))
    except ValueError as e:
        raise BadRequest(f"{what}: {e}") from None


# Interventions ------------------------------------------------------------------------------
@dataclass
class _Edit:
    """One intervention at one site, checked: which rows, which index, what value."""

    spec: Intervention
    site: str
    rows: list[int]  # the request's prompts it edits
    index: tuple[torch.Tensor | None, ...]  # per non-batch axis: the chosen indices, or None for all
    tensor: torch.Tensor | None
    source_rows: list[int]  # prompts whose clean activation it reads (patch, mean_ablate)


def _axes(model: HookedModel, site: str, n_pos: int, batch: int) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    row = sites.lookup(site)
    if row is None:
        return ("batch", "pos", "d"), None
    return row.axes_in(model.cfg), tuple(row.shape(model.cfg, batch, n_pos))


def _selector(values: Any, axes: tuple[str, ...], names: tuple[str, ...], shape: Any, site: str, what: str) -> Any:
    """(axis, tensor of indices) for a pos/head selector, checked against the site's axes."""
    if values is None:
        return None
    dim = next((i for i, a in enumerate(axes) if a in names), None)
    if dim is None or dim == 0:
        raise BadRequest(f"bad selector: {site} has axes {list(axes)}, no {what} axis to select {what}s of")
    size = shape[dim] if shape is not None else None
    values = [values] if isinstance(values, int) else list(values)
    if size is not None:
        for v in values:
            if not -size <= v < size:
                raise BadRequest(
                    f"bad selector: {what} {v} is out of range for {site} ({axes[dim]} axis of size {size})"
                )
        values = [v % size for v in values]
    return dim, torch.tensor(values, dtype=torch.long)


def _edit(model: HookedModel, spec: Intervention, site: str, n_prompts: int, n_pos: int, tensors: dict) -> _Edit:
    axes, shape = _axes(model, site, n_pos, n_prompts)
    where = f"intervention {spec.op} at {site}"

    def prompt_index(i: int, what: str) -> int:
        if not -n_prompts <= i < n_prompts:
            raise BadRequest(f"bad selector: {what} {i} is out of range ({where}; the request has {n_prompts} prompts)")
        return i % n_prompts

    rows = list(range(n_prompts)) if spec.prompts is None else [prompt_index(i, "prompt") for i in spec.prompts]
    index: list[torch.Tensor | None] = [None] * (len(axes) - 1)
    for values, names, what in ((spec.pos, ("pos", "query_pos"), "position"), (spec.head, ("head", "kv_head"), "head")):
        sel = _selector(values, axes, names, shape, site, what)
        if sel is not None:
            index[sel[0] - 1] = sel[1]
    tensor = None
    if spec.tensor is not None:
        if spec.tensor not in tensors:
            raise BadRequest(f"{where}: no tensor {spec.tensor!r} in 'tensors' (it has {sorted(tensors)[:10]})")
        tensor = tensors[spec.tensor]
        if not tensor.dtype.is_floating_point:
            raise BadRequest(f"{where}: tensor {spec.tensor!r} is {tensor.dtype}, not floating point")
        if shape is not None:
            selected = [len(rows)] + [shape[d + 1] if idx is None else len(idx) for d, idx in enumerate(index)]
            if not _broadcasts(tuple(tensor.shape), selected):
                raise BadRequest(
                    f"wrong shape: {where}: tensor {spec.tensor!r} is {list(tensor.shape)}, which does not "
                    f"broadcast to the selection {selected} of {site} {list(axes)}"
                )
    sources: list[int] = []
    if spec.op == "patch":
        sources = [prompt_index(spec.from_prompt, "from_prompt")]  # type: ignore[arg-type]  # validated: set for patch
    elif spec.op == "mean_ablate":
        ref = spec.reference if spec.reference is not None else list(range(n_prompts))
        if not ref:
            raise BadRequest(f"{where}: 'reference' is empty")
        sources = [prompt_index(i, "reference prompt") for i in ref]
    return _Edit(spec, site, rows, tuple(index), tensor, sources)


def _broadcasts(shape: tuple[int, ...], target: list[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target``."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def _outer(index: Sequence[torch.Tensor | None], sizes: Sequence[int], device: Any) -> tuple[torch.Tensor, ...]:
    """Indices for every axis, shaped to broadcast to their outer product (so ``t[idx]`` keeps axis order)."""
    n = len(sizes)
    out = []
    for d, (idx, size) in enumerate(zip(index, sizes, strict=True)):
        chosen = torch.arange(size, device=device) if idx is None else idx.to(device)
        out.append(chosen.reshape([-1 if i == d else 1 for i in range(n)]))
    return tuple(out)


# Prepared requests and the batched forward ---------------------------------------------------
@dataclass
class Prepared:
    """A checked ``RunRequest``: its rows, its edits, its sites. ``key`` says which requests may
    share its forward (same positions, same padding kind)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None
    names: list[str]
    edits: list[_Edit]
    return_logits: bool
    clean_copies: list[int]
    request: RunRequest  # prompts that need an unedited copy row (a patch or mean source that is edited)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def n_prompts(self) -> int:
        """The request's prompts (rows of ``tokens``)."""
        return self.tokens.shape[0]

    @property
    def n_rows(self) -> int:
        """Rows it takes in a batch: its prompts and their unedited copies."""
        return self.n_prompts + len(self.clean_copies)

    @property
    def key(self) -> tuple[int, bool]:
        """What requests batched together share: (sequence length, has a mask)."""
        return (self.tokens.shape[1], self.mask is not None)

    def n_tokens(self) -> int:
        """The request's tokens (batch x pos), checked against ``max_tokens``."""
        return self.tokens.numel()

    def response_bytes(self, model: HookedModel) -> int:
        """The bytes of the tensors it returns (before base64), in ``model``'s dtype."""
        b, n = self.tokens.shape
        size = torch.finfo(model.dtype).bits // 8
        total = b * n * model.cfg.d_vocab_out * size if self.return_logits else 0
        for name in self.names:
            row = sites.lookup(name)
            total += size * (int(torch.Size(row.shape(model.cfg, b, n)).numel()) if row else b * n * model.cfg.d_model)
        return total


def prepare_run(model: HookedModel, req: RunRequest) -> Prepared:
    """Check ``req`` against ``model`` (BadRequest naming what is wrong); nothing runs."""
    tokens, mask = _tokens(model, req)
    try:
        tensors = decode_tensors(req.tensors)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    names = _resolve(model, req.sites, "sites")
    edits: list[_Edit] = []
    for spec in req.interventions:
        for site in _resolve(model, [spec.site], f"intervention {spec.op}"):
            edits.append(_edit(model, spec, site, tokens.shape[0], tokens.shape[1], tensors))
    edited = {r for e in edits for r in e.rows}
    sources = sorted({r for e in edits for r in e.source_rows})
    return Prepared(tokens, mask, names, edits, req.return_logits, [r for r in sources if r in edited], req)


def _site_hook(model: HookedModel, site: str, parts: list[tuple[int, Prepared, list[_Edit]]]) -> Callable:
    """One hook at ``site`` applying each request's edits to its own rows, in order."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone()
        for start, p, edits in parts:

            def clean_row(prompt: int, start: int = start, p: Prepared = p) -> torch.Tensor:
                # An unedited prompt's row is clean; an edited one has its copy after the prompts.
                if prompt in p.clean_copies:
                    return act[start + p.n_prompts + p.clean_copies.index(prompt)]
                return act[start + prompt]

            for e in edits:
                rows = torch.tensor([start + r for r in e.rows], device=act.device)
                idx = _outer((rows, *e.index), act.shape, act.device)
                # The same selection in a tensor of the edited rows only ([len(rows), ...]).
                local = (torch.arange(len(e.rows), device=act.device).reshape(idx[0].shape), *idx[1:])
                op = e.spec.op
                if op == "zero":
                    out[idx] = 0
                elif op == "scale":
                    out[idx] = out[idx] * e.spec.coeff
                elif op == "set":
                    out[idx] = e.tensor.to(act.device, act.dtype)  # type: ignore[union-attr]  # checked: set has one
                elif op in ("add", "steer"):
                    out[idx] = out[idx] + e.spec.coeff * e.tensor.to(act.device, act.dtype)  # type: ignore[union-attr]
                elif op == "patch":
                    src = clean_row(e.source_rows[0])[None].expand(len(e.rows), *act.shape[1:])
                    out[idx] = src[local]
                elif op == "mean_ablate":
                    ref = torch.stack([clean_row(r) for r in e.source_rows])
                    ref_mask = None if p.mask is None else p.mask[e.source_rows].to(act.device)
                    value = ablation_value(
                        model, e.site, "mean", p.tokens[e.rows], reference=ref, reference_mask=ref_mask
                    ).to(act.dtype)
                    out[idx] = value[local]
        return out

    return hook


def _cancel_check(items: Sequence[Any]) -> Callable:
    def check(act: torch.Tensor, hook: Any) -> None:
        if all(p.cancelled.is_set() for p in items):
            raise Cancelled("every request of this forward was cancelled")

    check.reads_only = True  # type: ignore[attr-defined]  # hooks.reads_only's marker
    return check


def cancel_hooks(model: HookedModel, items: Sequence[Any]) -> list[tuple[str, Callable]]:
    """A hook before every block of ``model`` that stops the forward once every request of ``items`` is cancelled."""
    check = _cancel_check(items)
    return [(f"blocks.{layer}.hook_resid_pre", check) for layer in range(model.cfg.n_layers)]


def run_batch(model: HookedModel, items: Sequence[Prepared], cancel: bool = True) -> list[dict[str, torch.Tensor]]:
    """One forward for every request of ``items`` (all of one ``key``); per request, its
    logits (``"logits"``) and sites, sliced from the batch and copied. ``cancel``: stop at the
    next block once every request is cancelled (not on a model split over processes, whose
    other ranks would wait for the rest of the forward)."""
    rows, masks, starts = [], [], []
    start = 0
    for p in items:
        starts.append(start)
        rows.append(p.tokens)
        if p.clean_copies:
            rows.append(p.tokens[p.clean_copies])
        if p.mask is not None:
            masks.append(p.mask)
            if p.clean_copies:
                masks.append(p.mask[p.clean_copies])
        start += p.n_rows
    tokens = torch.cat(rows).to(model.device)
    mask = torch.cat(masks).to(model.device) if masks else None

    by_site: dict[str, list[tuple[int, Prepared, list[_Edit]]]] = {}
    for s, p in zip(starts, items, strict=True):
        for e in p.edits:
            parts = by_site.setdefault(e.site, [])
            if not parts or parts[-1][1] is not p:
                parts.append((s, p, []))
            parts[-1][2].append(e)
    hooks = [(site, _site_hook(model, site, parts)) for site, parts in by_site.items()]
    names = list(dict.fromkeys(n for p in items for n in p.names))
    if cancel:
        hooks += cancel_hooks(model, items)
    want_logits = any(p.return_logits for p in items)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        # run_with_cache, so a model split over processes gathers every rank's sites on rank 0.
        logits, store = model.run_with_cache(
            tokens,
            names_filter=names,
            attention_mask=mask,
            return_type="logits" if want_logits else None,
            return_cache_object=False,
        )
    if store is None:  # a following rank of a model split over processes: rank 0 answers
        return []
    results = []
    for s, p in zip(starts, items, strict=True):
        rows_of = slice(s, s + p.n_prompts)
        out = {n: store[n][rows_of].to("cpu", copy=True) for n in p.names}
        if p.return_logits:
            out["logits"] = logits[rows_of].to("cpu", copy=True)
        results.append(out)
    return results


# Jobs run alone -------------------------------------------------------------------------------
def run_tokenize(model: HookedModel, req: TokenizeRequest) -> dict[str, Any]:
    """The ``tokenize`` job: ``req``'s tokens, mask and string tokens (None without a tokenizer) for ``model``."""
    tokens, mask = _tokens(model, req)
    str_tokens = [model.to_str_tokens(t) for t in tokens] if model.tokenizer is not None else None
    return {
        "tokens": tokens.tolist(),
        "attention_mask": None if mask is None else mask.tolist(),
        "str_tokens": str_tokens,
    }


def sweep_names(prefix: str) -> list[str]:
    """The names in ``patching.__all__`` that start with ``prefix`` (the sweeps the server runs)."""
    return sorted(n for n in patching.__all__ if n.startswith(prefix))


def _sweep(name: str, prefix: str) -> Callable:
    allowed = sweep_names(prefix)
    if name not in allowed:
        raise BadRequest(f"unknown sweep {name!r}; the server runs {allowed}")
    return getattr(patching, name)


def _metric(model: HookedModel, m: Metric) -> Callable[[torch.Tensor], torch.Tensor]:
    for t in (m.answer, m.contrast):
        if t is not None and not 0 <= t < model.cfg.d_vocab_out:
            raise BadRequest(f"metric token {t} is out of range (d_vocab_out={model.cfg.d_vocab_out})")
    if m.name == "logit_diff":
        return logit_diff_metric(m.answer, m.contrast, pos=m.pos)  # type: ignore[arg-type]  # validated
    answer, pos = m.answer, m.pos

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, pos, answer].mean()

    return metric


def pair_tokens(model: HookedModel, req: PatchRequest | AttributionRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """``req``'s clean and corrupted tokens for ``model``, checked (``BadRequest`` unless they have one shape)."""
    clean, _ = _tokens(model, req.clean)
    corrupted, _ = _tokens(model, req.corrupted)
    if clean.shape != corrupted.shape:
        raise BadRequest(
            f"clean tokens {list(clean.shape)} and corrupted tokens {list(corrupted.shape)} differ in shape"
        )
    return clean, corrupted


def _pair(model: HookedModel, req: PatchRequest | AttributionRequest) -> tuple[torch.Tensor, Any]:
    clean, corrupted = pair_tokens(model, req)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return corrupted, clean_cache


def run_patch(model: HookedModel, req: PatchRequest) -> dict[str, torch.Tensor] | None:
    """The ``patch`` job: the activation-patching sweep ``req.sweep`` of ``model``, as ``{"result": tensor}``
    (None on a split model's other ranks)."""
    sweep = _sweep(req.sweep, "get_act_patch_")
    metric = _metric(model, req.metric)
    corrupted, clean_cache = _pair(model, req)
    with torch.no_grad():
        out = sweep(model, corrupted, clean_cache, metric, progress=False, metric_positions=req.metric_positions)
    return None if out is None else {"result": out.detach().cpu()}


def run_attribution(model: HookedModel, req: AttributionRequest) -> dict[str, torch.Tensor] | None:
    """The ``attribution`` job: the attribution-patching sweep ``req.sweep`` of ``model``, as ``{"result": tensor}``
    (None on a split model's other ranks)."""
    sweep = _sweep(req.sweep, "get_attr_patch_")
    metric = _metric(model, req.metric)
    corrupted, clean_cache = _pair(model, req)
    out = sweep(model, corrupted, clean_cache, metric, method=req.method, grad_drop=req.grad_drop)
    return None if out is None else {"result": out.detach().cpu()}


def dataclass_fields(obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The dataclass result ``obj`` as (JSON fields, tensors on the CPU)."""
    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            tensors[f.name] = v.detach().cpu()
        else:
            plain[f.name] = v
    return plain, tensors


def run_dla(model: HookedModel, req: DLARequest) -> Any:
    """The ``dla`` job: ``direct_logit_attribution`` of ``req``'s prompt on
    ``model`` (BadRequest without a tokenizer); None on a split model's other ranks.
    """
    if model.tokenizer is None:
        raise BadRequest("DLA takes strings: this model has no tokenizer")
    try:
        return direct_logit_attribution(model, req.prompt, req.answer, req.contrast, req.pos)
    except (ValueError, IndexError) as e:
        raise BadRequest(f"dla: {e}") from None


def run_lens(model: HookedModel, req: LensRequest) -> Any:
    """The ``lens`` job: ``logit_lens`` of ``req``'s input on ``model``; None on a split model's other ranks."""
    tokens, mask = _tokens(model, req)
    lens_sites = tuple(req.lens_sites) if req.lens_sites is not None else LENS_SITES
    try:
        return logit_lens(
            model, tokens, sites=lens_sites, pos_slice=req.pos, top_k=req.top_k, progress=False, attention_mask=mask
        )
    except (ValueError, IndexError) as e:
        raise BadRequest(f"logit lens: {e}") from None


def prepare_generate(model: HookedModel, req: GenerateRequest) -> tuple[list[tuple[str, Any, float, Any]], Any, Any]:
    """``req`` checked against ``model`` (``BadRequest`` otherwise): its steering interventions as
    (site, vector, coeff, pos), the input (prompts or tokens) and its padding mask (or None)."""
    try:
        tensors = decode_tensors(req.tensors)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    steers = []
    for spec in req.interventions:
        if spec.op not in ("steer", "add") or spec.head is not None or spec.prompts is not None:
            raise BadRequest(
                f"generate takes steer/add interventions on all prompts without a head selector, got {spec.op!r}"
            )
        if spec.tensor not in tensors:
            raise BadRequest(f"intervention {spec.op} at {spec.site}: no tensor {spec.tensor!r} in 'tensors'")
        names = _resolve(model, [spec.site], f"intervention {spec.op}")
        if names != [spec.site]:
            raise BadRequest(f"steering takes one site name, got {spec.site!r}")
        steers.append((spec.site, tensors[spec.tensor], spec.coeff, spec.pos))
    input: Any = req.prompts
    mask = None
    if req.tokens is not None:
        input, mask = _tokens(model, req)
    elif model.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send token ids ('tokens') instead of prompts")
    return steers, input, mask


def run_generate(model: HookedModel, req: GenerateRequest) -> dict[str, Any]:
    """The ``generate`` job: ``model.generate`` of ``req``'s input inside one ``steering`` context
    per steer/add intervention; ``{"text": ...}`` for prompts, ``{"tokens": ...}`` for token ids
    (on every rank of a split model).
    """
    steers, input, mask = prepare_generate(model, req)
    torch.manual_seed(req.seed)
    try:
        from contextlib import ExitStack

        with ExitStack() as stack, torch.no_grad():
            for site, vector, coeff, pos in steers:
                stack.enter_context(steering(model, site, vector, coeff, pos))
            out = model.generate(
                input,
                max_new_tokens=req.max_new_tokens,
                do_sample=req.do_sample,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                stop_at_eos=req.stop_at_eos,
                prepend_bos=req.prepend_bos,
                padding_side=req.padding_side if req.padding_side is not None else "left",
                attention_mask=mask,
                verbose=False,
            )
    except (ValueError, IndexError) as e:
        raise BadRequest(f"generate: {e}") from None
    if isinstance(out, torch.Tensor):
        return {"tokens": out.tolist()}
    return {"text": out}


DLA_WEIGHTS = (
    "unembed.*",
    "ln_final.*",
    "blocks.*.ln*",
    "blocks.*.attn.W_O",
    "blocks.*.attn.b_O",
    "blocks.*.mlp.W_out",
    "blocks.*.mlp.b_out",
)


def param_names(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` (a model's parameter names) matching ``patterns`` (names or globs), in
    pattern order; BadRequest for a plain name not among them."""
    chosen: dict[str, None] = {}
    for pattern in patterns:
        matches = fnmatch.filter(names, pattern)
        if not matches and not any(c in pattern for c in "*?["):
            raise BadRequest(f"this model has no parameter {pattern!r}")
        chosen.update(dict.fromkeys(matches))
    return list(chosen)


def run_params(model: HookedModel, req: ParamsRequest) -> dict[str, torch.Tensor] | None:
    """The ``params`` job: ``model``'s parameters whose names match ``req.names`` (names or globs),
    on the CPU; BadRequest for a plain name the model lacks. Split over processes: rank 0's
    (after ``hold_weights`` of those it lacks), None on the other ranks.
    """
    if not model.blocks.gets_output:
        return None
    state = dict(model.named_parameters())
    return {n: state[n].detach().cpu() for n in param_names(list(state), req.names)}
