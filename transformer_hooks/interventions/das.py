"""Distributed alignment search (DAS): find a subspace of a site whose value, moved from a
source run into a base run, carries a causal variable (Geiger et al. 2023).

A learned rotation ``R`` (orthogonal, [d, d]; its columns are the new basis) maps the
site into new coordinates; an interchange intervention swaps the first ``k`` of them:

    rb, rs = base @ R, source @ R                              [..., d]
    intervened = concat(rs[..., :k], rb[..., k:]) @ R^T
               = base + (source - base) @ Q @ Q^T               Q = R[:, :k]  [d, k]

Only ``Q`` matters, so ``low_rank=True`` learns just those k orthonormal columns (cheap
for k << d; the full parametrization costs a d x d matrix exponential per step).

Training keeps the model frozen (no parameter requires grad) and fits ``R`` so that the
base run, intervened at a site and position, predicts the source run's answer: for
"The capital of France is" (base) and "The capital of Brazil is" (source) the target is
" Bras..." — the subspace found holds "which country". Gradients reach ``R`` through the
hook (hooks are ordinary autograd ops); ``torch.nn.utils.parametrizations.orthogonal``
keeps ``R`` orthogonal at every step.

With ``k = d`` the intervention is the source activation itself (``R R^T = I``), i.e.
patching the whole site at that position: a check that the plumbing is right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from .. import sites
from ..hooks import HookPoint
from ..progress import tqdm
from ..protocol import HookedModel

PositionIndex = int | Sequence[int] | torch.Tensor
M = TypeVar("M", nn.Module, HookedModel)  # frozen() reads parameters() only


class RotatedSubspaceInterchange(nn.Module):
    """Interchange of the first ``k`` coordinates of a learned orthonormal basis of R^d.

    ``low_rank=False``: a full rotation ``R`` [d, d] is learned (``R[:, :k]`` spans the
    interchanged subspace). ``low_rank=True``: only those ``k`` basis vectors are, as a
    [d, k] matrix with orthonormal columns; the rest of the basis is implicit, the
    intervention is the same, and for ``k << d`` it is much cheaper (the orthogonal
    parametrization of a [d, d] matrix costs a d x d matrix exponential per step).
    ``orthogonal_map`` is passed to ``torch.nn.utils.parametrizations.orthogonal``
    (``"matrix_exp"``, ``"cayley"``, ``"householder"``; default: torch's choice).
    ``d``: the site's width; ``dtype``: float32 or float64 (the rotation's; on a half-precision
    model the interchange runs in it and is cast back); ``device``: where it lives;
    ``seed``: its initialisation.
    """

    def __init__(
        self,
        d: int,
        k: int,
        low_rank: bool = False,
        orthogonal_map: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < k <= d:
            raise ValueError(f"k={k} must be between 1 and d={d}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"dtype={dtype}: the rotation must be float32 or float64 (torch's orthogonal parametrization "
                f"is not implemented or drifts in half precision). Keep the default float32: on a "
                f"{dtype} model the interchange runs in float32 and its result is cast back to {dtype}."
            )
        self.d, self.k, self.low_rank = d, k, low_rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # nn.Linear(d, n).weight is [n, d]; its rows are the learned basis vectors.
            self.rotation = orthogonal(
                nn.Linear(d, k if low_rank else d, bias=False, dtype=dtype, device=device),
                orthogonal_map=orthogonal_map,
            )

    @property
    def R(self) -> Float[torch.Tensor, "d d"]:
        """The rotation: its columns are the new basis; the first k span the interchanged subspace."""
        if self.low_rank:
            raise ValueError("a low-rank interchange learns only the k basis vectors of its subspace: use .basis")
        return self.rotation.weight.T  # type: ignore[return-value]  # a parametrized nn.Linear

    @property
    def basis(self) -> Float[torch.Tensor, "d k"]:
        """Orthonormal columns spanning the interchanged subspace."""
        return self.rotation.weight[: self.k].T  # type: ignore[index]  # a parametrized nn.Linear

    def forward(
        self, base: Float[torch.Tensor, "... d"], source: Float[torch.Tensor, "... d"]
    ) -> Float[torch.Tensor, "... d"]:
        """Rotate, take the first k coordinates from the source, rotate back; with Q the
        first k columns of R this is ``base + (source - base) @ Q @ Q^T``."""
        Q = self.basis
        return base + ((source - base) @ Q) @ Q.T


def _per_row(pos: PositionIndex, batch: int, device: Any = None) -> torch.Tensor:
    """One position per batch row, as a LongTensor [batch]."""
    pos = torch.as_tensor(pos, dtype=torch.long, device=device)
    if pos.ndim == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise ValueError(f"positions must be one int or one per batch row ({batch}), got shape {tuple(pos.shape)}")
    return pos


def _checked(pos: torch.Tensor, n_pos: int) -> torch.Tensor:
    if bool(((pos < -n_pos) | (pos >= n_pos)).any()):
        raise IndexError(f"positions {pos.tolist()} are out of range for {n_pos} positions")
    return pos % n_pos


def last_real(mask: torch.Tensor | None, batch: int, n_pos: int, device: Any = None) -> torch.Tensor:
    """Each row's last real (unpadded) position [batch] by ``mask`` [batch, n_pos], on ``device``:
    ``n_pos - 1`` without a mask."""
    if mask is None:
        return torch.full((batch,), n_pos - 1, dtype=torch.long, device=device)
    idx = torch.arange(n_pos, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, -1).amax(-1).to(device)


def _positions(pos: PositionIndex, mask: torch.Tensor | None, batch: int, n_pos: int) -> PositionIndex:
    """With a padding mask, negative positions count back from each row's last real token
    (``-1`` is the last real token, on either padding side); without one, they pass through."""
    if mask is None:
        return pos
    rows = _per_row(pos, batch, mask.device)
    end = last_real(mask, batch, n_pos, mask.device)
    return torch.where(rows < 0, end + 1 + rows, rows)


def _tokens_and_mask(model: HookedModel, tokens: Any, mask: Any, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens [batch, pos] and a padding mask (None when nothing is padded); strings are left-padded."""
    toks, mask = model.tokens_and_mask(tokens, padding_side="left", attention_mask=mask)
    return toks, mask


def interchange_hook(
    intervention: nn.Module,
    source_act: Float[torch.Tensor, "batch src_pos d"],
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
):
    """A hook function: at ``base_pos`` of each row, the site becomes
    ``intervention(base, source_act[row, source_pos])``; other positions are untouched."""

    def hook(act: Float[torch.Tensor, "batch pos d"], hook: HookPoint) -> torch.Tensor:
        batch = act.shape[0]
        if source_act.shape[0] != batch or source_act.shape[2:] != act.shape[2:]:
            raise ValueError(
                f"source activations {tuple(source_act.shape)} do not match {hook.name} "
                f"{tuple(act.shape)} (batch and per-position shape must agree)"
            )
        rows = torch.arange(batch, device=act.device)
        b_pos = _checked(_per_row(base_pos, batch, act.device), act.shape[1])
        s_pos = _checked(_per_row(source_pos, batch, act.device), source_act.shape[1])
        # The rotation runs in its own dtype (float32 by default, also on a bfloat16 model: an
        # orthogonal parametrization in bfloat16 drifts), and its result returns in the model's.
        dtype = next(intervention.parameters(), act).dtype
        new = intervention(act[rows, b_pos].to(dtype), source_act[rows, s_pos].to(dtype))
        out = act.clone()
        out[rows, b_pos] = new.to(act.dtype)
        return out

    return hook


@contextlib.contextmanager
def frozen(model: M) -> Iterator[M]:
    """No parameter of ``model`` requires grad inside the block; the flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def source_activations(
    model: HookedModel,
    site: str,
    source_tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The activation of ``site`` on ``source_tokens`` (with their ``attention_mask``), without a
    graph (the model is frozen)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens, names_filter=site, attention_mask=attention_mask)
    return cache[site]


def resume_point(model: HookedModel, site: str) -> tuple[int, str] | None:
    """Where a forward of ``model`` can start from a cached value of ``site``: ``(start_at_layer, the
    hook name that value passes through there)``, for residual-stream sites; else None.

    ``blocks.L.hook_resid_post`` is the stream entering block L+1, so a run resumed at L+1
    sees it at ``blocks.{L+1}.hook_resid_pre``.
    """
    layer, rel = sites.split_name(site)
    if layer is None or rel not in ("hook_resid_pre", "hook_resid_post"):
        return None
    layer += rel == "hook_resid_post"
    return (layer, f"blocks.{layer}.hook_resid_pre") if layer < model.cfg.n_layers else None


def interchange_logits(
    model: HookedModel,
    intervention: nn.Module,
    site: str,
    base_tokens: Int[torch.Tensor, "batch pos"],
    source_act: torch.Tensor,
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
    base_act: torch.Tensor | None = None,
    base_mask: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch d_vocab"]:
    """Next-token logits of the intervened base run, at its last (real) position.

    With ``base_act`` (the base run's cached value of a residual-stream ``site``), the run
    resumes from it (``start_at_layer``) instead of recomputing the layers below the site:
    the same logits, computed with the same hook, for a fraction of the cost. ``base_mask``:
    the base prompts' padding mask (1 real, 0 padding); positions are then as ``train_das``'s.
    ``intervention`` replaces ``site`` at ``base_pos`` of ``base_tokens`` with the source
    activation ``source_act`` at ``source_pos`` (``model``, positions as in ``train_das``).
    """
    batch, n_pos = base_tokens.shape
    base_pos = _positions(base_pos, base_mask, batch, n_pos)
    hook = interchange_hook(intervention, source_act, base_pos, source_pos)
    resume = resume_point(model, site) if base_act is not None else None
    if resume is None:
        logits = model.run_with_hooks(base_tokens, attention_mask=base_mask, fwd_hooks=[(site, hook)])
    else:
        start, hook_name = resume
        logits = model.run_with_hooks(
            base_act, start_at_layer=start, attention_mask=base_mask, fwd_hooks=[(hook_name, hook)]
        )
    rows = torch.arange(batch, device=logits.device)
    return logits[rows, last_real(base_mask, batch, n_pos, logits.device)]


def train_das(
    model: HookedModel,
    intervention: nn.Module,
    site: str,
    base_tokens: Int[torch.Tensor, "batch pos"],
    source_tokens: Int[torch.Tensor, "batch src_pos"],
    target_tokens: Int[torch.Tensor, " batch"],
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
    steps: int = 100,
    lr: float = 1e-2,
    batch_size: int | None = None,
    seed: int = 0,
    base_attention_mask: torch.Tensor | None = None,
    source_attention_mask: torch.Tensor | None = None,
) -> list[float]:
    """Fit the rotation so the intervened base run predicts ``target_tokens`` (cross-entropy
    at the last real position), with the model frozen. Returns the loss per step.

    Prompts of different lengths: pass lists of strings (left-padded here) or padded tokens
    with ``base_attention_mask`` / ``source_attention_mask`` (1 real, 0 padding; either side).
    With a mask, a negative position counts back from each row's last real token.

    The source activations are computed once; so are the base's when the site is in the
    residual stream (each step then runs only the blocks above the site).

    Args:
        model: the frozen model.
        intervention: the ``RotatedSubspaceInterchange`` (or any module of that call) being fit.
        site: the hook name intervened on.
        base_tokens: the base prompts.
        source_tokens: the source prompts, one per base prompt.
        target_tokens: the token each intervened base run should predict [batch].
        base_pos: the base position(s) intervened on (one int, or one per row).
        source_pos: the source position(s) read.
        steps: optimisation steps (Adam).
        lr: the learning rate.
        batch_size: prompts per step (None: all).
        seed: the seed of the batches' sampling.
        base_attention_mask: the base tokens' padding mask.
        source_attention_mask: the source tokens' padding mask.
    """
    model.resolve_hook_names(site)
    base_tokens, base_mask = _tokens_and_mask(model, base_tokens, base_attention_mask, "base")
    source_tokens, source_mask = _tokens_and_mask(model, source_tokens, source_attention_mask, "source")
    source_act = source_activations(model, site, source_tokens, source_mask)
    base_act = source_activations(model, site, base_tokens, base_mask) if resume_point(model, site) else None
    target_tokens = torch.as_tensor(target_tokens, device=base_tokens.device)
    n = base_tokens.shape[0]
    batch_size = batch_size or n
    opt = torch.optim.Adam(intervention.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    base_pos = _per_row(_positions(base_pos, base_mask, n, base_tokens.shape[1]), n, base_tokens.device)
    source_pos = _per_row(_positions(source_pos, source_mask, n, source_tokens.shape[1]), n, base_tokens.device)
    losses = []
    with frozen(model):
        for _ in tqdm(range(steps), desc="training DAS rotation", leave=False, delay=1.0):
            idx = torch.randperm(n, generator=gen)[:batch_size]
            logits = interchange_logits(
                model,
                intervention,
                site,
                base_tokens[idx],
                source_act[idx],
                base_pos[idx],
                source_pos[idx],
                base_act=None if base_act is None else base_act[idx],
                base_mask=None if base_mask is None else base_mask[idx],
            )
            loss = F.cross_entropy(logits.float(), target_tokens[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate_das(
    model: HookedModel,
    intervention: nn.Module,
    site: str,
    base_tokens: torch.Tensor,
    source_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
    base_attention_mask: torch.Tensor | None = None,
    source_attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Loss and interchange accuracy (argmax == target) of the intervened base runs.

    ``model``, ``intervention``, ``site``, ``base_tokens``, ``source_tokens``, ``target_tokens``,
    ``base_pos``, ``source_pos``, ``base_attention_mask`` and ``source_attention_mask`` as in ``train_das``.
    """
    base_tokens, base_mask = _tokens_and_mask(model, base_tokens, base_attention_mask, "base")
    source_tokens, source_mask = _tokens_and_mask(model, source_tokens, source_attention_mask, "source")
    source_act = source_activations(model, site, source_tokens, source_mask)
    source_pos = _positions(source_pos, source_mask, *source_tokens.shape)
    logits = interchange_logits(
        model, intervention, site, base_tokens, source_act, base_pos, source_pos, base_mask=base_mask
    )
    target_tokens = torch.as_tensor(target_tokens, device=logits.device)
    return {
        "loss": float(F.cross_entropy(logits.float(), target_tokens)),
        "accuracy": float((logits.argmax(-1) == target_tokens).float().mean()),
    }
