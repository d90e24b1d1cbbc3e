"""Logit lens: read the residual stream of every layer, and each attention and MLP output
before it joins the stream, as if it were the last one: through the final norm and the
unembedding::

    lens_logits(x) = final_norm(x) · W_U + b_U

``norm="recompute"`` (the logit lens) normalises each vector by its own statistics, so
the last ``resid_post`` decodes to exactly the model's logits and an ``attn_out`` decodes
to what the model would predict if that output were the whole residual stream.
``norm="cached"`` divides every vector by the final norm's scale cached in the forward
pass instead (``ActivationCache.apply_ln_to_stack``): linear, so the decoded
``attn_out`` and ``mlp_out`` of all layers plus the embeddings add up to the final
logits (direct logit attribution in vocabulary space) — before a final soft-cap
(``final_logit_softcap``, Gemma 2), which every decoding goes through as the model's logits
do: ranks and top tokens are the cap's, but capped parts no longer add up.

``logit_lens(model, "The capital of France is")`` returns a ``LogitLens``: top-k tokens,
logits and probabilities for every (layer, site) and position, plus, when ``targets``
are given, each target token's logit, probability and rank. Tensors are indexed
``[component, *batch_and_pos, ...]`` with ``labels[component] == "3_attn_out"``;
``LogitLens.grid(site, field)`` reshapes one site to ``[layer, *batch_and_pos]`` for a
heatmap. For full logits over the vocabulary, compose the parts:
``unembed(model, final_norm(model, lens_stack(cache)[0]))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from .. import sites as site_table  # `sites` names the argument
from ..cache import ActivationCache
from ..components.norms import normalize
from ..components.softcap import softcap
from ..progress import tqdm
from ..protocol import HookedModel
from ..tables import short_repr, text_table
from ..utils import Slice, SliceInput, check_layer

# The sites a block writes or passes on, in the order they happen.
LENS_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
Norm = Literal["recompute", "cached"]
Stack = Float[torch.Tensor, "component *batch_and_pos d_model"]
Targets = str | int | Sequence[int] | torch.Tensor | None
_CHUNK_LOGITS = 32 * 2**20  # logits held at once (x4 bytes, plus softmax temporaries)


def lens_stack(
    cache: ActivationCache,
    sites: Sequence[str] = LENS_SITES,
    layers: Sequence[int] | None = None,
    pos_slice: SliceInput | Slice = None,
) -> tuple[Stack, list[str], list[int], list[str]]:
    """The activations to decode, stacked: ``(stack, labels, layers, sites)``, one entry per
    row, layer-major and in ``LENS_SITES`` order within a layer (``"3_resid_pre"``).
    Parallel-residual blocks have no ``resid_mid``; it is skipped there. Read from ``cache``,
    for ``sites`` of ``layers`` (None: every layer), at the positions ``pos_slice`` keeps.
    """
    unknown = [s for s in sites if s not in LENS_SITES]
    if unknown:
        raise ValueError(f"unknown lens site(s) {unknown}; choose from {list(LENS_SITES)}")
    cfg = cache.model.cfg
    n = cfg.n_layers
    layers = list(range(n)) if layers is None else [check_layer(L, n) for L in layers]
    pos_slice = Slice.unwrap(pos_slice)
    rows, labels, row_layers, row_sites = [], [], [], []
    for layer in layers:
        for site in LENS_SITES:
            if site not in sites or not site_table.exists(f"hook_{site}", cfg):
                continue
            rows.append(pos_slice.apply(cache._get((site, layer), "logit_lens"), dim=-2))
            labels.append(f"{layer}_{site}")
            row_layers.append(layer)
            row_sites.append(site)
    if not rows:
        raise ValueError(f"no activations to decode for sites={list(sites)} and layers={layers}")
    return torch.stack(rows), labels, row_layers, row_sites


def final_norm(
    model: HookedModel,
    stack: Float[torch.Tensor, "... d_model"],
    norm: Norm = "recompute",
    cache: ActivationCache | None = None,
    pos_slice: SliceInput | Slice = None,
) -> Float[torch.Tensor, "... d_model"]:
    """``model.ln_final`` applied to each vector of ``stack`` (weight and bias included).

    ``norm="recompute"``: each vector's own mean and RMS (``eps`` as the model's). ``"cached"``:
    the scale cached in ``cache`` for the final residual stream (pass the stack's
    ``pos_slice``), the same for every row.
    """
    ln: Any = model.ln_final  # a components norm (LayerNorm / RMSNorm): its eps and w
    if norm == "cached":
        if cache is None:
            raise ValueError("norm='cached' needs the cache the stack came from")
        out = cache.apply_ln_to_stack(stack, -1, pos_slice=pos_slice, apply_weight=True)
    elif norm == "recompute":
        w = getattr(ln, "w", None)
        out = normalize(stack, model.cfg.norm_centres, ln.eps, w=None if w is None else w.detach().float())
    else:
        raise ValueError(f"norm must be 'recompute' or 'cached', got {norm!r}")
    b = getattr(ln, "b", None)
    if b is not None:
        out = out + b.detach().to(out.dtype)
    return out


def unembed(model: HookedModel, normalized: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
    """``normalized · W_U + b_U``, soft-capped as the model caps its logits (Gemma 2)."""
    W_U, b_U = model.W_U.detach(), model.b_U.detach()
    logits = normalized.to(W_U.dtype) @ W_U + b_U
    cap = model.cfg.final_logit_softcap
    return logits if cap is None else softcap(logits, cap)


@dataclass
class LogitLens:
    """Top-k decodings of every (layer, site) row; see the module docstring."""

    labels: list[str]
    layers: list[int]
    sites: list[str]
    top_tokens: Int[torch.Tensor, "component *batch_and_pos k"]
    top_logits: Float[torch.Tensor, "component *batch_and_pos k"]
    top_probs: Float[torch.Tensor, "component *batch_and_pos k"]
    target_tokens: Int[torch.Tensor, "*batch_and_pos"] | None = None
    target_logits: Float[torch.Tensor, " component *batch_and_pos"] | None = None
    target_probs: Float[torch.Tensor, " component *batch_and_pos"] | None = None
    target_ranks: Int[torch.Tensor, " component *batch_and_pos"] | None = None  # 0: the top token

    def rows(self, site: str) -> list[int]:
        """The row indices of ``site``, in layer order."""
        rows = [i for i, s in enumerate(self.sites) if s == site]
        if not rows:
            raise ValueError(f"this lens has no {site!r} rows; it has {sorted(set(self.sites))}")
        return rows

    def grid(self, site: str, field: str = "top_probs") -> tuple[list[int], torch.Tensor]:
        """``(layers, values)`` of one site: ``values[i]`` is ``field`` at ``layers[i]``
        (e.g. ``grid("resid_post", "target_probs")`` -> ``[layer, *batch_and_pos]``)."""
        values = getattr(self, field)
        if values is None:
            raise ValueError(f"{field} is not computed: pass targets=... to logit_lens")
        rows = self.rows(site)
        return [self.layers[i] for i in rows], values[rows]

    def top_strings(self, model_or_tokenizer: Any) -> list:
        """``top_tokens`` decoded by ``model_or_tokenizer`` (a model with a tokenizer, or the tokenizer), as nested
        lists of the same shape.
        """
        tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
        if tok is None:
            raise ValueError("this model has no tokenizer to decode the top tokens with")
        flat = self.top_tokens.reshape(-1).tolist()
        vocab = {t: tok.decode([t]) for t in set(flat)}

        def build(t: torch.Tensor) -> Any:
            return [vocab[int(i)] for i in t] if t.ndim == 1 else [build(s) for s in t]

        return build(self.top_tokens)


def logit_lens(
    model: HookedModel,
    input: Any,
    *,
    sites: Sequence[str] = LENS_SITES,
    layers: Sequence[int] | None = None,
    pos_slice: SliceInput | Slice = None,
    top_k: int = 5,
    targets: Targets = None,
    norm: Norm = "recompute",
    chunk_size: int | None = None,
    progress: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> LogitLens | None:
    """Decode every (layer, site) of ``sites`` through the final norm and unembedding.

    ``input``: an ``ActivationCache`` with the sites (and, for ``norm="cached"``, the final
    scale), or anything ``model.run_with_cache`` takes (only the needed sites are cached).
    ``pos_slice``: positions to decode (``-1``: the last). ``targets``: a token (string or
    id) for every position, or ids shaped like the decoded ``*batch_and_pos``. Logits
    over the vocabulary are computed ``chunk_size`` rows at a time (default: about 32M
    logits per chunk) and only the top-k and the targets' entries are kept.

    In a padded batch (strings, or tokens with ``attention_mask``, or a cache with the
    ``attention_mask`` of its run), ``pos_slice=-1`` decodes each row's last real token.

    ``sites`` of ``layers`` (None: every layer) are decoded, keeping the ``top_k`` tokens of
    each; ``norm`` as in ``final_norm``; ``progress`` shows a progress bar over the chunks.

    Split over processes (``pipeline_ranks``): every rank calls it with the same ``input``
    after ``model.hold_weights()`` (it reads the final norm and ``W_U``); rank 0 returns the
    lens, the other ranks None.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if isinstance(input, ActivationCache):
        cache = input
    else:
        if isinstance(input, str) and not input:
            raise ValueError("empty prompt: give the text to run the logit lens on")
        wanted = [f"blocks.*.hook_{s}" for s in sites if site_table.exists(f"hook_{s}", model.cfg)]
        _, mask = model.tokens_and_mask(input, attention_mask=attention_mask)
        attention_mask = mask if attention_mask is None else attention_mask
        with torch.no_grad():
            _, cache = model.run_with_cache(
                input,
                names_filter=wanted + ["ln_final.hook_scale"],
                return_type=None,
                attention_mask=attention_mask,
            )
        if cache is None:  # split over processes: rank 0 decodes
            return None
    pos_slice = Slice.unwrap(pos_slice)
    last_real = _last_real_positions(attention_mask, pos_slice)
    if last_real is None:
        stack, labels, row_layers, row_sites = lens_stack(cache, sites, layers, pos_slice)
    else:  # each row's last real token: [component, batch, d_model], as pos_slice=-1 gives
        stack, labels, row_layers, row_sites = lens_stack(cache, sites, layers)
        stack = stack[:, torch.arange(stack.shape[1], device=stack.device), last_real.to(stack.device)]
    target_ids = _targets(model, targets, stack.shape[1:-1], stack.device)

    tops, logits_k, probs_k, t_logits, t_probs, t_ranks = [], [], [], [], [], []
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_LOGITS // (stack[0, ..., 0].numel() * model.cfg.d_vocab_out))
    chunks = range(0, stack.shape[0], chunk_size)
    with torch.no_grad():
        for start in tqdm(chunks, desc="logit lens", unit="chunk", delay=1.0, leave=False, disable=not progress):
            rows = stack[start : start + chunk_size]
            logits = unembed(model, final_norm(model, rows, norm, cache, pos_slice)).float()
            log_probs = logits.log_softmax(-1)
            top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            tops.append(top.indices)
            logits_k.append(top.values)
            probs_k.append(log_probs.gather(-1, top.indices).exp())
            if target_ids is not None:
                idx = target_ids.expand(rows.shape[:-1])[..., None]
                target_logit = logits.gather(-1, idx)
                t_logits.append(target_logit[..., 0])
                t_probs.append(log_probs.gather(-1, idx)[..., 0].exp())
                t_ranks.append((logits > target_logit).sum(-1))
    lens = LogitLens(labels, row_layers, row_sites, torch.cat(tops), torch.cat(logits_k), torch.cat(probs_k))
    if target_ids is not None:
        lens.target_tokens = target_ids
        lens.target_logits, lens.target_probs, lens.target_ranks = map(torch.cat, (t_logits, t_probs, t_ranks))
    return lens


def _last_real_positions(attention_mask: torch.Tensor | None, pos_slice: Slice) -> torch.Tensor | None:
    """Each row's last real position when ``pos_slice`` is -1 ("the last") and the mask pads the
    end of some row; None when position -1 is real in every row (or another slice is asked for)."""
    if attention_mask is None or pos_slice.mode != "int" or pos_slice.slice != -1:
        return None
    mask = torch.as_tensor(attention_mask)
    if mask.ndim != 2 or bool(mask[:, -1].all()):
        return None
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.bool()).amax(-1)


def _targets(model: HookedModel, targets: Targets, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = model.to_single_token(targets)
    ids = torch.as_tensor(targets, device=device, dtype=torch.long)
    try:
        return ids.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"targets of shape {tuple(ids.shape)} do not match the decoded positions "
            f"{tuple(shape)} (batch and positions after pos_slice)"
        ) from None


# The text table of the ``logit-lens`` command ----------------------------------------------
LENS_COLUMNS = ("resid_post", "attn_out", "mlp_out")  # its columns; a lens for it decodes resid_pre too


def format_logit_lens(lens: LogitLens, model: HookedModel, str_tokens: list[str], pos: int, top: int = 3) -> str:
    """The ``logit-lens`` command's table: the ``top`` tokens (probability) at ``pos`` per layer.

    Rows: the embeddings, then each layer's residual stream after it, and its attention and MLP
    outputs decoded alone. ``lens``: a ``logit_lens`` result over one prompt, with the
    ``LENS_COLUMNS`` sites and ``resid_pre``; ``model`` decodes the tokens; ``str_tokens``: the
    prompt's tokens, for the header.
    """
    strings = lens.top_strings(model)

    def cell(row: int) -> str:
        return "  ".join(
            f"{short_repr(strings[row][0][pos][k])} {float(lens.top_probs[row, 0, pos, k]):.2f}"
            for k in range(min(top, lens.top_tokens.shape[-1]))
        )

    index = {label: i for i, label in enumerate(lens.labels)}
    rows = [["embed", cell(index["0_resid_pre"]), "", ""]]
    for layer in sorted(set(lens.layers)):
        rows.append([str(layer)] + [cell(index[f"{layer}_{site}"]) for site in LENS_COLUMNS])
    head = [
        f"Logit lens at position {pos} ({str_tokens[pos]!r}): top {top} tokens (probability) of each "
        f"vector through the final norm and unembedding",
        "",
    ]
    return "\n".join(
        head + text_table(["layer", "residual stream after the layer", "attention output", "MLP output"], rows)
    )
