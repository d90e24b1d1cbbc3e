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
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from torch.nn.utils.parametrizations import orthogonal
from tqdm.auto import tqdm

from .hooks import HookPoint

if TYPE_CHECKING:
    from .model import HookedTransformer


PositionIndex = int | Sequence[int] | torch.Tensor


class RotatedSubspaceInterchange(nn.Module):
    """Interchange of the first ``k`` coordinates of a learned orthonormal basis of R^d.

    ``low_rank=False``: a full rotation ``R`` [d, d] is learned (``R[:, :k]`` spans the
    interchanged subspace). ``low_rank=True``: only those ``k`` basis vectors are, as a
    [d, k] matrix with orthonormal columns; the rest of the basis is implicit, the
    intervention is the same, and for ``k << d`` it is much cheaper (the orthogonal
    parametrization of a [d, d] matrix costs a d x d matrix exponential per step).
    ``orthogonal_map`` is passed to ``torch.nn.utils.parametrizations.orthogonal``
    (``"matrix_exp"``, ``"cayley"``, ``"householder"``; default: torch's choice).
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
        new = intervention(act[rows, b_pos], source_act[rows, s_pos].to(act.dtype))
        out = act.clone()
        out[rows, b_pos] = new.to(act.dtype)
        return out

    return hook


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
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
    model: HookedTransformer, site: str, source_tokens: Int[torch.Tensor, "batch pos"]
) -> torch.Tensor:
    """The site's activation on the source prompts (no graph: the model is frozen)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens, names_filter=site)
    return cache[site]


_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def resume_point(model: HookedTransformer, site: str) -> tuple[int, str] | None:
    """Where a forward can start from a cached value of ``site``: ``(start_at_layer, the
    hook name that value passes through there)``, for residual-stream sites; else None.

    ``blocks.L.hook_resid_post`` is the stream entering block L+1, so a run resumed at L+1
    sees it at ``blocks.{L+1}.hook_resid_pre``.
    """
    match = _RESID.match(site)
    if match is None:
        return None
    layer = int(match.group(1)) + (match.group(2) == "post")
    return (layer, f"blocks.{layer}.hook_resid_pre") if layer < model.cfg.n_layers else None


def interchange_logits(
    model: HookedTransformer,
    intervention: nn.Module,
    site: str,
    base_tokens: Int[torch.Tensor, "batch pos"],
    source_act: torch.Tensor,
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
    base_act: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch d_vocab"]:
    """Next-token logits of the intervened base run, at its last position.

    With ``base_act`` (the base run's cached value of a residual-stream ``site``), the run
    resumes from it (``start_at_layer``) instead of recomputing the layers below the site:
    the same logits, computed with the same hook, for a fraction of the cost.
    """
    hook = interchange_hook(intervention, source_act, base_pos, source_pos)
    resume = resume_point(model, site) if base_act is not None else None
    if resume is None:
        return model.run_with_hooks(base_tokens, fwd_hooks=[(site, hook)])[:, -1]
    start, hook_name = resume
    return model.run_with_hooks(base_act, start_at_layer=start, fwd_hooks=[(hook_name, hook)])[:, -1]


def train_das(
    model: HookedTransformer,
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
) -> list[float]:
    """Fit the rotation so the intervened base run predicts ``target_tokens`` (cross-entropy
    at the last position), with the model frozen. Returns the loss per step.

    The source activations are computed once; so are the base's when the site is in the
    residual stream (each step then runs only the blocks above the site).
    """
    model.resolve_hook_names(site)
    source_act = source_activations(model, site, source_tokens)
    base_act = source_activations(model, site, base_tokens) if resume_point(model, site) else None
    target_tokens = torch.as_tensor(target_tokens, device=base_tokens.device)
    n = base_tokens.shape[0]
    batch_size = batch_size or n
    opt = torch.optim.Adam(intervention.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    base_pos, source_pos = _per_row(base_pos, n), _per_row(source_pos, n)
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
            )
            loss = F.cross_entropy(logits.float(), target_tokens[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate_das(
    model: HookedTransformer,
    intervention: nn.Module,
    site: str,
    base_tokens: torch.Tensor,
    source_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
) -> dict[str, float]:
    """Loss and interchange accuracy (argmax == target) of the intervened base runs."""
    source_act = source_activations(model, site, source_tokens)
    logits = interchange_logits(model, intervention, site, base_tokens, source_act, base_pos, source_pos)
    target_tokens = torch.as_tensor(target_tokens, device=logits.device)
    return {
        "loss": float(F.cross_entropy(logits.float(), target_tokens)),
        "accuracy": float((logits.argmax(-1) == target_tokens).float().mean()),
    }
