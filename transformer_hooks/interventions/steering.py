"""Steering: add ``coeff * vector`` to a site's activation, in a forward or during generation.

    act[:, p] <- act[:, p] + coeff * vector      for every chosen position p

The vector has the site's per-position shape (``[d_model]`` for residual sites,
``[head, d_head]`` for ``attn.hook_z``), or one such vector per chosen position
(``[n_positions, ...]``, as ActAdd adds a per-position difference at the front of the
prompt).

Positions are absolute positions in the token sequence (padding included):

- ``None`` or ``"all"``: every position, prompt and generated tokens alike;
- an ``int``, a ``slice`` or a list of ints. A position the sequence has not reached
  is skipped (generation may reach it later). Negative ints count from the end of the
  sequence at each forward: during cached generation ``-1`` steers every new token,
  whose steered keys and values stay in the cache;
- ``"new"``: only positions processed by a forward that continues a KV cache, i.e. the
  decoding steps of ``model.generate``. Its prefill covers the prompt but its last token,
  which the first decoding step feeds in, so every prediction of a new token is steered
  and the rest of the prompt is not. (Without a KV cache a forward cannot tell prompt
  from generated tokens: steer ``slice(prompt_len, None)`` instead.) Needs the
  ``steering`` context manager, which watches the cache.

During cached generation a forward sees only the newest token; the ``steering`` context
manager watches the model's KV cache so that positions stay absolute across those
forwards. ``steering_hook`` alone is for single forwards (``run_with_hooks``,
``model.hooks``), where the positions are those of the input.

Building a vector, ActAdd's recipe (Turner et al. 2023): ``steering_vector(model, "Love",
"Hate", site)`` pads the shorter prompt with spaces to the same number of tokens, takes the
difference of the two prompts' activations at the site, leaves out the BOS position (where
the two are equal, and whose norm is many times every other position's), and averages over
the rest (``reduce="mean"``), or takes the last token (``"last"``), or keeps one vector per
position (``None``). Choose the coefficient by the residual stream's norm:
``steering_coeff(model, site, vector, fraction)`` is the coefficient at which the added
vector's norm is ``fraction`` of the residual stream's typical norm there (its mean over the
non-BOS positions of a few prompts). A vector added at ``coeff * ||vector||`` many times
that norm replaces the stream rather than steering it: the hook warns when the ratio passes
``NORM_WARNING_RATIO``.

    site = "blocks.6.hook_resid_pre"
    vector = steering_vector(model, "Love", "Hate", site)
    with steering(model, site, vector, coeff=steering_coeff(model, site, vector, 1.0)):
        model.generate("I think dogs are", max_new_tokens=20, do_sample=False)
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float

from ..hooks import HookPoint
from ..protocol import HookedModel

Positions = None | int | slice | Sequence[int] | Literal["all", "new"]
Reduce = Literal["mean", "last", None]

NORM_WARNING_RATIO = 4.0
"""The hook warns when ``coeff * ||vector||`` exceeds this many times the residual norm it is added to."""

# Prompts over which steering_coeff measures a site's typical norm when none are given.
_NORM_PROMPTS = ("I think that you are", "The weather today is", "My favourite food is", "She opened the door and")


def _check_positions(positions: Positions) -> Positions:
    if positions is None or positions == "all":
        return None
    if positions == "new" or isinstance(positions, (int, slice)):
        return positions
    if isinstance(positions, str):
        raise ValueError(f"positions must be None, 'all', 'new', an int, a slice or a list of ints; got {positions!r}")
    positions = [int(p) for p in positions]
    if not positions:
        raise ValueError("positions is an empty list: give at least one position, or None for all")
    return positions


class SteeringHook:
    """A hook function ``fn(act, hook)`` that adds ``coeff * vector`` at ``positions``.

    ``past`` is how many positions came before this forward's first one (a KV cache's
    length); the ``steering`` context manager keeps it up to date during generation.
    """

    def __init__(self, vector: torch.Tensor, coeff: float = 1.0, positions: Positions = None) -> None:
        if not isinstance(vector, torch.Tensor):
            vector = torch.as_tensor(vector)
        if not vector.dtype.is_floating_point:
            raise ValueError(f"a steering vector must be floating point, got dtype {vector.dtype}")
        self.vector = vector.detach()
        self.coeff = float(coeff)
        self.positions = _check_positions(positions)
        self.past = 0
        self.continues_cache = False
        self._pending = False
        self._checked = False

    def _select(self, n_pos: int) -> tuple[list[int] | None, list[int] | None]:
        """(positions of this forward's input to steer, rows of a per-position vector for them).

        None for the positions means all of them; None for the rows means one vector for all.
        """
        total = self.past + n_pos  # sequence length once this forward is done
        chosen = self.positions
        self._pending = False  # whether some chosen positions lie beyond this forward (generation may reach them)
        if chosen is None:
            return None, None
        if chosen == "new":
            return (None if self.continues_cache else []), None
        if isinstance(chosen, slice):
            absolute = list(range(total)[chosen])
            self._pending = (chosen.step or 1) > 0 and (chosen.stop is None or chosen.stop > total)
        else:
            absolute = []
            assert not isinstance(chosen, str), f"positions={chosen!r} is handled above"
            for p in [chosen] if isinstance(chosen, int) else chosen:
                if p < -total:
                    raise IndexError(f"steering position {p} is out of range for a sequence of {total} positions")
                if p < total:  # a later position is skipped: generation may not have reached it yet
                    absolute.append(p % total)
                else:
                    self._pending = True
            if len(set(absolute)) != len(absolute):
                raise ValueError(f"steering positions {chosen} name a position twice")
        rows = [i for i, p in enumerate(absolute) if p >= self.past]
        return [absolute[i] - self.past for i in rows], rows

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if act.ndim < 2:
            raise ValueError(
                f"steering needs a site with a position axis [batch, pos, ...]; {hook.name} has "
                f"shape {tuple(act.shape)}"
            )
        local, rows = self._select(act.shape[1])
        if local == []:
            return act
        delta = (self.coeff * self._vector_for(tuple(act.shape[2:]), rows, hook.name)).to(act.device, act.dtype)
        if not self._checked:
            self._check_norm(act, delta, hook.name)
        if local is None:
            return act + delta
        act = act.clone()  # the activation may be a view other sites share
        act[:, local] = act[:, local] + delta
        return act

    def _check_norm(self, act: torch.Tensor, delta: torch.Tensor, name: str) -> None:
        """Warn once if the added vector dwarfs the activation it is added to (median norm over the
        positions after the first: position 0 is BOS, or an attention sink, with an outsized norm)."""
        self._checked = True
        rest = act[:, 1:] if act.shape[1] > 1 else act
        typical = float(rest.detach().float().flatten(2).norm(dim=-1).median()) if rest.numel() else 0.0
        added = float(delta.detach().float().flatten(-len(act.shape[2:])).norm(dim=-1).max())
        if typical > 0 and added > NORM_WARNING_RATIO * typical:
            warnings.warn(
                f"steering at {name} adds a vector of norm {added:.1f} (coeff {self.coeff:g}) to activations of "
                f"typical norm {typical:.1f}: {added / typical:.1f}x, more than {NORM_WARNING_RATIO:g}x, which "
                f"replaces the residual stream rather than steering it (expect garbled text). Choose the "
                f"coefficient by the residual norm: steering_coeff(model, site, vector, fraction=1.0).",
                stacklevel=2,
            )

    def _vector_for(self, site_shape: tuple[int, ...], rows: list[int] | None, name: str) -> torch.Tensor:
        v = self.vector
        if tuple(v.shape) == site_shape:
            return v
        if tuple(v.shape[1:]) != site_shape:
            raise ValueError(
                f"steering vector has shape {tuple(v.shape)}, but {name} has shape {site_shape} per "
                f"position; pass a vector of shape {site_shape} (or [n_positions, *{site_shape}])"
            )
        if rows is None:
            raise ValueError(
                f"a per-position steering vector {tuple(v.shape)} needs explicit positions "
                f"(e.g. positions=slice(0, {v.shape[0]})), not all or new positions"
            )
        n_chosen = len(rows) if self.past == 0 else max(rows) + 1
        # A prefill may stop short of the chosen positions (generate's prefill leaves out the
        # last prompt token): the vector's first rows serve it, the next forward the rest.
        short = self._pending and n_chosen < v.shape[0]
        if (self.past == 0 and n_chosen != v.shape[0] and not short) or n_chosen > v.shape[0]:
            raise ValueError(
                f"steering vector has {v.shape[0]} positions but {n_chosen} positions of {name} "
                f"were chosen; make them match"
            )
        return v[rows]


def steering_hook(vector: Float[torch.Tensor, "..."], coeff: float = 1.0, positions: Positions = None) -> SteeringHook:
    """A hook function adding ``coeff * vector`` at ``positions`` of one forward.

    Use it with ``model.run_with_hooks(tokens, fwd_hooks=[(site, steering_hook(v, 4.0))])``.
    For generation use the ``steering`` context manager, which keeps positions absolute
    across cached decoding steps (and is the only way ``positions="new"`` can work).
    """
    if isinstance(positions, str) and positions == "new":
        raise ValueError(
            "positions='new' needs to see the KV cache of each forward: use the steering(...) "
            "context manager instead of steering_hook"
        )
    return SteeringHook(vector, coeff, positions)


@contextlib.contextmanager
def steering(
    model: HookedModel,
    site: str,
    vector: Float[torch.Tensor, "..."],
    coeff: float = 1.0,
    positions: Positions = None,
) -> Iterator[SteeringHook]:
    """Steer every forward run inside the ``with`` block, including ``model.generate``.

        with steering(model, "blocks.6.hook_resid_post", vector, coeff=4.0):
            model.generate("I think dogs are", max_new_tokens=20)

    The hook and the KV-cache watcher are removed on exit, also after an exception.
    ``site``: the hook name steered; ``positions`` as in the module docstring.

    Split over processes (``pipeline_ranks``): every rank enters it; the vector and the
    coefficient are rank 0's (what ``steering_vector`` and ``steering_coeff`` return there;
    the other ranks may pass None).
    """
    if model.resolve_hook_names(site) != [site]:
        raise ValueError(
            f"steering takes one hook name, got {site!r}, which names {len(model.resolve_hook_names(site))} sites"
        )
    given = None
    if model.blocks.gets_output:
        given = {"vector": torch.as_tensor(vector), "coeff": torch.tensor(float(coeff), dtype=torch.float64)}
    shared = model.blocks.share(given)
    hook = SteeringHook(shared["vector"], float(shared["coeff"]), positions)
    hook.vector = hook.vector.to(model.device)
    signature = inspect.signature(model.forward)

    def watch_cache(module: Any, args: tuple, kwargs: dict) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        cache = bound.get("past_kv_cache")
        hook.past = cache.length if cache is not None else 0
        hook.continues_cache = hook.past > 0

    handle = model.register_forward_pre_hook(watch_cache, with_kwargs=True)
    try:
        with model.hooks(fwd_hooks=[(site, hook)]):
            yield hook
    finally:
        handle.remove()
        hook.past, hook.continues_cache = 0, False


def steering_vector(
    model: HookedModel,
    positive: str | Sequence[str],
    negative: str | Sequence[str],
    site: str,
    reduce: Reduce = "mean",
    prepend_bos: bool | None = None,
    pad: bool = True,
    skip_bos: bool = True,
) -> torch.Tensor | None:
    """``act(positive) - act(negative)`` at ``site``, by ActAdd's recipe ("Love" - "Hate").

    Args:
        model: the ``HookedTransformer``.
        positive: a prompt, or a list of prompts (averaged over prompts).
        negative: the contrasting prompt(s).
        site: a hook name, e.g. ``"blocks.6.hook_resid_pre"``.
        reduce: ``"mean"``: mean over the (non-padding, non-BOS) positions -> the site's shape;
            ``"last"``: at each prompt's last token; ``None``: one vector per position ->
            ``[pos, *site shape]`` (BOS left out with ``skip_bos``: add it at
            ``positions=slice(1, 1 + len(vector))``).
        prepend_bos: as in ``model.to_tokens`` (default: the model's).
        pad: with one prompt on each side, append spaces to the shorter until both have the
            same number of tokens (ActAdd), so positions line up.
        skip_bos: leave out position 0 when the prompts start with BOS: the two sides are equal
            there, and its norm (an attention sink) is many times every other position's.

    Lists of prompts of different lengths are right-padded and masked (per position, the mean
    over the prompts that reach it). With ``reduce=None`` the two sides must reach the same length.

    Split over processes (``pipeline_ranks``): rank 0 returns the vector, the other ranks None
    (as ``run_with_cache``); ``steering`` takes it from rank 0.
    """
    if reduce not in ("mean", "last", None):
        raise ValueError(f"reduce must be 'mean', 'last' or None, got {reduce!r}")
    model.resolve_hook_names(site)  # an unknown site fails here, before any forward
    if pad and isinstance(positive, str) and isinstance(negative, str):
        positive, negative = pad_to_same_length(model, positive, negative, prepend_bos)
    skip = 0
    if skip_bos:
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        skip = 1 if bos else 0
    pos_acts, neg_acts = (_site_activation(model, p, site, reduce, prepend_bos, skip) for p in (positive, negative))
    if pos_acts is None or neg_acts is None:  # split over processes: rank 0 has them
        return None
    if pos_acts.shape != neg_acts.shape:
        raise ValueError(
            f"per-position activations differ in length: {tuple(pos_acts.shape)} vs "
            f"{tuple(neg_acts.shape)}; pad the shorter prompt (ActAdd pads with spaces) or use "
            f"reduce='mean' / 'last'"
        )
    return pos_acts - neg_acts


def pad_to_same_length(model: HookedModel, a: str, b: str, prepend_bos: bool | None = None) -> tuple[str, str]:
    """``a`` and ``b`` with spaces appended to the shorter until they tokenize (by ``model``,
    with ``prepend_bos``) to the same length (ActAdd's padding). Returns them unchanged if
    spaces cannot make the lengths meet."""

    def length(text: str) -> int:
        return int(model.to_tokens(text, prepend_bos=prepend_bos).shape[1])

    la, lb = length(a), length(b)
    for _ in range(64):
        if la == lb:
            return a, b
        if la < lb:
            a += " "
            la = length(a)
        else:
            b += " "
            lb = length(b)
    return a, b


def residual_norm(model: HookedModel, site: str, prompts: str | Sequence[str] | None = None) -> float | None:
    """The typical norm of ``site``'s activation in ``model``: its mean over the non-BOS
    positions of ``prompts`` (default: a few everyday sentences). Split over processes: on
    rank 0, None on the other ranks."""
    typical = _typical_norm(model, site, prompts)
    return None if typical is None else typical[0]


def _typical_norm(
    model: HookedModel, site: str, prompts: str | Sequence[str] | None
) -> tuple[float, tuple[int, ...]] | None:
    prompts = list(_NORM_PROMPTS) if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
    skip = 1 if model.cfg.default_prepend_bos else 0
    norms: list[torch.Tensor] = []
    shape: tuple[int, ...] = ()
    for prompt in prompts:
        act = _site_activation(model, prompt, site, None, None, skip)  # [pos, *site shape]
        if act is None:  # split over processes: rank 0 has it
            continue
        norms.append(act.float().flatten(1).norm(dim=-1))
        shape = tuple(act.shape[1:])
    return (float(torch.cat(norms).mean()), shape) if model.blocks.gets_output else None


def steering_coeff(
    model: HookedModel,
    site: str,
    vector: torch.Tensor | None,
    fraction: float = 0.5,
    prompts: str | Sequence[str] | None = None,
) -> float | None:
    """The coefficient at which ``coeff * ||vector||`` is ``fraction`` of ``site``'s typical norm
    (split over processes: on rank 0, None on the other ranks, which may pass None as ``vector``).

    Args:
        model: the ``HookedTransformer``.
        site: the hook name the vector is added at.
        vector: the steering vector: the site's shape, or one row per position (their mean norm counts).
        fraction: the added norm as a fraction of the residual norm (ActAdd's fluent range is a
            fraction; several times the norm replaces the stream instead of steering it).
        prompts: where to measure the typical norm (``residual_norm``; default: a few everyday sentences).
    """
    measured = _typical_norm(model, site, prompts)
    if measured is None or vector is None:
        return None
    typical, shape = measured
    v = vector.detach().float()
    if tuple(v.shape) == shape:
        vnorm = float(v.norm())
    elif tuple(v.shape[1:]) == shape:
        vnorm = float(v.flatten(1).norm(dim=-1).mean())
    else:
        raise ValueError(f"steering vector has shape {tuple(v.shape)}; {site} has shape {shape} per position")
    if vnorm == 0:
        raise ValueError("the steering vector is zero: the two prompts give the same activations at this site")
    return fraction * typical / vnorm


def _site_activation(
    model: HookedModel,
    prompts: str | Sequence[str],
    site: str,
    reduce: Reduce,
    prepend_bos: bool | None = None,
    skip: int = 0,
) -> torch.Tensor | None:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokens, mask = model.tokens_and_mask(prompts, prepend_bos=prepend_bos, padding_side="right")
    # Blocks above the site cannot change it: stop after its block.
    layer = model.hook_dict[site].layer_idx
    stop = layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=site, stop_at_layer=stop)
    if cache is None:  # split over processes: rank 0 has the cache
        return None
    act = cache[site]  # [batch, pos, ...]
    real = torch.ones(tokens.shape, dtype=act.dtype, device=act.device) if mask is None else mask.to(act.dtype)
    if skip and act.shape[1] > skip:
        act, real = act[:, skip:], real[:, skip:]
    real = real.reshape(*real.shape, *([1] * (act.ndim - 2)))
    if reduce == "mean":
        per_prompt = (act * real).sum(1) / real.sum(1)
    elif reduce == "last":
        last = real.reshape(real.shape[:2]).sum(1).long() - 1
        per_prompt = act[torch.arange(act.shape[0], device=act.device), last]
    else:  # per position: the mean over the prompts that have a real token there
        return (act * real).sum(0) / real.sum(0).clamp(min=1)
    return per_prompt.mean(0)
