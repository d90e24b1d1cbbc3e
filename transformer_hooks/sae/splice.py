"""Splicing an SAE into a model, steering with its features, evaluating it.

Splicing replaces the site's activation with its reconstruction for every forward in a
``with splice_sae(model, sae):`` block. With ``use_error_term=True`` the reconstruction
error is added back, computed as ``x + (recon - recon_clean)``: without edits to the
SAE's features the site keeps exactly its clean value (bit for bit), while gradients
flow through the features as in SAELens. While spliced, the SAE's hook points are
sites of the model named as SAELens's ``HookedSAETransformer`` names them:
``<site>.hook_sae_acts_post`` (the features), ``<site>.hook_sae_input``, ... so
``model.run_with_cache(names_filter="blocks.3.hook_resid_post.hook_sae_acts_post")``
caches the features and ``model.hooks(...)`` edits them.

On a model split over processes (``pipeline_ranks``), every rank splices, steers and
evaluates alike, each holding the same SAE: the splice runs on the rank that runs the site
(the SAE's own sites ``<site>.hook_sae_*`` belong to the site's block, so hooks on them fire
there and ``run_with_cache`` brings them to rank 0, as any site), and ``evaluate_sae``
returns its result on rank 0 (None elsewhere).

Weight processing and SAEs. SAELens trains on ``from_pretrained_no_processing(model,
**model_from_pretrained_kwargs)``, so an SAE expects exactly the processing steps its
``model_from_pretrained_kwargs`` turns on. What each step changes at each site (exact
algebra, checked against the real models in tests/test_sae.py):

==========================  ==========================================================
step                        sites whose values change
==========================  ==========================================================
fold_ln                     ``unembed.hook_in`` only (the final norm's output, which
                            loses ``ln_final``'s weight and bias: they move into
                            ``W_U`` and ``b_U``). ``hook_normalized`` is before the
                            norm's weight (and LayerNorm's bias) in both forms, as in
                            TransformerLens 3, and they move into the next matmul
                            exactly, so nothing else changes.
center_writing_weights      LayerNorm models only (skipped for RMSNorm): every write to
                            the residual stream has zero mean over d_model, so every
                            residual-stream site becomes ``x - mean(x)``:
                            ``hook_embed``, ``hook_pos_embed``, ``hook_resid_pre/mid/
                            post``, ``hook_attn_out``, ``hook_mlp_out``, ``hook_mlp_in``,
                            ``hook_attn_in``, ``hook_q/k/v_input``, ``attn.hook_result``.
                            Everything read through a LayerNorm is unchanged (the norm
                            centres its input anyway), and so is ``hook_scale``.
fold_value_biases           ``attn.hook_v`` and ``attn.hook_z`` lose ``b_V``, and
                            ``attn.hook_result`` loses ``b_V @ W_O`` per head (moved into
                            ``b_O``, exact because attention rows sum to one);
                            ``hook_attn_out`` is unchanged. No-op without value biases.
center_unembed              ``unembed.hook_out``, the logits: they shift by a
                            per-position constant (log-probs unchanged).
==========================  ==========================================================

So a residual-stream SAE trained on an unprocessed Llama-family model (SmolLM2, Llama)
works on a processed one unchanged, while on GPT-2, GPT-Neo or Pythia
``center_writing_weights`` removes the mean of every residual activation the SAE sees.
``check_sae_processing`` warns exactly when a mismatched step changes the SAE's site.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Int

from ..hooks import HookPoint
from ..progress import tqdm
from ..protocol import HookedModel
from ..utils import next_token_mask
from .core import PROCESSING_STEPS, SAE, site_width

_RESIDUAL_SITES = (
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_mlp_in",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "attn.hook_result",
)


def sites_changed_by(step: str, normalization_type: str) -> dict[str, str]:
    """Hook-name suffixes whose values ``step`` changes on a model with this norm, and how.

    ``normalization_type`` is the model's (``LN``/``LNPre`` or ``RMS``/``RMSPre``). See the
    module docstring for the algebra.
    """
    if step not in PROCESSING_STEPS:
        raise ValueError(f"unknown processing step {step!r}; known: {PROCESSING_STEPS}")
    layer_norm = normalization_type.startswith("LN")
    if step == "center_writing_weights":
        return {s: "centred: x - mean(x) over d_model" for s in _RESIDUAL_SITES} if layer_norm else {}
    if step == "fold_value_biases":
        return {
            "attn.hook_v": "b_V removed",
            "attn.hook_z": "b_V removed",
            "attn.hook_result": "b_V @ W_O removed per head (moved into b_O)",
        }
    if step == "fold_ln":
        return {"unembed.hook_in": "the final norm's weight (and bias) moved into W_U (and b_U)"}
    return {"unembed.hook_out": "logits shifted by a per-position constant (log-probs unchanged)"}  # center_unembed


# Processing check ----------------------------------------------------------------------
def check_sae_processing(model: HookedModel, sae: SAE, warn: bool = True) -> list[str]:
    """Problems from a mismatch between the model's weight processing and the SAE's.

    One message per processing step that one side has and the other lacks *and* that
    changes the values at the SAE's site (see the module docstring); warned unless
    ``warn=False``. Nothing when ``sae`` does not say how its model was loaded.
    """
    expected = sae.cfg.expected_processing
    if expected is None:
        return []
    applied = tuple(model.cfg.processing)
    problems = []
    for step in PROCESSING_STEPS:
        if (step in expected) == (step in applied):
            continue
        changed = sites_changed_by(step, model.cfg.normalization_type)
        how = next((how for suffix, how in changed.items() if sae.cfg.hook_name.endswith(suffix)), None)
        if how is None:
            continue
        trained = "with" if step in expected else "without"
        problems.append(
            f"the SAE on {sae.cfg.hook_name} was trained on a model loaded {trained} {step}, but this model was "
            f"loaded {'with' if step in applied else 'without'} it, which changes this site ({how}). Load the model "
            f"as the SAE expects: HookedTransformer.from_pretrained_no_processing(name, "
            f"**{sae.cfg.model_from_pretrained_kwargs})"
        )
    if warn:
        for p in problems:
            warnings.warn(p, stacklevel=3)
    return problems


# Splicing -----------------------------------------------------------------------------
def _to_sae_shape(act: torch.Tensor, d_in: int, name: str) -> torch.Tensor:
    if act.shape[-1] == d_in:
        return act
    if act.ndim >= 2 and act.shape[-2] * act.shape[-1] == d_in:  # hook_z SAEs: heads flattened
        return act.flatten(-2)
    raise ValueError(
        f"the SAE has d_in={d_in}, but {name} has shape {tuple(act.shape)}; was it trained on another site or model?"
    )


Positions = slice | Sequence[int] | None


def _chosen(n_pos: int, positions: Positions, device: Any) -> torch.Tensor:
    """A [pos] bool mask of the chosen positions (all when None)."""
    chosen = torch.zeros(n_pos, dtype=torch.bool, device=device)
    index = positions if positions is None or isinstance(positions, slice) else list(positions)
    chosen[slice(None) if index is None else index] = True
    return chosen


def sae_splice_hook(sae: SAE, positions: Positions = None):
    """A hook function replacing the activation by ``sae(activation)`` (same shape and
    dtype), at ``positions`` of each forward's input (all when None)."""

    def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        chosen = act if positions is None else act[:, positions]
        # The SAE sits where it was made; a model placed over devices runs this block elsewhere.
        sae_in = _to_sae_shape(chosen, sae.cfg.d_in, hook.name).to(sae.W_enc.device)
        out = sae(sae_in).reshape(chosen.shape).to(act.device, act.dtype)
        if positions is None:
            return out
        act = act.clone()
        act[:, positions] = out
        return act

    return hook


def check_sae_fits(model: HookedModel, sae: SAE) -> str:
    """The model's site for ``sae`` (one name), after checking that it exists (closest names
    otherwise) and that its per-position width is the SAE's ``d_in``. Split over processes,
    every rank calls it alike and passes or fails alike (``site_width`` shares the width)."""
    names = model.resolve_hook_names(sae.cfg.hook_name)
    if len(names) != 1:
        raise ValueError(f"the SAE's hook_name {sae.cfg.hook_name!r} names {len(names)} sites; it must name one")
    width = site_width(model, names[0])
    if width != sae.cfg.d_in:
        raise ValueError(
            f"the SAE has d_in={sae.cfg.d_in}, but {names[0]} of this model has width {width}"
            f" (model {model.cfg.model_name or '?'}; the SAE was trained on "
            f"{sae.cfg.model_name or 'an unnamed model'}): was it trained on another site or model?"
        )
    return names[0]


@contextlib.contextmanager
def mounted(model: HookedModel, sae: SAE, site: str) -> Iterator[None]:
    """``sae``'s hook points as sites of ``model`` while the block runs: ``<site>.hook_sae_acts_post`` & co.

    Split over processes, they belong to ``site``'s block: they fire on the rank that runs it."""
    added = {f"{site}.{name}": hp for name, hp in sae.hook_dict.items()}
    clash = sorted(set(added) & set(model.hook_dict))
    if clash:
        raise ValueError(f"an SAE is already spliced at {site} ({clash[0]} exists): splice one SAE per site")
    for name, hp in added.items():
        hp.name = name
        model.hook_dict[name] = hp
    try:
        yield
    finally:
        for name, hp in added.items():
            model.hook_dict.pop(name, None)
            hp.name = name[len(site) + 1 :]


@contextlib.contextmanager
def splice_sae(
    model: HookedModel, sae: SAE, use_error_term: bool | None = None, positions: Positions = None, check: bool = True
) -> Iterator[SAE]:
    """Every forward in the block runs with ``sae.cfg.hook_name`` replaced by its
    reconstruction (plus the error term if ``use_error_term``; default: the SAE's own
    setting), at ``positions`` (default all; ``slice(1, None)`` leaves the first token
    alone, e.g. an attention sink the SAE was not trained on). The SAE's hook points are
    the model's sites ``<site>.hook_sae_*`` in the block. Checks first that the SAE fits
    the site (``check_sae_fits``) and the weight processing (``check_sae_processing``),
    unless ``check=False``.

    Split over processes (``pipeline_ranks``): every rank enters it with the same SAE; the
    rank that runs the site splices (its forward's output and ``run_with_cache``'s cache, the
    SAE's sites included, are rank 0's as always). With ``check=False`` an SAE that does not
    fit fails only on the site's rank (the others raise ``RankFailedError`` when it stops)."""
    if check:
        site = check_sae_fits(model, sae)
        check_sae_processing(model, sae)
    else:
        site = model.resolve_hook_names(sae.cfg.hook_name)[0]
    previous = sae.use_error_term
    if use_error_term is not None:
        sae.use_error_term = use_error_term
    try:
        with mounted(model, sae, site), model.hooks(fwd_hooks=[(site, sae_splice_hook(sae, positions))]):
            yield sae
    finally:
        sae.use_error_term = previous


def feature_direction(sae: SAE, feature: int, model: HookedModel | None = None) -> torch.Tensor:
    """``sae``'s decoder row ``W_dec[feature]`` in the site's per-position shape ([head, d_head]
    for hook_z SAEs when ``model`` is given), in the model's units: divided by the input
    scale of ``expected_average_only_in``."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(f"feature {feature} is out of range: this SAE has d_sae={sae.cfg.d_sae}")
    v = sae.W_dec[feature].detach()
    if sae.cfg.normalize_activations == "expected_average_only_in" and sae.cfg.norm_scaling_factor:
        v = v / sae.cfg.norm_scaling_factor
    if model is not None and sae.cfg.reshape_activations == "hook_z":
        v = v.reshape(model.cfg.n_heads, -1)
    return v


def steer_with_feature(model: HookedModel, sae: SAE, feature: int, coeff: float = 1.0, positions: Any = None):
    """A context manager adding ``coeff * W_dec[feature]`` of ``sae`` at its site in every forward of ``model``
    (generation included); ``positions`` as in ``transformer_hooks.interventions.steering.steering``.

    Split over processes, every rank enters it with the same SAE (``steering`` shares rank 0's direction)."""
    from ..interventions.steering import steering

    site = model.resolve_hook_names(sae.cfg.hook_name)[0]
    return steering(model, site, feature_direction(sae, feature, model).to(model.dtype), coeff, positions)


# Evaluation ---------------------------------------------------------------------------
@dataclass
class SAEEvaluation:
    """Reconstruction and downstream metrics, over the real (non-padding) tokens.

    mse: mean over tokens of ||x - x_hat||^2 (summed over d_in): the reconstruction loss
    ``train_sae`` minimises, in squared units of the site's activations.
    mse_per_element: the same divided by d_in (mean over tokens and d_in). l0: mean number of active features
    per token. explained_variance: 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2.
    dead_fraction / dense_fraction: features active on no token / on more than
    ``dense_threshold`` of the tokens.
    ce_loss_recovered: (zero_ablation_loss - spliced_loss) / (zero_ablation_loss - clean_loss):
    1 when splicing costs nothing, 0 when it is as bad as zeroing the site.
    ce_loss_recovered_vs_mean: the same against replacing the site by its mean over the
    evaluation tokens (a harder baseline than zero).
    """

    mse: float
    l0: float
    explained_variance: float
    clean_loss: float
    spliced_loss: float
    zero_ablation_loss: float
    ce_loss_recovered: float
    n_tokens: int
    mean_ablation_loss: float = math.nan
    ce_loss_recovered_vs_mean: float = math.nan
    dead_fraction: float = math.nan
    dense_fraction: float = math.nan
    mse_per_element: float = math.nan

    def __str__(self) -> str:
        return "\n".join(
            (f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}") + f"  {_UNITS.get(k, '')}".rstrip()
            for k, v in asdict(self).items()
        )


_UNITS = {
    "mse": "(squared activation units per token: mean over tokens of ||x - x_hat||^2, as in training)",
    "mse_per_element": "(squared activation units: mse / d_in)",
    "l0": "(active features per token)",
    "explained_variance": "(fraction of the variance of x, 1 = perfect)",
    "clean_loss": "(nats per token, next-token cross-entropy)",
    "spliced_loss": "(nats per token, with the SAE's reconstruction in place of the site)",
    "zero_ablation_loss": "(nats per token, the site set to 0)",
    "mean_ablation_loss": "(nats per token, the site set to its mean)",
    "ce_loss_recovered": "(fraction: 1 = splicing costs nothing, 0 = as bad as zero ablation)",
    "ce_loss_recovered_vs_mean": "(fraction, against mean ablation)",
    "n_tokens": "(tokens evaluated)",
    "dead_fraction": "(fraction of features never active)",
    "dense_fraction": "(fraction of features active on more than the dense threshold of tokens)",
}


def _replace_hook(positions: Positions, value: torch.Tensor | None):
    """Set the chosen positions to ``value`` (per-position shape; None: zero)."""

    def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        keep = ~_chosen(act.shape[1], positions, act.device).reshape(-1, *[1] * (act.ndim - 2))
        fill = 0 if value is None else value.reshape(act.shape[2:]).to(act.dtype)
        return torch.where(keep, act, fill) if value is not None else act * keep

    return hook


def _loss_sum(nll: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum and count of next-token losses [batch, pos-1] over predictions of real tokens."""
    if mask is None:
        return float(nll.sum()), nll.numel()
    return float(nll.sum()), int(next_token_mask(mask).sum())  # the model's per-token loss is 0 where masked


def _recovered(baseline: float, spliced: float, clean: float) -> float:
    return (baseline - spliced) / (baseline - clean) if baseline != clean else math.nan


@torch.no_grad()
def evaluate_sae(
    model: HookedModel,
    sae: SAE,
    tokens: Int[torch.Tensor, "batch pos"] | str | list[str],
    batch_size: int = 8,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    positions: Positions = None,
    check: bool = True,
    dense_threshold: float = 0.1,
) -> SAEEvaluation | None:
    """Splice ``sae`` into ``model`` on ``tokens`` (or strings; padded lists count only
    their real tokens) and report reconstruction MSE, L0, explained variance, dead and
    dense feature fractions, and the next-token loss clean, spliced, with the site zeroed
    and with the site set to its mean over these tokens. ``positions``: splice, ablate and
    measure the reconstruction only there (e.g. ``slice(1, None)``: not the first token);
    the losses are over every prediction. Two passes: the first takes the mean.

    ``batch_size``: rows per forward; ``attention_mask``: for padded token rows; ``check``:
    check the SAE against the model first (as ``splice_sae``); ``dense_threshold``: a feature
    is dense when it fires on more than this fraction of the tokens.

    Split over processes (``pipeline_ranks``): every rank calls it alike, with the same SAE;
    rank 0 measures the cache it gets and the losses, the site's mean goes to the rank that
    runs the site, and rank 0 returns one process's evaluation while the other ranks return
    None."""
    if check:
        site = check_sae_fits(model, sae)
        check_sae_processing(model, sae)
    else:
        site = model.resolve_hook_names(sae.cfg.hook_name)[0]
    token_ids, mask = model.tokens_and_mask(tokens, attention_mask=attention_mask)
    batches = [
        (token_ids[s : s + batch_size], mask[s : s + batch_size] if mask is not None else None)
        for s in range(0, token_ids.shape[0], batch_size)
    ]
    here = model.blocks.gets_output  # split over processes: rank 0 gets the cache and the losses
    n = n_pred = 0
    sq_err = l0 = clean = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.device)
    sum_site: torch.Tensor | None = None
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=sae.device)
    sum_sq = 0.0
    loss_kwargs: dict[str, Any] = dict(return_type="loss", loss_per_token=True)
    bar = tqdm(total=2 * len(batches), desc="evaluating SAE", leave=False, delay=1.0)
    for tok, m in batches:
        nll, cache = model.run_with_cache(tok, attention_mask=m, names_filter=site, **loss_kwargs)
        bar.update()
        if not here:
            continue
        act = cache[site]
        measured = _chosen(tok.shape[1], positions, act.device)[None] & (
            torch.ones(tok.shape, dtype=torch.bool, device=act.device) if m is None else m.bool()
        )
        rows = act[measured]  # [tokens, *site]
        sum_site = rows.double().sum(0) + (0 if sum_site is None else sum_site)
        x = _to_sae_shape(rows, sae.cfg.d_in, site).to(sae.W_enc.dtype)
        feats = sae.encode(x)
        sq_err += float((x - sae.decode(feats).reshape(x.shape)).double().pow(2).sum())
        active = feats > 0
        l0 += float(active.sum())
        fired += active.sum(0).double()
        n += x.shape[0]
        sum_x += x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
        batch_clean, batch_pred = _loss_sum(nll, m)
        clean, n_pred = clean + batch_clean, n_pred + batch_pred
    mean_site = None
    if here:
        assert sum_site is not None  # at least one batch (tokens_and_mask gives one prompt or more)
        mean_site = {site: (sum_site / max(n, 1)).to(model.dtype)}
    mean_value = model.blocks.to_sites(mean_site)[site]  # on the rank that runs the site
    spliced = zero = mean = 0.0
    for tok, m in batches:
        with splice_sae(model, sae, use_error_term=False, positions=positions, check=False):
            losses = [model(tok, attention_mask=m, **loss_kwargs)]
        with model.hooks(fwd_hooks=[(site, _replace_hook(positions, None))]):
            losses.append(model(tok, attention_mask=m, **loss_kwargs))
        with model.hooks(fwd_hooks=[(site, _replace_hook(positions, mean_value))]):
            losses.append(model(tok, attention_mask=m, **loss_kwargs))
        bar.update()
        if here:
            sums = zip((spliced, zero, mean), losses, strict=True)
            spliced, zero, mean = (total + _loss_sum(nll, m)[0] for total, nll in sums)
    bar.close()
    if not here:
        return None
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n  # sum ||x - mean||^2
    clean, spliced, zero, mean = (v / max(n_pred, 1) for v in (clean, spliced, zero, mean))
    freq = fired / max(n, 1)
    return SAEEvaluation(
        mse=sq_err / n,
        mse_per_element=sq_err / (n * sae.cfg.d_in),
        l0=l0 / n,
        explained_variance=1 - sq_err / total_var if total_var > 0 else math.nan,
        clean_loss=clean,
        spliced_loss=spliced,
        zero_ablation_loss=zero,
        ce_loss_recovered=_recovered(zero, spliced, clean),
        n_tokens=n,
        mean_ablation_loss=mean,
        ce_loss_recovered_vs_mean=_recovered(mean, spliced, clean),
        dead_fraction=float((freq == 0).double().mean()),
        dense_fraction=float((freq > dense_threshold).double().mean()),
    )
