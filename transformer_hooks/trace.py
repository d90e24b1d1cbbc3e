"""A for-loop over the forward pass: each activation in forward order, readable and replaceable.

    for site in model.trace(tokens):
        if site.name == "blocks.1.attn.hook_z":
            site.value = site.value * mask          # replaces the activation downstream
        if site.name == "blocks.2.hook_resid_pre":
            break                                   # stops the forward here

It is the model's own forward, not a second implementation: the forward runs in a worker
thread with one hook on every traced site, and each hook hands its activation to the loop
and waits for the loop body to finish with it (a strict handoff: one side runs at a time,
so the forward is the same sequence of operations as ``run_with_hooks``). Hooks already on
the model fire as usual, before the trace sees the site (the trace sees what they return).

After a loop that ran to the end, ``trace.output`` holds what the forward returned (the
logits by default). Breaking out of the loop, or an exception in its body, stops the
forward at the current site; either way the worker is joined and its hooks removed before
control returns to the code after the loop. Replacing a value with a tensor of another
shape, dtype or device raises ``HookShapeError`` naming the site, at the assignment.

Which sites: ``names_filter`` as in ``run_with_cache`` (default: every site the default
cache holds, i.e. not the per-head expansions, which change the computation's layout).
The calling thread's grad and inference mode, autocast and intra-op thread count are carried
into the worker (``torch.no_grad()`` or ``torch.autocast(...)`` around the loop apply), so
the forward runs in the same dtypes as ``run_with_hooks`` and ``run_with_cache``.

Equal to what, to the bit: the trace equals ``run_with_hooks`` with hooks on the same sites
(tested). ``run_with_cache`` differs from it by float rounding (about 5e-7 on the test models):
the cache's savers only read, so attention and norms compute the output on their fast path and
show the savers the explicitly computed values (``hooks.HookPoint.only_read``), while the
trace's hooks may replace a value and so take the explicit path. It does not equal
``run_with_hooks`` with no hooks at all: an observed site turns off the fast path that would
skip it (a layer whose ``hook_pattern`` is observed runs the explicit softmax attention
instead of the fused ``scaled_dot_product_attention`` kernel; see components/attention.py),
and the two paths differ by float rounding, 3.1e-5 at most on the default model's logits
(fp32, measured), as ``run_with_cache`` differs from a plain forward.

nnsight's form, ``with model.trace(prompt): ... .save()``, is not this API: entering a
trace as a context manager raises a ``TypeError`` that shows the loop that does the same.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import HookPoint, HookShapeError, NameFilter
from .protocol import HookedModel


class _Stop(BaseException):
    """Raised inside the forward to end it early (not an Exception: user code won't catch it)."""


@dataclass
class TracedSite:
    """One activation of the forward: ``name``, ``layer`` (None outside blocks) and ``value``.

    Assigning ``value`` replaces the activation for the rest of the forward."""

    name: str
    layer: int | None
    _value: torch.Tensor
    _replaced: bool = False
    _halt: Any = None  # stops the forward before a bad assignment raises

    @property
    def value(self) -> torch.Tensor:
        """The activation; assigning a tensor of the same shape, dtype and device replaces it."""
        return self._value

    @value.setter
    def value(self, new: torch.Tensor) -> None:
        """Replace the activation by ``new`` (HookShapeError unless shape, dtype and device match)."""
        old = self._value
        if not isinstance(new, torch.Tensor):
            raise HookShapeError(f"trace: the value of {self.name} must be a tensor, got {type(new).__name__}")
        for what, a, b in (("shape", tuple(new.shape), tuple(old.shape)), ("dtype", new.dtype, old.dtype),
                           ("device", new.device, old.device)):  # fmt: skip
            if a != b:
                if self._halt is not None:
                    self._halt()
                raise HookShapeError(
                    f"trace: the replacement for {self.name} has {what} {a}, but the activation has {what} {b}; "
                    f"assign a tensor of the same shape, dtype and device"
                )
        self._value = new
        self._replaced = True

    @property
    def tensor(self) -> torch.Tensor:
        """The activation (read only; ``value`` to replace it)."""
        return self._value


class Trace:
    """Iterable over the sites of one forward of ``model`` on ``args`` and ``kwargs`` (the
    forward's arguments), visiting the sites ``names_filter`` selects (see the module docstring)."""

    def __init__(self, model: HookedModel, *args: Any, names_filter: NameFilter = None, **kwargs: Any) -> None:
        self.model = model
        self.args, self.kwargs = args, kwargs
        self.names = model.cache_names(names_filter)  # an unknown name raises here
        self.output: Any = None
        self.finished = False
        self.worker_threads: int | None = None  # the intra-op thread count the forward ran with
        self._used = False

    def __enter__(self) -> Any:
        raise TypeError(
            "model.trace(...) is a for-loop over the forward's activations, not nnsight's context manager. "
            "Instead of\n"
            "    with model.trace(prompt):\n"
            "        z = model.blocks[1].attn.hook_z.output.save()\n"
            "        model.blocks[2].hook_resid_pre.output[:] = 0\n"
            "write\n"
            "    for site in model.trace(prompt):\n"
            "        if site.name == 'blocks.1.attn.hook_z':\n"
            "            z = site.value.clone()                      # read (nnsight's .save())\n"
            "        if site.name == 'blocks.2.hook_resid_pre':\n"
            "            site.value = torch.zeros_like(site.value)   # write\n"
            "or, for reads only, logits, cache = model.run_with_cache(prompt)."
        )

    def __exit__(self, *exc: Any) -> None:  # pragma: no cover  (__enter__ always raises)
        return None

    def __iter__(self) -> Iterator[TracedSite]:
        if self._used:
            raise RuntimeError("a Trace runs its forward once; call model.trace(...) again for another")
        self._used = True
        return self._run()

    def _run(self) -> Iterator[TracedSite]:
        to_loop: queue.Queue = queue.Queue(maxsize=1)  # worker -> loop: ("site", TracedSite) | ("done"|"error", x)
        to_worker: queue.Queue = queue.Queue(maxsize=1)  # loop -> worker: "go" | "stop"
        state_of_caller = _thread_state()

        def handoff(act: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            site = TracedSite(hook.name, hook.layer_idx, act)
            to_loop.put(("site", site))
            if to_worker.get() == "stop":
                raise _Stop
            return site.value if site._replaced else None

        def work() -> None:
            try:
                with _entered(state_of_caller):
                    self.worker_threads = torch.get_num_threads()
                    out = self.model.run_with_hooks(
                        *self.args, fwd_hooks=[(n, handoff) for n in self.names], **self.kwargs
                    )
                to_loop.put(("done", out))
            except _Stop:
                to_loop.put(("stopped", None))
            except BaseException as e:  # noqa: BLE001  (handed to the loop's thread, re-raised there)
                to_loop.put(("error", e))

        # The worker runs in a copy of the caller's context, so the hooks the caller's thread has
        # scoped (a surrounding `with model.hooks(...)`) fire in the traced forward too.
        context = contextvars.copy_context()
        worker = threading.Thread(target=context.run, args=(work,), name="transformer_hooks.trace", daemon=True)
        state = {"waiting": False}  # the worker is blocked in a hook, waiting for the loop

        def halt() -> None:
            # break, or an exception in the loop body: end the forward where it is.
            if state["waiting"]:
                state["waiting"] = False
                to_worker.put("stop")
                while to_loop.get()[0] == "site":  # pragma: no cover  (a stopped forward reaches no site)
                    to_worker.put("stop")
            worker.join()

        worker.start()
        try:
            while True:
                kind, payload = to_loop.get()
                if kind == "site":
                    state["waiting"] = True
                    payload._halt = halt
                    yield payload
                    if not state["waiting"]:  # halted by a bad assignment that was caught
                        return
                    state["waiting"] = False
                    to_worker.put("go")
                    continue
                if kind == "done":
                    self.output, self.finished = payload, True
                elif kind == "error":
                    raise payload
                return
        finally:
            halt()


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _thread_state() -> dict[str, Any]:
    """The calling thread's torch state that a forward depends on and a new thread would not
    inherit: grad and inference mode, autocast (per device type), and the intra-op thread
    count (OpenMP's is per thread: a new thread would use the machine's default, and GEMMs
    blocked for another thread count round differently, ~3e-5 on the default model)."""
    autocast = {}
    for device in _AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(device):
            autocast[device] = torch.get_autocast_dtype(device)
    return {
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "autocast": autocast,
        "cache_enabled": torch.is_autocast_cache_enabled(),
        "threads": torch.get_num_threads(),
    }


class _entered:
    """Enter ``state`` (from ``_thread_state``) in the worker thread, for the forward."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.stack: list[Any] = []

    def __enter__(self) -> None:
        torch.set_num_threads(self.state["threads"])
        # built one at a time, in order: set_grad_enabled acts when constructed, not when entered
        makers: list[Any] = [lambda: torch.inference_mode(self.state["inference"])]
        makers.append(lambda: torch.set_grad_enabled(self.state["grad"]))
        for device, dtype in self.state["autocast"].items():
            makers.append(
                lambda device=device, dtype=dtype: torch.autocast(
                    device, dtype=dtype, cache_enabled=self.state["cache_enabled"]
                )
            )
        for make in makers:
            manager = make()
            manager.__enter__()
            self.stack.append(manager)

    def __exit__(self, *exc: Any) -> None:
        while self.stack:
            self.stack.pop().__exit__(*exc)


def trace(model: HookedModel, *args: Any, names_filter: NameFilter = None, **kwargs: Any) -> Trace:
    """``for site in trace(model, tokens): ...``: every activation of one forward, in order.

    ``args`` / ``kwargs`` are the forward's (``return_type``, ``attention_mask``, ...);
    ``names_filter`` selects the sites visited (None: those ``run_with_cache`` caches)."""
    return Trace(model, *args, names_filter=names_filter, **kwargs)
