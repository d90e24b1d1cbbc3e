"""Hook points and the hook registry.

A ``HookPoint`` is an identity on the forward path that users can observe or edit with
``fn(activation, hook) -> activation | None`` (TransformerLens's signature). An
unobserved hook point costs one attribute check, and components ask ``hook.observed``
before doing work that only an observer needs (the explicit attention pattern,
per-head results, per-head inputs).

``HookedRootModule`` gives a model the registry: ``hook_dict``, ``add_hook``,
``reset_hooks``, the ``hooks()`` context manager, ``run_with_hooks`` and
``run_with_cache``. Hooks added inside a context are removed when it exits, on success
or on any exception, so a failing hook never stays attached. It works for any module
built from ``HookPoint``s (an SAE, a toy model): ``run_with_cache`` returns a plain
``HookCache`` of tensors by name, which ``HookedTransformer`` wraps in its
``ActivationCache``. Which transformer sites exist, their axes and which are per-head
expansions is ``sites.py``'s table.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import sites
from .sites import PER_HEAD_EXPANSIONS  # noqa: F401  (re-exported: its old home)
from .utils import Slice

HookFn = Callable[..., Any]
logger = logging.getLogger(__name__)
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class UnknownHookError(ValueError):
    """A hook name that the model does not have."""


class HookShapeError(ValueError):
    """A hook function returned a tensor that cannot replace the activation."""


@dataclass
class _Hook:
    fn: HookFn
    level: int | None  # the hooks() context that added it; None for add_hook()
    permanent: bool


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
    """An observable, editable site of the computation. Identity until hooked."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.fwd_hooks: list[_Hook] = []
        self.bwd_hooks: list[_Hook] = []
        self.ctx: dict[Any, Any] = {}  # scratch space shared by this site's hooks (TL compatible)

    @property
    def observed(self) -> bool:
        return bool(self.fwd_hooks or self.bwd_hooks)

    def add_hook(
        self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, level: int | None = None, prepend: bool = False
    ) -> None:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        _check_callable(fn, self.name)
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        entry = _Hook(fn, level, is_permanent)
        hooks.insert(0, entry) if prepend else hooks.append(entry)

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False, level: int | None = None) -> None:
        def keep(h: _Hook) -> bool:
            if h.permanent and not including_permanent:
                return True
            return level is not None and h.level != level

        if dir in ("fwd", "both"):
            self.fwd_hooks = [h for h in self.fwd_hooks if keep(h)]
        if dir in ("bwd", "both"):
            self.bwd_hooks = [h for h in self.bwd_hooks if keep(h)]

    def clear_context(self) -> None:
        self.ctx = {}

    # nn.Module.__call__ adds a few microseconds per call; a model has ~30 sites per layer
    # and a decoding step is short, so the unobserved path bypasses it.
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fwd_hooks or self.bwd_hooks):
            return x
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for h in list(self.fwd_hooks):
            out = h.fn(x, hook=self)
            if out is not None:
                self._check_replacement(x, out, h.fn)
                x = out
        if self.bwd_hooks and x.requires_grad:
            x.register_hook(self._run_bwd)
        return x

    def _run_bwd(self, grad: torch.Tensor) -> torch.Tensor:
        for h in list(self.bwd_hooks):
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
        return f"name={self.name!r}, fwd={len(self.fwd_hooks)}, bwd={len(self.bwd_hooks)}"

    @property
    def layer_idx(self) -> int | None:
        """The block this site belongs to (None outside blocks), as TL's ``hook.layer()``."""
        parts = self.name.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" else None

    def layer(self) -> int | None:
        return self.layer_idx


def _position_dim(name: str, act: torch.Tensor) -> int:
    """Where the (query) position is in a cached activation (with its batch axis): the site
    table's position axis; [batch, pos, ...] for a site that is not a transformer's."""
    dim = sites.position_dim(name)
    return 1 if dim is None else dim


class HookCache:
    """Activations by hook name: what ``HookedRootModule.run_with_cache`` returns for any
    hooked module (``HookedTransformer`` wraps it in ``ActivationCache``).

    Dict-like (``cache[name]``, ``keys``, ``items``, ``values``, ``len``, ``in``), with
    ``to(device)`` and ``remove_batch_dim()``; the tensors are in ``cache_dict``.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.has_batch_dim = has_batch_dim

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.cache_dict:
            close = difflib.get_close_matches(str(key), list(self.cache_dict), n=3, cutoff=0.5)
            raise KeyError(
                f"{key!r} is not in this cache{' (closest: ' + ', '.join(close) + ')' if close else ''}; "
                f"it holds {len(self.cache_dict)} activations (see cache.keys())"
            )
        return self.cache_dict[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"{type(self).__name__} with {len(self)} activations: {list(self.cache_dict)}"

    def to(self, device: Any) -> "HookCache":
        """Move every activation to ``device``, in place."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "HookCache":
        """A new cache (of the same class) of some examples of the batch: an int, a (start, stop)
        tuple, a slice or indices, as ``utils.Slice``; an int index drops the batch dim."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension to slice")
        batch_slice = Slice.unwrap(batch_slice)
        sliced = copy.copy(self)
        sliced.cache_dict = {k: batch_slice.apply(v, dim=0) for k, v in self.cache_dict.items()}
        sliced.has_batch_dim = batch_slice.mode != "int"
        return sliced

    def remove_batch_dim(self) -> "HookCache":
        """Drop the batch dimension of a batch-of-one cache, in place."""
        if not self.has_batch_dim:
            logger.warning("remove_batch_dim: this cache has no batch dimension already")
            return self
        sizes = {v.shape[0] for v in self.cache_dict.values() if v.ndim > 0}
        if sizes - {1}:
            raise ValueError(
                f"remove_batch_dim needs a batch of one; this cache has batch size {max(sizes)}. "
                f"Use cache.apply_slice_to_batch_dim(i) to keep one example"
            )
        self.cache_dict = {k: v[0] if v.ndim > 0 else v for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self


class HookedRootModule(nn.Module):
    """Registry of a model's hook points, keyed by TransformerLens names."""

    # Per-head expansions (relative names from sites.PER_HEAD_EXPANSIONS) that run_with_cache()
    # stores when no names_filter is given; set through TransformerLens's set_use_attn_result & co.
    cached_expansions: frozenset[str] = frozenset()

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
        """Hook names selected by a name, a list of names, a glob, or a predicate."""
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if names(n)]
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
        """Attach ``hook`` to one site (a name) or every site a predicate accepts. Stays until
        ``reset_hooks()``."""
        for n in self.resolve_hook_names(name):
            self.hook_dict[n].add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)
            if clear_contexts:
                hp.clear_context()

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False) -> None:
        self.reset_hooks(clear_contexts=False, direction=direction, including_permanent=including_permanent)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator["HookedRootModule"]:
        """Hooks that live for the ``with`` block; removed on exit, also after an exception.

        Every name is checked before any hook is attached, so a typo attaches nothing.
        """
        resolved = [
            (self.resolve_hook_names(n), fn, d)
            for hooks, d in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd"))
            for n, fn in hooks
        ]
        for names, fn, _ in resolved:  # check all before attaching any
            _check_callable(fn, names[0] if names else "?")
        self._hook_level += 1
        level = self._hook_level
        try:
            for names, fn, d in resolved:
                for n in names:
                    self.hook_dict[n].add_hook(fn, dir=d, level=level)
            yield self
        finally:
            if reset_hooks_end:
                for hp in self.hook_dict.values():
                    hp.remove_hooks("both", level=level)
                    if clear_contexts:
                        hp.clear_context()
            self._hook_level -= 1

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """One forward with temporary hooks (TransformerLens signature)."""
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
        except the per-head expansions (each is n_heads copies of a residual) that are not
        switched on (``set_use_attn_result`` and friends)."""
        if names_filter is None:
            return [
                n
                for n in self.hook_dict
                if not sites.is_per_head_expansion(n) or sites.split_name(n)[1] in self.cached_expansions
            ]
        return self.resolve_hook_names(names_filter)

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

        ``names_filter``: a name, a list of names (globs allowed), or a predicate on names.
        ``incl_bwd``: also call ``backward()`` on the output (a scalar, e.g.
        ``return_type="loss"``) and store each site's gradient as ``name + "_grad"``.
        ``detach=False`` keeps the autograd graph of cached activations.
        ``pos_slice`` (an int, a (start, stop) tuple, a slice or indices, as TransformerLens's
        ``Slice``) keeps only those positions: the query positions of attention scores and
        patterns. An int drops the position dim, as in TransformerLens.
        """
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

            return save

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
