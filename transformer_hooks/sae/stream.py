"""The rows an SAE trains on, batch by batch: one global order that does not depend on the
number of processes, and each rank's share of every batch.

Global batch ``t`` holds ``per_rank * world`` rows; rank ``r`` takes its positions
``[r * per_rank, (r + 1) * per_rank)``. A one-process run with ``per_rank * world`` rows a
batch therefore sees the same rows as the ranks together, side by side.

A tensor: a seeded permutation of all its rows an epoch (it is in memory already).

A harvested ``ActivationDataset`` is streamed, never loaded whole: its shards are grouped,
in their order, into windows of at most ``window`` rows (a shard larger than that is a
window of its own); an epoch visits the windows in a seeded order and each window's rows
in a seeded order of their own, one stream across windows and epochs (no row dropped).
What a rank holds: the permutation of one window (8 bytes a row), the rows of its own
share of the current batch, read from the shards' memory maps, and those maps only for the
shards of the current batch's windows (the others are closed as the stream moves on); it
reads no other rank's rows, and a batch touches the shards of at most two windows (when a
window holds at least a global batch, as the default does for any batch up to 2^20 rows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

DEFAULT_WINDOW = 1 << 20  # rows a shuffle window spans (its permutation: 8 MiB)


def shard_windows(dataset: Any, window: int) -> list[tuple[int, int]]:
    """The dataset's row ranges [lo, hi) that are shuffled together: consecutive whole shards
    of at most ``window`` rows in all (one shard if it alone is larger)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"shuffle_window must be a number of rows >= 1, got {window!r}")
    windows: list[tuple[int, int]] = []
    lo = hi = 0
    for entry in dataset.manifest["shards"]:
        n = int(entry["n_rows"])
        if hi > lo and hi - lo + n > window:
            windows.append((lo, hi))
            lo = hi
        hi += n
    if hi > lo:
        windows.append((lo, hi))
    return windows


def dataset_order(windows: list[tuple[int, int]], seed: int, global_batch: int) -> Iterator[np.ndarray]:
    """Endless global batches of row numbers (int64 [global_batch]) over the dataset's ``windows``
    (``shard_windows``), shuffled by ``seed``: see the module docstring."""
    carry = np.empty(0, dtype=np.int64)
    epoch = 0
    while True:
        for w in np.random.default_rng([seed, epoch]).permutation(len(windows)):
            lo, hi = windows[int(w)]
            rows = lo + np.random.default_rng([seed, epoch, int(w) + 1]).permutation(hi - lo)
            carry = np.concatenate([carry, rows])
            while len(carry) >= global_batch:
                yield carry[:global_batch]
                carry = carry[global_batch:]
        epoch += 1


def tensor_order(n_rows: int, seed: int, global_batch: int) -> Iterator[torch.Tensor]:
    """Endless global batches (``global_batch`` rows) of row numbers of a tensor of ``n_rows``
    rows: a permutation seeded by ``seed`` an epoch, its last short batch dropped (all rows
    when there are fewer than a batch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(n_rows, generator=gen).split(global_batch):
            if len(idx) == global_batch or n_rows < global_batch:
                yield idx


class RankBatches:
    """This rank's batches [per_rank, d_in] of ``source`` (a tensor or an ``ActivationDataset``),
    in the global order of the module docstring. ``skip(n)`` passes ``n`` batches without
    reading their rows (a resumed run).

    Args:
        source: a tensor [n, d_in] or an ``ActivationDataset``.
        site: the dataset's site to read (None: its only one; ignored for a tensor).
        per_rank: rows per batch on this rank.
        seed: the seed of the order (the same on every rank).
        device: where the rows go.
        rank: this rank (it reads rows ``[rank * per_rank, (rank + 1) * per_rank)`` of each global batch).
        world: the number of ranks.
        window: rows shuffled together (whole shards; see ``shard_windows``).
    """

    def __init__(
        self,
        source: Any,
        site: str | None,
        per_rank: int,
        seed: int,
        device: Any,
        rank: int = 0,
        world: int = 1,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.lo, self.hi = rank * per_rank, (rank + 1) * per_rank
        self.device = device
        self.read: Callable[[Any], torch.Tensor]
        if isinstance(source, torch.Tensor):
            self.order: Iterator[Any] = tensor_order(source.shape[0], seed, per_rank * world)
            self.read = lambda idx: source[idx].to(device)
        else:
            windows = shard_windows(source, window)
            self.order = dataset_order(windows, seed, per_rank * world)
            self.read = functools.partial(self._read_streaming, source, site)
            self.window_starts = np.array([lo for lo, _ in windows])
            shard_starts = np.cumsum([0] + [e["n_rows"] for e in source.manifest["shards"]])
            self.window_shards = [  # windows are whole shards: window w holds shards [first, last)
                range(int(np.searchsorted(shard_starts, lo)), int(np.searchsorted(shard_starts, hi)))
                for lo, hi in windows
            ]

    def _read_streaming(self, dataset: Any, site: str | None, idx: Any) -> torch.Tensor:
        """The rows ``idx``; then the maps of shards outside this batch's windows are closed."""
        out = dataset.rows(idx, site, self.device)
        touched = np.unique(np.searchsorted(self.window_starts, idx, side="right") - 1)
        dataset.release(i for w in touched for i in self.window_shards[int(w)])
        return out

    def skip(self, n: int) -> None:
        """Pass ``n`` batches without reading their rows."""
        for _ in range(n):
            next(self.order)

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> torch.Tensor:
        return self.read(next(self.order)[self.lo : self.hi])
