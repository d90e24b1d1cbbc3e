"""Hook points and the hook registry.

A ``HookPoint`` is an identity on the forward path that users can observe or edit with
``fn(activation, hook) -> activation | None`` (TransformerLens's signature). An
unobserved hook point costs one attribute check, and components ask ``hook.observed``
before doing work that only an observer needs (the explicit attention pattern,
per-head results, per-head inputs).

``HookedRootModule`` gives a model the registry: ``hook_dict``, ``add_hook``,
``reset_hooks``, the ``hooks()`` context manager, ``run_with_hooks`` and
``run_with_cache``. Hooks added inside a context are removed when it exits, on success
or on any exception, so a failing hook never stays attached.

Two hook lifetimes: ``add_hook`` attaches a hook to the model (every thread sees it);
``hooks()`` / ``run_with_hooks`` / ``run_with_cache`` attach theirs to the calling
thread only (a ``contextvars`` variable maps each hook point to its scoped hooks), so
threads that run the same model at once each get their single-threaded result.

A hook owns its tensor: a site built with ``HookPoint(copy_input=True)`` (one whose input
is also read elsewhere: the skip connection beside ``hook_mlp_in``, the previous block's
``hook_resid_post`` beside ``hook_resid_pre``, ``hook_attn_in`` beside the per-head
inputs) hands its hooks a copy, so an in-place edit has exactly the effect of returning
the edited tensor. The copy is made only when a hook that may edit is attached (the
cache's own reader hooks are marked ``reads_only``). It works for any module
built from ``HookPoint``s (an SAE, a toy model): ``run_with_cache`` returns a plain
``HookCache`` of tensors by name, which ``HookedTransformer`` wraps in its
``ActivationCache``. Which transformer sites exist, their axes and which are per-head
expansions is ``sites.py``'s table.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import fnmatch
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import sites
from .hook_cache import HookCache
from .sites import PER_HEAD_EXPANSIONS  # noqa: F401  (re-exported: its old home)
from .utils import Slice

HookFn = Callable[..., Any]
logger = logging.getLogger(__name__)
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class UnknownHookError(ValueError):
    """A hook name that the model does not have."""


class HookShapeError(ValueError):
    """A hook function returned a tensor that cannot replace the activation."""


@dataclass(eq=False)
class _Hook:
    fn: HookFn
    level: int | None  # the hooks() context that added it; None for add_hook()
    permanent: bool
    reads_only: bool = False  # never edits the activation in place (the cache's savers)
    alive: bool = True  # False once removed: a backward pass recorded before then skips it

    # TransformerLens's LensHandle spellings
    @property
    def is_permanent(self) -> bool:
        return self.permanent

    @property
    def context_level(self) -> int | None:
        return self.level

    @property
    def user_hook(self) -> HookFn:
        """The callable given to ``add_hook``."""
        return self.fn


def reads_only(fn: HookFn) -> HookFn:
    """Mark the hook ``fn`` as never editing its activation in place: a site whose input is shared
    makes no copy for it (see ``HookPoint(copy_input=True)``). Returns ``fn``.
    """
    fn.reads_only = True  # type: ignore[attr-defined]
    return fn


# Hooks of hooks() contexts, visible only to the context (thread, task) that added them:
# {hook point: (fwd hooks, bwd hooks)}. Never mutated: each change sets a new dict.
_Scoped = dict["HookPoint", tuple[tuple[_Hook, ...], tuple[_Hook, ...]]]
_NO_SCOPED: _Scoped = {}
_SCOPED: contextvars.ContextVar[_Scoped] = contextvars.ContextVar("transformer_hooks_scoped", default=_NO_SCOPED)  # noqa: B039
_SCOPED_LOCK = threading.Lock()  # guards HookPoint.n_scoped counts
_LEVELS = itertools.count(1)  # hooks() levels, unique across threads


def _drop_scoped(keep: Callable[["HookPoint", _Hook], bool], points: Iterable["HookPoint"] | None = None) -> None:
    """Remove this context's scoped hooks (of ``points``, or all) for which ``keep`` is False."""
    scoped = _SCOPED.get()
    wanted = None if points is None else set(points)
    new: dict[HookPoint, tuple[tuple[_Hook, ...], tuple[_Hook, ...]]] = {}
    dropped: list[tuple[HookPoint, _Hook]] = []
    for hp, lists in scoped.items():
        if wanted is not None and hp not in wanted:
            new[hp] = lists
            continue
        kept = tuple(tuple(h for h in hooks if keep(hp, h)) for hooks in lists)
        dropped += [(hp, h) for hooks in lists for h in hooks if not keep(hp, h)]
        if kept[0] or kept[1]:
            new[hp] = kept  # type: ignore[assignment]
    if not dropped:
        return
    _SCOPED.set(new)
    with _SCOPED_LOCK:
        for hp, h in dropped:
            h.alive = False
            hp.n_scoped -= 1


def _check_callable(fn: Any, site: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"the hook for {site} is a {type(fn).__name__}, not a function: "
            f"pass (name, fn) pairs with fn(activation, hook) -> activation | None"
        )


def _fn_name(fn: HookFn) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__qualname__", repr(inner))


class HookPoint(nn.Module):
    """An observable, editable site of the computation. Identity until hooked.

    ``copy_input``: the input is also read elsewhere, so hooks that may edit it in place
    get a copy (the hooked value flows on; the other readers keep the original).
    """

    def __init__(self, copy_input: bool = False) -> None:
        super().__init__()
        self.name: str = ""
        self.copy_input = copy_input
        self.model_fwd: list[_Hook] = []  # add_hook(): seen by every thread
        self.model_bwd: list[_Hook] = []
        self.n_scoped = 0  # scoped hooks attached here by any thread: 0 keeps the fast path free
        self.ctx: dict[Any, Any] = {}  # scratch space shared by this site's hooks (TL compatible)

    def _scoped(self) -> tuple[tuple[_Hook, ...], tuple[_Hook, ...]]:
        if not self.n_scoped:
            return (), ()
        return _SCOPED.get().get(self, ((), ()))

    @property
    def fwd_hooks(self) -> list[_Hook]:
        """The forward hooks this thread sees: the model's, then its own scoped ones."""
        return [*self.model_fwd, *self._scoped()[0]]

    @property
    def bwd_hooks(self) -> list[_Hook]:
        """The backward hooks this thread sees: the model's, then its own scoped ones."""
        return [*self.model_bwd, *self._scoped()[1]]

    @property
    def observed(self) -> bool:
        """Whether the calling thread sees a hook here."""
        if self.model_fwd or self.model_bwd:
            return True
        return bool(self.n_scoped) and self in _SCOPED.get()

    def has_hooks(self, dir: str = "both", including_permanent: bool = True, level: int | None = None) -> bool:
        """TransformerLens's ``has_hooks``: whether the calling thread sees a hook here in direction
        ``dir`` ("fwd", "bwd" or "both"), ``including_permanent`` ones or not, of one ``hooks()``
        context ``level`` (None: any).
        """
        return bool(self.list_hooks(dir, including_permanent, level))

    def list_hooks(self, dir: str = "both", including_permanent: bool = True, level: int | None = None) -> list[_Hook]:
        """The hooks ``has_hooks`` counts, with the same ``dir``, ``including_permanent`` and ``level``
        (each has ``fn``, ``is_permanent`` and ``context_level``).
        """
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        hooks = [*(self.fwd_hooks if dir != "bwd" else []), *(self.bwd_hooks if dir != "fwd" else [])]
        return [h for h in hooks if (including_permanent or not h.permanent) and (level is None or h.level == level)]

    @property
    def only_read(self) -> bool:
        """Whether every hook the calling thread sees here only reads (the cache's savers, no
        backward hooks). A component may then compute its output as it does unobserved and
        show the hooks the explicitly computed values, so ``model(x)`` and
        ``run_with_cache(x)`` give the same output to the bit."""
        return not self.bwd_hooks and all(h.reads_only for h in self.fwd_hooks)

    def add_hook(
        self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, level: int | None = None, prepend: bool = False
    ) -> None:
        """Add the hook ``fn`` (``fn(activation, hook) -> new activation or None``) to this site.

        Args:
            fn: the hook function.
            dir: ``"fwd"`` or ``"bwd"``.
            is_permanent: kept by ``reset_hooks``.
            level: the context level that owns it.
            prepend: run it before the hooks already here.
        """
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        _check_callable(fn, self.name)
        hooks = self.model_fwd if dir == "fwd" else self.model_bwd
        entry = _Hook(fn, level, is_permanent, reads_only=getattr(fn, "reads_only", False))
        hooks.insert(0, entry) if prepend else hooks.append(entry)

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove the model's hooks here, and the calling thread's scoped ones: ``dir``,
        ``including_permanent`` and ``level`` select them as in ``has_hooks``.
        """

        def keep(h: _Hook) -> bool:
            if h.permanent and not including_permanent:
                return True
            return level is not None and h.level != level

        def keep_or_kill(h: _Hook) -> bool:
            h.alive = h.alive and keep(h)
            return h.alive

        if dir in ("fwd", "both"):
            self.model_fwd = [h for h in self.model_fwd if keep_or_kill(h)]
        if dir in ("bwd", "both"):
            self.model_bwd = [h for h in self.model_bwd if keep_or_kill(h)]
        if self.n_scoped:
            fwd_scoped = set(self._scoped()[0])
            _drop_scoped(
                lambda hp, h: keep(h) or (dir == "fwd" and h not in fwd_scoped) or (dir == "bwd" and h in fwd_scoped),
                [self],
            )

    def clear_context(self) -> None:
        """Forget the context this site's hooks saved (``hook.ctx``)."""
        self.ctx = {}

    # nn.Module.__call__ adds a few microseconds per call; a model has ~30 sites per layer
    # and a decoding step is short, so the unobserved path bypasses it.
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.model_fwd or self.model_bwd or self.n_scoped):
            return x
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the hooks on ``x`` (the activation) in order and return the result; a hook's
        replacement must keep the shape, device and dtype (``HookShapeError`` otherwise).
        """
        scoped_fwd, scoped_bwd = self._scoped()
        fwd = [*self.model_fwd, *scoped_fwd]
        if self.copy_input and not all(h.reads_only for h in fwd):
            x = x.clone()  # this hook's own copy: the input is read elsewhere too
        for h in fwd:
            out = h.fn(x, hook=self)
            if out is not None:
                self._check_replacement(x, out, h.fn)
                x = out
        bwd = [*self.model_bwd, *scoped_bwd]  # taken now: backward may run on another thread
        if bwd and x.requires_grad:
            x.register_hook(lambda grad: self._run_bwd(grad, bwd))
        return x

    def _run_bwd(self, grad: torch.Tensor, hooks: list[_Hook]) -> torch.Tensor:
        for h in hooks:
            if not h.alive:
                continue
            out = h.fn(grad, hook=self)
            if out is not None:
                self._check_replacement(grad, out, h.fn)
                grad = out
        return grad

    def _check_replacement(self, x: torch.Tensor, out: Any, fn: HookFn) -> None:
        if not isinstance(out, torch.Tensor):
            raise HookShapeError(
                f"hook {_fn_name(fn)} on {self.name} returned {type(out).__name__}; a hook must return "
                f"a tensor of shape {tuple(x.shape)} to replace the activation, or None to keep it"
            )
        if out.shape != x.shape:
            raise HookShapeError(
                f"hook {_fn_name(fn)} on {self.name} returned shape {tuple(out.shape)}, but the "
                f"activation has shape {tuple(x.shape)}; return a tensor of the same shape (or None)"
            )
        if out.device != x.device:
            raise HookShapeError(
                f"hook {_fn_name(fn)} on {self.name} returned a tensor on {out.device}, but the activation is on "
                f"{x.device}; move the result with .to({str(x.device)!r})"
            )
        if out.dtype != x.dtype:
            raise HookShapeError(
                f"hook {_fn_name(fn)} on {self.name} returned dtype {out.dtype}, but the activation "
                f"is {x.dtype}; cast the result with .to({x.dtype})"
            )

    def extra_repr(self) -> str:
        """TransformerLens's repr: ``HookPoint(name='blocks.0.hook_z', 2 fwd)``, ``HookPoint()``."""
        bits = [f"name={self.name!r}"] if self.name else []
        bits += [f"{len(hooks)} {d}" for d, hooks in (("fwd", self.fwd_hooks), ("bwd", self.bwd_hooks)) if hooks]
        return ", ".join(bits)

    @property
    def layer_idx(self) -> int | None:
        """The block this site belongs to (None outside blocks), as TL's ``hook.layer()``."""
        return sites.layer_of(self.name)

    def layer(self) -> int | None:
        """The block index of this site (from its name), or an error outside the blocks."""
        return self.layer_idx


def _position_dim(name: str, act: torch.Tensor) -> int:
    """Where the (query) position is in a cached activation (with its batch axis): the site
    table's position axis; [batch, pos, ...] for a site that is not a transformer's."""
    dim = sites.position_dim(name)
    return 1 if dim is None else dim


class HookedRootModule(nn.Module):
    """Registry of a model's hook points, keyed by TransformerLens names."""

    # TransformerLens switches that are on (sites.TL_FLAGS: "use_attn_result", ...; set through
    # set_use_attn_result & co.). A site whose row names a switch that is off is left out of the
    # default cache and of callable filters, as TransformerLens never runs its hook.
    tl_flags: frozenset[str] = frozenset()

    @property
    def cached_expansions(self) -> frozenset[str]:
        """The per-head expansions (relative names) whose switch is on."""
        return frozenset(s.name for s in sites.SITES if s.per_head_expansion and s.tl_flag in self.tl_flags)

    def switched_off(self, name: str) -> bool:
        """Whether site ``name`` needs a TransformerLens switch that is off (see ``tl_flags``)."""
        flag = sites.tl_flag(name)
        return flag is not None and flag not in self.tl_flags

    def setup_hooks(self) -> None:
        """Name every HookPoint after its module path. Call at the end of ``__init__``."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        self._hook_level = 0

    def setup(self) -> None:
        """TransformerLens's name for ``setup_hooks``."""
        self.setup_hooks()

    def hook_points(self) -> Iterable[HookPoint]:
        """Every ``HookPoint`` of the model."""
        return self.hook_dict.values()

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        """Every submodule by its name (TransformerLens's ``mod_dict``)."""
        return {name: module for name, module in self.named_modules() if name}

    # Name resolution -----------------------------------------------------------------
    def _why_no_hook(self, name: str) -> str:
        """Why this model has no site ``name``, when its architecture explains it ("" otherwise)."""
        return ""

    def _unknown(self, name: str) -> UnknownHookError:
        close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
        why = self._why_no_hook(name)
        hint = (f" ({why})" if why else "") + (f" Closest: {', '.join(close)}." if close else "")
        return UnknownHookError(
            f"this model has no hook point {name!r}.{hint} "
            f"See model.hook_dict for all {len(self.hook_dict)} names (e.g. 'blocks.0.hook_resid_pre')."
        )

    def resolve_hook_names(self, names: NameFilter) -> list[str]:
        """Hook names selected by a name, a list of names, a glob, or a predicate. A predicate
        never selects a site whose TransformerLens switch is off (``switched_off``): ported code
        such as ``lambda name: "_input" not in name`` then sees TransformerLens's sites and shapes."""
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if not self.switched_off(n) and names(n)]
        if isinstance(names, str):
            names = [names]
        selected: list[str] = []
        for name in names:
            if name in self.hook_dict:
                selected.append(name)
            elif any(c in name for c in "*?["):
                matches = fnmatch.filter(self.hook_dict, name)
                if not matches:
                    raise self._unknown(name)
                selected.extend(matches)
            else:
                raise self._unknown(name)
        return list(dict.fromkeys(selected))

    # Adding and removing -------------------------------------------------------------
    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook`` (``fn(activation, hook) -> new activation or None``) model-wide until
        ``reset_hooks()``: to the site ``name`` (a name, glob, or predicate on names), in direction
        ``dir`` ("fwd" or "bwd"), owned by context ``level``, kept by ``reset_hooks()`` when
        ``is_permanent``, run before the hooks already there when ``prepend``.
        """
        for n in self.resolve_hook_names(name):
            self.hook_dict[n].add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd") -> None:
        """Add a hook that ``reset_hooks`` keeps (``name``: a hook name or a filter; ``dir``: fwd or bwd)."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove the hooks (permanent ones too with ``including_permanent``).

        ``clear_contexts`` also forgets saved contexts; ``direction``: fwd, bwd or both;
        ``level``: only hooks of that context level.
        """
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)
            if clear_contexts:
                hp.clear_context()

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False) -> None:
        """Remove every hook in ``direction`` (fwd, bwd or both; permanent ones too with
        ``including_permanent``)."""
        self.reset_hooks(clear_contexts=False, direction=direction, including_permanent=including_permanent)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator["HookedRootModule"]:
        """Hooks that live for the ``with`` block (which gets the model); removed on exit, also after an exception.

        They are seen by the calling thread only (``add_hook`` attaches model-wide). Every name is
        checked before any hook is attached, so a typo attaches nothing. ``fwd_hooks`` and
        ``bwd_hooks``: ``(name, fn)`` pairs, a name being a name, a list, a glob or a predicate
        (backward hooks run on the site's gradient in ``backward()``). ``reset_hooks_end=False``
        keeps them until ``reset_hooks()``; ``clear_contexts`` also forgets, on exit, the
        contexts the hooks saved (``hook.ctx``).
        """
        resolved = [
            (self.resolve_hook_names(n), fn, d)
            for hooks, d in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd"))
            for n, fn in hooks
        ]
        for names, fn, _ in resolved:  # check all before attaching any
            _check_callable(fn, names[0] if names else "?")
        level = next(_LEVELS)
        scoped = dict(_SCOPED.get())
        added: list[tuple[HookPoint, _Hook]] = []
        for names, fn, d in resolved:
            for n in names:
                hp = self.hook_dict[n]
                entry = _Hook(fn, level, False, reads_only=getattr(fn, "reads_only", False))
                fwd, bwd = scoped.get(hp, ((), ()))
                scoped[hp] = (fwd + (entry,), bwd) if d == "fwd" else (fwd, bwd + (entry,))
                added.append((hp, entry))
        with _SCOPED_LOCK:
            for hp, _ in added:
                hp.n_scoped += 1
        _SCOPED.set(scoped)
        try:
            yield self
        finally:
            if reset_hooks_end:
                mine = {id(h) for _, h in added}
                _drop_scoped(lambda hp, h: id(h) not in mine)
                if clear_contexts:
                    for hp in self.hook_dict.values():
                        hp.clear_context()

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """One forward with temporary hooks (TransformerLens's signature): the forward of
        ``model_args`` and ``model_kwargs`` inside ``hooks(fwd_hooks, bwd_hooks, reset_hooks_end,
        clear_contexts)``. Backward hooks fire after this returns, so they need
        ``reset_hooks_end=False`` (ValueError otherwise).
        """
        if bwd_hooks and reset_hooks_end:
            raise ValueError(
                "bwd_hooks fire during backward(), after run_with_hooks returns and has removed them: "
                "pass reset_hooks_end=False and call model.reset_hooks() after backward(), or put "
                "forward and backward inside `with model.hooks(bwd_hooks=...)`"
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def cache_names(self, names_filter: NameFilter) -> list[str]:
        """The sites ``run_with_cache(names_filter=...)`` stores. With no filter: every site
        except those whose TransformerLens switch is off (``set_use_attn_result`` and friends:
        the per-head expansions, each n_heads copies of a residual, and ``hook_mlp_in``)."""
        if names_filter is None:
            return [n for n in self.hook_dict if not self.switched_off(n)]
        return self.resolve_hook_names(names_filter)

    def list_hooks(
        self, name_filter: NameFilter = None, dir: str = "both", including_permanent: bool = True
    ) -> dict[str, list[_Hook]]:
        """TransformerLens's ``list_hooks``: the hooks the calling thread sees, by site name, for
        the sites ``name_filter`` selects (None: all); sites without hooks are left out. ``dir``
        and ``including_permanent`` as in ``HookPoint.has_hooks``.
        """
        if name_filter is None or callable(name_filter):
            names = [n for n in self.hook_dict if name_filter is None or name_filter(n)]
        else:
            names = self.resolve_hook_names(name_filter)
        out = {name: self.hook_dict[name].list_hooks(dir, including_permanent) for name in names}
        return {name: hooks for name, hooks in out.items() if hooks}

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NameFilter = None,
        device: Any = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        detach: bool = True,
        return_cache_object: bool = True,
        pos_slice: Any = None,
        **model_kwargs: Any,
    ) -> tuple[Any, Any]:
        """Run forward and store the activations of the selected sites.

        The first call in a process lets glibc keep freed memory for reuse (``memory.keep_freed_memory``;
        opt out with ``keep_freed_memory(False)`` or ``TRANSFORMER_HOOKS_KEEP_FREED_MEMORY=0``).

        Args:
            *model_args: the forward's positional arguments.
            names_filter: a name, a list of names (globs allowed), or a predicate on names (None:
                every site whose TransformerLens switch is on; see ``cache_names``).
            device: move each activation there (None: where it is).
            remove_batch_dim: drop the batch dimension (ValueError unless the batch is one).
            incl_bwd: also call ``backward()`` on the output (a scalar, e.g. ``return_type="loss"``)
                and store each site's gradient as ``name + "_grad"``.
            reset_hooks_end: as in ``hooks``.
            clear_contexts: as in ``hooks``.
            detach: False keeps the autograd graph of cached activations.
            return_cache_object: a ``HookCache`` (True) or the plain dict.
            pos_slice: positions to keep, as TransformerLens's ``Slice`` (the query positions of
                attention scores and patterns); an int drops the position dim.
            **model_kwargs: the forward's keyword arguments.

        Returns:
            (the forward's output, the cache).
        """
        from .memory import keep_freed_memory_by_default  # memory imports nothing of ours

        keep_freed_memory_by_default()
        names = self.cache_names(names_filter)
        positions = Slice.unwrap(pos_slice)
        store: dict[str, torch.Tensor] = {}
        if remove_batch_dim:
            tokens = model_args[0] if model_args else model_kwargs.get("input")
            batch = (
                tokens.shape[0]
                if isinstance(tokens, torch.Tensor) and tokens.ndim >= 2
                else (len(tokens) if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str) else 1)
            )
            if batch != 1:
                raise ValueError(
                    f"remove_batch_dim=True needs a batch of one, got {batch}; index the cache per example instead"
                )

        def saver(key: str) -> HookFn:
            def save(act: torch.Tensor, hook: HookPoint) -> None:
                t = act.detach() if detach or key.endswith("_grad") else act
                if pos_slice is not None:
                    t = positions.apply(t, dim=_position_dim(hook.name, t))
                if remove_batch_dim:
                    t = t[0]
                store[key] = t if device is None else t.to(device)

            return reads_only(save)

        fwd = [(n, saver(n)) for n in names]
        bwd = [(n, saver(n + "_grad")) for n in names] if incl_bwd else []
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not (isinstance(out, torch.Tensor) and out.numel() == 1):
                    raise ValueError(
                        "incl_bwd=True needs a scalar output to call backward() on: "
                        "pass return_type='loss', or hook the gradients with bwd_hooks"
                    )
                out.backward()
        if not return_cache_object:
            return out, store
        return out, HookCache(store, has_batch_dim=not remove_batch_dim)
