"""The collective steps of data-parallel SAE training (``train_sae`` under ``torchrun``).

Every rank holds the whole SAE and its optimiser and trains on its own share of each
global batch (``sae.stream``). After the backward pass the gradients are averaged over the
ranks (one all-reduce of one flat buffer, which also carries the step's logged scalars), so
each rank takes the same optimiser step on the same numbers: the weights stay identical on
every rank without being sent. What a step needs of the whole batch is reduced before it
is used: which features fired (the dead-feature counters), the mean squared error and the
ghost reconstruction's error (ghost gradients' scale), the error's variance (TopK's
auxiliary loss), BatchTopK's threshold over the whole batch, and the batch itself at a
resampling step (gathered in rank order, so every rank resamples alike).

With one process (``world == 1``) each step here is the identity and nothing is sent: the
one-process arithmetic is unchanged.

Averaging per-rank means equals the mean over the global batch because every rank's share
has the same number of rows; the sums are taken in another order than one process takes
them, so a run over ``n`` processes equals a one-process run with ``n`` times the batch
within float rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..scale.process_group import RankFailedError, all_gather_json, rank_and_world


class Ranks:
    """This process's place among the training processes and the reductions of a step."""

    def __init__(self, after_failure: str = "") -> None:
        """``after_failure``: what the error tells the user to do when another rank fails."""
        self.rank, self.world = rank_and_world()
        self.after_failure = after_failure

    @contextmanager
    def _collective(self) -> Iterator[None]:
        """A collective step; a peer that died or hung makes it a ``RankFailedError`` that says what to do."""
        try:
            yield
        except RuntimeError as e:
            raise RankFailedError(
                f"rank {self.rank} of {self.world}: SAE training stopped, another rank died or hung ({e}). "
                f"{self.after_failure}"
            ) from e

    @property
    def many(self) -> bool:
        """Whether there is more than one rank (with one, every step here is the identity)."""
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks (a new tensor; ``t`` itself with one process)."""
        if not self.many:
            return t
        t = t.detach().clone()
        with self._collective():
            dist.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of ``t``, a per-rank mean: the global batch's mean."""
        return self.sum(t) / self.world if self.many else t

    def average_gradients(self, params: Iterable[torch.nn.Parameter], *scalars: torch.Tensor) -> list[float]:
        """Replace every gradient of ``params`` by its mean over the ranks; return ``scalars``
        (per-rank means: the loss, ...) averaged likewise. One all-reduce."""
        if not self.many:
            return [float(s.detach()) for s in scalars]
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [s.detach().reshape(1).to(grads[0]) for s in scalars])
        with self._collective():
            dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset:].tolist()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows ``x`` [per_rank, ...] stacked in rank order: the global batch."""
        if not self.many:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        with self._collective():
            dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    def wait(self) -> None:
        """Wait for every rank (rank 0's files are written when every rank returns)."""
        if self.many:
            with self._collective():
                dist.barrier()

    def broadcast_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Rank 0's values in ``params`` on every rank (a start that is the same everywhere)."""
        if self.many:
            with torch.no_grad(), self._collective():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def batch_top(self, pre: torch.Tensor, k_total: int) -> torch.Tensor:
        """BatchTopK over the global batch: the ``k_total`` largest of every rank's ``pre``
        (non-negative), sorted descending, the same on every rank."""
        local = pre.detach().flatten()
        local = local.topk(min(k_total, local.numel())).values
        if not self.many:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        with self._collective():
            dist.all_gather(parts, local)
        everything = torch.cat(parts)
        return everything.topk(min(k_total, everything.numel())).values

    def agree(self, what: str, value: Any, fix: str) -> None:
        """Raise on every rank unless every rank holds the same ``value`` of ``what`` (JSON: sent
        as text, never pickled); the error ends with ``fix``, what to do."""
        if not self.many:
            return
        with self._collective():
            values = all_gather_json(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise RankFailedError(
                f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank {odd[0]} has {values[odd[0]]!r}. {fix}"
            )
