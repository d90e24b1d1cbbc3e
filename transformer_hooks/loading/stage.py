"""One rank's part of a model split over processes (loading/pipeline.py): ``PipelineStage``
moves the residual stream, the output, caches, gradients and the values the workflows need
between ranks, with point-to-point transfers that each wait at most a timeout.

Transfers carry any dtype bit for bit (as bytes); a dict of named tensors goes as its names,
dtypes and shapes (JSON, never pickle) and then the bytes of each. With grad enabled the
forward's transfers are autograd nodes (``_Sent`` / ``_Received``), so the gradient of rank
0's metric flows back rank by rank (``PipelineStage.grad``).
"""

from __future__ import annotations

import datetime
import json
import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..scale.process_group import RankFailedError
from ..scale.resume import tensor_hash
from .groups import group_of

PipelineMap = dict[str, int]  # {placement group: rank}


class PipelineStage:
    """One rank's part of a model split over processes (see loading/pipeline.py's module docstring).

    Args:
        layout: {group: rank} (``pipeline_map``).
        rank: this process's rank.
        device: this rank's device.
        timeout: how long a transfer may wait for another rank (``RankFailedError`` past it).
    """

    def __init__(self, layout: PipelineMap, rank: int, device: Any, timeout: datetime.timedelta) -> None:
        self.map = dict(layout)
        self.rank = rank
        self.ranks = max(layout.values()) + 1
        self.device = torch.device(device)
        self.dtype = torch.float32  # set by the loader to the weights' dtype
        self.timeout = timeout
        n_layers = len(layout) - 2
        # the owner of each step of the forward: block L at index L, the final norm at n_layers
        self._owners = [layout[f"blocks.{L}"] for L in range(n_layers)] + [layout["final"]]
        self.new_forward()

    def owns(self, group: str) -> bool:
        """Whether this rank holds the placement group ``group``."""
        return self.map[group] == self.rank

    def __repr__(self) -> str:
        return f"PipelineStage(rank {self.rank} of {self.ranks}, {[g for g in self.map if self.owns(g)]})"

    # The forward ---------------------------------------------------------------------------
    def enter(self, layer: int, resid: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The residual stream entering block ``layer`` (``n_layers``: the final norm) on this rank, or
        None if another rank runs it. At a boundary, the rank that ran block ``layer - 1`` sends
        the stream it holds (``resid``) and the owner of ``layer`` receives it into a tensor of ``shape``.
        """
        owner, what = self._owners[layer], f"the residual stream entering {layer}"
        if owner == self.rank:
            if resid is None:
                resid = self._recv_new(shape, self.dtype, self._owners[layer - 1] if layer > 0 else 0, what)
            return resid
        if resid is not None:
            self._send_tracked(resid, owner, what)
        return None

    # Gradients across ranks: with grad enabled (the same on every rank, as every rank runs the
    # same script), every transfer of the forward is an autograd node. A sent tensor leaves a
    # 0-d stand-in in the sender's graph whose backward receives the tensor's gradient from
    # the receiver; a received tensor's backward sends its gradient back. ``grad`` runs each
    # rank's part of the backward in the order the gradients travel (rank 0's metric first).
    def _send_tracked(self, t: torch.Tensor, dst: int, what: str) -> None:
        if not torch.is_grad_enabled():
            self._send(t, dst, what)
            return
        # The receiver sends a gradient back all the same: an anchor (an input of every grad call)
        # makes the stand-in's backward run, and take it, even when nothing here depends on ``t``
        # (a frozen model, this rank holding none of the inputs).
        anchor = torch.zeros((), requires_grad=True)
        self._anchors.append(anchor)
        self._roots.append(_Sent.apply(t, anchor, self, dst, what))

    def _recv_new(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, what: str) -> torch.Tensor:
        if not torch.is_grad_enabled():
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self._recv(t, src, what)
            return t
        anchor = torch.zeros((), requires_grad=True)  # makes the received tensor a node of the graph
        self._anchors.append(anchor)
        return _Received.apply(anchor, self, src, shape, dtype, what)

    def new_forward(self) -> None:
        """Forget the last forward's transfers (and with them its graph)."""
        self._roots: list[torch.Tensor] = []
        self._anchors: list[torch.Tensor] = []

    def grad(self, value: torch.Tensor | None, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """d value / d inputs for the inputs on this rank (``value``: rank 0's scalar, None on the
        others), every rank calling it after the same forward: each receives the gradient of what
        it sent, runs its blocks' backward and sends the gradient of what it received."""
        roots = ([] if value is None else [value]) + self._roots
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        for root in roots:
            got = torch.autograd.grad(root, list(inputs) + self._anchors, allow_unused=True)
            for i, g in enumerate(got[: len(inputs)]):
                before = grads[i]
                if g is not None:
                    grads[i] = g if before is None else before + g
        self.new_forward()
        return grads

    def check_same_input(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Raise on every rank alike unless every rank's ``tokens`` and ``attention_mask`` equal rank 0's."""
        mine = torch.tensor([*tokens.shape, _fingerprint(tokens), _fingerprint(attention_mask)], dtype=torch.int64)
        every = [torch.empty_like(mine, device=self.device) for _ in range(self.ranks)]
        self._wait(dist.all_gather(every, mine.to(self.device), async_op=True), "the forward's input", None)
        differ = [rank for rank, theirs in enumerate(every) if not torch.equal(theirs.cpu(), every[0].cpu())]
        if differ:
            raise ValueError(
                f"the ranks of this model split over processes were given different inputs: rank(s) {differ} "
                f"differ from rank 0 in their tokens or attention mask. Every rank runs the same forward, so every "
                f"rank must pass the same input (as torchrun runs one script): seed random draws alike on every "
                f"rank, or call model.blocks.same_random_state() first to give every rank rank 0's random state"
            )

    def take_input(self, layer: int, resid: torch.Tensor | None) -> torch.Tensor | None:
        """The residual stream ``resid`` given with ``start_at_layer=layer``: kept by the rank that
        runs block ``layer`` (where ``stop_at_layer=layer`` left it), dropped by the others."""
        if self._owners[layer] != self.rank:
            return None
        if resid is None:
            raise ValueError(
                f"start_at_layer={layer}: rank {self.rank} runs block {layer} of this model split over processes, "
                f"but its input is a meta tensor; give the residual stream on this rank (every rank may pass the "
                f"same tensor; model(..., stop_at_layer={layer}) leaves it here)"
            )
        return resid

    def deliver(self, out: Any, everyone: bool = False) -> Any:
        """The forward's output ``out`` on rank 0 (sent there by the last rank), None on the others;
        with ``everyone`` (generation: each rank's loop reads the logits), on every rank.
        """
        last = self.ranks - 1
        if last == 0:
            return out
        if everyone:
            return self._deliver_to_all(out)
        tracked = torch.is_grad_enabled()  # the logits carry the gradient back (attribution patching)
        if self.rank == last:
            if isinstance(out, tuple):
                self._send_named({"0": out[0], "1": out[1]}, 0, "the output")
            elif tracked and out is not None:
                self._send_named({"tracked": out}, 0, "the output", sends=lambda _: False)
                self._send_tracked(out, 0, "the output")
            else:
                self._send_named({} if out is None else {"out": out}, 0, "the output")
            return None
        if self.rank != 0:
            return None
        got = self._recv_named(last, "the output")
        if "1" in got:
            return got["0"], got["1"]
        if "tracked" in got:
            return self._recv_new(tuple(got["tracked"].shape), got["tracked"].dtype, last, "the output")
        return got.get("out")

    def _deliver_to_all(self, out: Any) -> Any:
        last = self.ranks - 1
        if self.rank == last:
            named = {} if out is None else {"0": out[0], "1": out[1]} if isinstance(out, tuple) else {"out": out}
            for rank in range(last):
                self._send_named(named, rank, "the output")
            return out
        got = self._recv_named(last, "the output")
        return (got["0"], got["1"]) if "1" in got else got.get("out")

    def share_random_state(self) -> None:
        """Rank 0's random state on every rank (the CPU generator, this rank's CUDA device's, and
        Python's ``random``), so that sampling from the same logits, shuffling the same data or
        drawing prompts picks the same everywhere."""
        version, internal, gauss = random.getstate()
        states = {
            "cpu": torch.get_rng_state(),
            "python": torch.tensor([version, *internal], dtype=torch.int64),
            "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        }
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.rank == 0:
            for rank in range(1, self.ranks):
                self._send_named(states, rank, "the random state")
            return
        got = self._recv_named(0, "the random state")
        torch.set_rng_state(got["cpu"].cpu())
        if "cuda" in got:
            torch.cuda.set_rng_state(got["cuda"].cpu(), self.device)
        py, gauss_next = got["python"].tolist(), float(got["python_gauss"])
        random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss_next) else gauss_next))

    def gather_cache(self, store: dict[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor] | None:
        """Every rank's cached activations ``store``, on rank 0 in the order of the forward (on
        ``device`` if given, as ``run_with_cache(device=...)``); None elsewhere.
        """
        if self.rank != 0:
            self._send_named(store, 0, "its cached activations")
            return None
        merged = dict(store)
        for rank in range(1, self.ranks):
            received = self._recv_named(rank, "its cached activations")
            merged.update(received if device is None else {k: v.to(device) for k, v in received.items()})
        return merged

    # Values that cross ranks for the workflows (components/stack.py's BlockStack API) ---------
    def owner_of(self, name: str) -> int:
        """The rank that runs a hook name, or holds a parameter name (``groups.group_of``)."""
        return self.map[group_of(name)]

    def to_owners(self, tensors: dict[str, torch.Tensor] | None, what: str) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` (keyed by hook or parameter name), each on the rank that owns
        its name; every other rank gets a meta tensor of its shape and dtype in its place.
        ``what`` names the tensors in a transfer's error."""
        if self.rank != 0:
            return self._recv_named(0, what)
        assert tensors is not None, "rank 0 gives the tensors"
        for rank in range(1, self.ranks):
            owned = {k for k in tensors if self.owner_of(k) == rank}
            self._send_named(tensors, rank, what, sends=owned.__contains__)
        return {k: v if self.owner_of(k) == 0 else torch.empty_like(v, device="meta") for k, v in tensors.items()}

    def share(self, tensors: dict[str, torch.Tensor] | None, what: str) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` on every rank; ``what`` names them in a transfer's error."""
        if self.rank != 0:
            return self._recv_named(0, what)
        assert tensors is not None, "rank 0 gives the tensors"
        for rank in range(1, self.ranks):
            self._send_named(tensors, rank, what)
        return tensors

    def from_owners(
        self, tensors: dict[str, torch.Tensor], names: list[str], what: str
    ) -> dict[str, torch.Tensor] | None:
        """The tensors ``names`` (parameter or hook names; each rank's ``tensors`` hold those it
        owns) on rank 0, in that order, each from its owner; None on the other ranks. ``what``
        names them in a transfer's error."""
        if self.rank != 0:
            self._send_named({k: v for k, v in tensors.items() if self.owner_of(k) == self.rank}, 0, what)
            return None
        got = {k: v for k, v in tensors.items() if self.owner_of(k) == 0}
        for rank in range(1, self.ranks):
            got.update(self._recv_named(rank, what))
        return {k: got[k] for k in names}

    # Transport -------------------------------------------------------------------------------
    def _wait(self, work: Any, what: str, peer: int | None) -> None:
        """Wait for ``work`` (a transfer of ``what`` with rank ``peer``; None: with every rank)."""
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            other = "the other ranks" if peer is None else f"rank {peer}"
            raise RankFailedError(
                f"rank {self.rank} of a model split over {self.ranks} processes: exchanging {what} with {other} "
                f"failed within {self.timeout} ({other} died, hung or failed; see its log): {e}. "
                f"No output was returned."
            ) from e

    def _send(self, t: torch.Tensor, dst: int, what: str) -> None:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device)  # any dtype, bit for bit
        self._wait(dist.isend(data, dst), what, dst)

    def _recv(self, into: torch.Tensor, src: int, what: str) -> None:
        data = torch.empty(into.numel() * into.element_size(), dtype=torch.uint8, device=self.device)
        self._wait(dist.irecv(data, src), what, src)
        into.copy_(data.view(into.dtype).view(into.shape))

    def _send_named(
        self, tensors: dict[str, torch.Tensor], dst: int, what: str, sends: Callable[[str], bool] | None = None
    ) -> None:
        """Names, dtypes and shapes (JSON, its length first), then the bytes of each tensor
        ``sends`` keeps (default: all; the receiver makes meta tensors of the others)."""
        sent = {k: sends is None or sends(k) for k in tensors}
        meta = json.dumps(
            [[k, str(v.dtype).removeprefix("torch."), list(v.shape), sent[k]] for k, v in tensors.items()]
        )
        encoded = torch.tensor(list(meta.encode()), dtype=torch.uint8)
        self._send(torch.tensor([encoded.numel()], dtype=torch.int64), dst, what)
        self._send(encoded, dst, what)
        for k, t in tensors.items():
            if sent[k]:
                self._send(t, dst, what)

    def _recv_named(self, src: int, what: str) -> dict[str, torch.Tensor]:
        n = torch.empty(1, dtype=torch.int64)
        self._recv(n, src, what)
        encoded = torch.empty(int(n), dtype=torch.uint8)
        self._recv(encoded, src, what)
        out = {}
        for name, dtype, shape, sent in json.loads(bytes(encoded.tolist()).decode()):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device if sent else "meta")
            if sent:
                self._recv(t, src, what)
            out[name] = t
        return out


def _fingerprint(t: torch.Tensor | None) -> int:
    """A 60-bit content hash of ``t`` (``resume.tensor_hash``: its dtype, shape and bytes); -1 for None."""
    return -1 if t is None else int(tensor_hash(t)[:15], 16)


class _Sent(torch.autograd.Function):
    """Sends a tensor in the forward (its stand-in: a 0-d zero); receives its gradient in the backward."""

    @staticmethod
    def forward(
        ctx: Any, t: torch.Tensor, anchor: torch.Tensor, stage: PipelineStage, peer: int, what: str
    ) -> torch.Tensor:
        stage._send(t, peer, what)
        ctx.stage, ctx.peer, ctx.what, ctx.shape, ctx.dtype = stage, peer, what, tuple(t.shape), t.dtype
        return t.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple:
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.stage.device)
        ctx.stage._recv(grad, ctx.peer, f"the gradient of {ctx.what}")
        return (grad if ctx.needs_input_grad[0] else None), None, None, None, None


class _Received(torch.autograd.Function):
    """Receives a tensor in the forward; sends its gradient back in the backward."""

    @staticmethod
    def forward(
        ctx: Any, anchor: torch.Tensor, stage: PipelineStage, peer: int, shape: tuple, dtype: torch.dtype, what: str
    ) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=stage.device)
        stage._recv(t, peer, what)
        ctx.stage, ctx.peer, ctx.what = stage, peer, what
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        ctx.stage._send(grad, ctx.peer, f"the gradient of {ctx.what}")
        return None, None, None, None, None, None
