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

Split over processes (``pipeline_ranks``): every rank calls these functions alike, each with
an intervention built alike (the same ``seed``). The activations read once (``source_activations``:
rank 0's, like ``run_with_cache``) go to the rank that runs the intervention's hook
(``model.blocks.to_sites``; for a residual site the resumed run's input goes to the rank that
runs the block above it); the loss is computed on rank 0 and its gradient reaches the rotation
there across the ranks (``model.blocks.grad``). Only that rank's rotation is trained; at the end
of ``train_das`` its state (parameters and buffers) is copied to every rank's intervention, so
every rank ends with the one-process rotation. One exchange at the end rather than the
gradient at every step (which would keep every rank's Adam in step): the gradient of a full
rotation is d x d per step, and no other rank reads the rotation while it trains. Results
(losses, metrics, logits) are rank 0's; the other ranks get None.
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


def _one_site(model: HookedModel, site: str) -> str:
    """``site``, checked to be one hook name of ``model`` (the same error on every rank of a split model)."""
    if model.resolve_hook_names(site) != [site]:
        raise ValueError(f"site={site!r} selects several hook names: DAS intervenes on one site, give its full name")
    return site


def source_activations(
    model: HookedModel,
    site: str,
    source_tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The activation of ``site`` on ``source_tokens`` (with their ``attention_mask``), without a
    graph (the model is frozen).

    Split over processes (``pipeline_ranks``): every rank calls it; rank 0 gets the activation (as
    ``run_with_cache``'s cache), the other ranks None.
    """
    _one_site(model, site)
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens, names_filter=site, attention_mask=attention_mask)
    return None if cache is None else cache[site]


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


class _AtHook:
    """Where the intervention runs: its hook name, the layer a resumed run starts at (None: the
    run starts from the tokens), and the source (and resumed run's base) activations on the
    rank that runs that hook (a meta tensor of their shape elsewhere; on one process, as given)."""

    def __init__(
        self, model: HookedModel, site: str, source_act: torch.Tensor | None, base_act: torch.Tensor | None
    ) -> None:
        here = model.blocks.gets_output
        if here and source_act is None:
            raise ValueError("source_act is required (on a model split over processes: on rank 0)")
        resume = resume_point(model, site)
        self.hook_name, self.start, self.base_act = site, None, None
        if resume is not None:
            # rank 0 decides (it has the activations): an empty dict, shared alike, means no resumed run
            given = ({resume[1]: base_act} if base_act is not None else {}) if here else None
            placed = model.blocks.to_sites(given)  # onto the rank running block `start` (stop_at_layer's rule)
            if placed:
                (self.start, self.hook_name), self.base_act = resume, placed[resume[1]]
        given_source = {self.hook_name: source_act} if source_act is not None else None
        self.source_act = model.blocks.to_sites(given_source)[self.hook_name]


def _check(
    intervention: nn.Module,
    at: _AtHook,
    n_rows: int,
    n_pos: int,
    base_pos: torch.Tensor,
    source_pos: torch.Tensor,
) -> None:
    """The errors the hook would raise on the rank that runs it, raised on every rank before the
    forward (on a model split over processes, the other ranks would otherwise wait for it)."""
    src = at.source_act
    if src.shape[0] != n_rows:
        raise ValueError(f"source activations {tuple(src.shape)} do not match the {n_rows} base prompts (batch)")
    d = getattr(intervention, "d", None)
    if isinstance(d, int) and src.shape[-1] != d:
        raise ValueError(
            f"the intervention is {d} wide but {at.hook_name} is {src.shape[-1]} wide (its last dimension): "
            f"build it with d={src.shape[-1]}"
        )
    _checked(base_pos, n_pos)
    _checked(source_pos, src.shape[1])


def _run(
    model: HookedModel,
    intervention: nn.Module,
    at: _AtHook,
    base_tokens: torch.Tensor,
    rows: torch.Tensor | slice,
    base_pos: torch.Tensor,
    source_pos: torch.Tensor,
    base_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The intervened base run's logits at each row's last real position, for the ``rows`` of the
    placed activations (rank 0's; None on a split model's other ranks)."""
    batch, n_pos = base_tokens.shape
    hook = interchange_hook(intervention, at.source_act[rows], base_pos, source_pos)
    if at.start is None:
        logits = model.run_with_hooks(base_tokens, attention_mask=base_mask, fwd_hooks=[(at.hook_name, hook)])
    else:
        assert at.base_act is not None
        logits = model.run_with_hooks(
            at.base_act[rows], start_at_layer=at.start, attention_mask=base_mask, fwd_hooks=[(at.hook_name, hook)]
        )
    if logits is None:  # another rank of a split model gets the logits
        return None
    last = torch.arange(batch, device=logits.device)
    return logits[last, last_real(base_mask, batch, n_pos, logits.device)]


def interchange_logits(
    model: HookedModel,
    intervention: nn.Module,
    site: str,
    base_tokens: Int[torch.Tensor, "batch pos"],
    source_act: torch.Tensor | None,
    base_pos: PositionIndex = -1,
    source_pos: PositionIndex = -1,
    base_act: torch.Tensor | None = None,
    base_mask: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch d_vocab"] | None:
    """Next-token logits of the intervened base run, at its last (real) position.

    With ``base_act`` (the base run's cached value of a residual-stream ``site``), the run
    resumes from it (``start_at_layer``) instead of recomputing the layers below the site:
    the same logits, computed with the same hook, for a fraction of the cost. ``base_mask``:
    the base prompts' padding mask (1 real, 0 padding); positions are then as ``train_das``'s.
    ``intervention`` replaces ``site`` at ``base_pos`` of ``base_tokens`` with the source
    activation ``source_act`` at ``source_pos`` (``model``, positions as in ``train_das``).

    Split over processes (``pipeline_ranks``): every rank calls it; ``source_act`` and ``base_act``
    are read on rank 0 (``source_activations``' result; the other ranks may pass None) and sent to
    the rank that runs the hook; rank 0 returns the logits, the other ranks None. With grad
    enabled, ``model.blocks.grad(loss, list(intervention.parameters()))`` then gives the hook's
    rank the gradient of rank 0's loss.
    """
    _one_site(model, site)
    batch, n_pos = base_tokens.shape
    at = _AtHook(model, site, source_act, base_act)
    b_pos = _per_row(_positions(base_pos, base_mask, batch, n_pos), batch, base_tokens.device)
    s_pos = _per_row(source_pos, batch, base_tokens.device)
    _check(intervention, at, batch, n_pos, b_pos, s_pos)
    return _run(model, intervention, at, base_tokens, slice(None), b_pos, s_pos, base_mask)


def _sync(model: HookedModel, intervention: nn.Module, hook_name: str) -> None:
    """Every rank's ``intervention`` made that of the rank that runs ``hook_name`` (where it was
    trained): its state (parameters and buffers), bit for bit. On one process, unchanged."""
    state = [t for t in intervention.state_dict().values() if isinstance(t, torch.Tensor)]
    packed = torch.cat([t.detach().reshape(-1).view(torch.uint8).cpu() for t in state]) if state else None
    if packed is None:
        return
    trained = model.blocks.from_sites({hook_name: packed}, [hook_name])
    got = model.blocks.share(trained)[hook_name].cpu()
    offset = 0
    with torch.no_grad():
        for t in state:
            n = t.numel() * t.element_size()
            t.copy_(got[offset : offset + n].view(t.dtype).view(t.shape))
            offset += n


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
) -> list[float] | None:
    """Fit the rotation so the intervened base run predicts ``target_tokens`` (cross-entropy
    at the last real position), with the model frozen. Returns the loss per step.

    Prompts of different lengths: pass lists of strings (left-padded here) or padded tokens
    with ``base_attention_mask`` / ``source_attention_mask`` (1 real, 0 padding; either side).
    With a mask, a negative position counts back from each row's last real token.

    The source activations are computed once; so are the base's when the site is in the
    residual stream (each step then runs only the blocks above the site).

    Split over processes (``pipeline_ranks``): every rank calls it with the same arguments and an
    intervention built alike (the same ``seed``; ``seed`` here picks the batches, alike on every
    rank). The rank that runs the intervention's hook trains it (the loss's gradient crosses the
    ranks back to it); at the end every rank's intervention is made that one (parameters and
    buffers), so every rank holds the one-process rotation. The losses are rank 0's (where the
    logits are); the other ranks return None.

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
    _one_site(model, site)
    base_tokens, base_mask = _tokens_and_mask(model, base_tokens, base_attention_mask, "base")
    source_tokens, source_mask = _tokens_and_mask(model, source_tokens, source_attention_mask, "source")
    target_tokens = torch.as_tensor(target_tokens, device=base_tokens.device)
    n = base_tokens.shape[0]
    if source_tokens.shape[0] != n or target_tokens.shape != (n,):
        raise ValueError(
            f"{n} base prompts need as many source prompts (got {source_tokens.shape[0]}) and targets "
            f"(got shape {tuple(target_tokens.shape)})"
        )
    source_act = source_activations(model, site, source_tokens, source_mask)
    base_act = source_activations(model, site, base_tokens, base_mask) if resume_point(model, site) else None
    at = _AtHook(model, site, source_act, base_act)
    batch_size = batch_size or n
    params: list[torch.Tensor] = list(intervention.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    base_pos = _per_row(_positions(base_pos, base_mask, n, base_tokens.shape[1]), n, base_tokens.device)
    source_pos = _per_row(_positions(source_pos, source_mask, n, source_tokens.shape[1]), n, base_tokens.device)
    _check(intervention, at, n, base_tokens.shape[1], base_pos, source_pos)
    losses = []
    here = model.blocks.gets_output  # the losses (and the one progress bar) are where the logits are
    with frozen(model):
        for _ in tqdm(range(steps), desc="training DAS rotation", leave=False, delay=1.0, disable=not here):
            idx = torch.randperm(n, generator=gen)[:batch_size]
            mask = None if base_mask is None else base_mask[idx]
            with torch.enable_grad():
                logits = _run(model, intervention, at, base_tokens[idx], idx, base_pos[idx], source_pos[idx], mask)
                loss = None if logits is None else F.cross_entropy(logits.float(), target_tokens[idx])
                grads = model.blocks.grad(loss, params)  # None on ranks the hook does not run on
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if loss is not None:
                losses.append(loss.item())
    _sync(model, intervention, at.hook_name)
    return losses if here else None


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
) -> dict[str, float] | None:
    """Loss and interchange accuracy (argmax == target) of the intervened base runs.

    ``model``, ``intervention``, ``site``, ``base_tokens``, ``source_tokens``, ``target_tokens``,
    ``base_pos``, ``source_pos``, ``base_attention_mask`` and ``source_attention_mask`` as in ``train_das``.
    Split over processes: every rank calls it; rank 0 returns the dict, the other ranks None.
    """
    _one_site(model, site)
    base_tokens, base_mask = _tokens_and_mask(model, base_tokens, base_attention_mask, "base")
    source_tokens, source_mask = _tokens_and_mask(model, source_tokens, source_attention_mask, "source")
    source_act = source_activations(model, site, source_tokens, source_mask)
    source_pos = _positions(source_pos, source_mask, *source_tokens.shape)
    logits = interchange_logits(
        model, intervention, site, base_tokens, source_act, base_pos, source_pos, base_mask=base_mask
    )
    if logits is None:
        return None
    target_tokens = torch.as_tensor(target_tokens, device=logits.device)
    return {
        "loss": float(F.cross_entropy(logits.float(), target_tokens)),
        "accuracy": float((logits.argmax(-1) == target_tokens).float().mean()),
    }
