"""The ``torch.distributed`` process group that ``torchrun`` describes, and the few
collective steps the data-parallel workflows share (``distributed`` for prompts,
``activations`` for harvesting a corpus): this rank and the world size, a contiguous
share of ``n`` items, a barrier that names a rank that died, and a status exchange after
which every rank knows whether every other rank succeeded.

Without an initialised process group (plain ``python``) rank is 0 of 1 and nothing here
talks to anyone.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import torch
import torch.distributed as dist

# How long a rank that finished its shard waits for the others. A rank that dies is noticed
# at once (its connections close); the timeout catches one that hangs. It must exceed the
# spread of the ranks' finishing times, which grows with the length of the run.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class RankFailedError(RuntimeError):
    """Another rank of the process group failed; the message names it and its error."""

    pass


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment, if any, and return
    (rank, world size); (0, 1) when run without torchrun. The backend is NCCL when CUDA
    is available, else gloo; ``timeout`` bounds every collective (a dead peer fails the
    others within it instead of hanging them)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched_by_torchrun():
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def refuse_split_model(model: Any, workflow: str, instead: str) -> None:
    """Raise ``ValueError`` if ``model`` is split over processes (``pipeline_ranks``): the
    data-parallel ``workflow`` gives each rank its own inputs, while every rank of a split
    model must run the same forward (the ranks would deadlock or mix inputs). Every rank
    calls it alike, so every rank raises, naming what to do ``instead``."""
    if model.blocks.processes > 1:
        raise ValueError(
            f"{workflow} is data-parallel (each rank of the process group takes its own share of the work), but "
            f"this model is split over {model.blocks.processes} processes (pipeline_ranks), whose ranks must all "
            f"run the same forward. Instead: {instead}; or load the model whole on each rank (no pipeline_ranks)"
        )


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of ``n`` items that ``rank`` of ``world`` takes (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def barrier(timeout: datetime.timedelta, consequence: str = "No result was gathered.") -> None:
    """Wait for every rank; gloo names a rank that does not arrive within ``timeout``.
    ``consequence``: what the error tells the user was (not) done about it."""
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        except RuntimeError as e:
            raise RankFailedError(
                f"rank {dist.get_rank()}: not every rank reached the end of its shard within "
                f"{timeout} (a rank died or hung): {e}. {consequence}"
            ) from e
    else:
        dist.barrier()


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order, each rank calling it alike. ``value`` is JSON (None,
    numbers, strings, lists, dicts with string keys; a tuple comes back a list) and travels as
    UTF-8 bytes in tensors: nothing between ranks is pickled (``all_gather_object`` would
    unpickle what another process sent)."""
    device = local_device()
    data = json.dumps(value).encode()
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(n.item()) for n in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # JSON text is never empty
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, mine.to(device))
    return [json.loads(bytes(p[: int(n.item())].cpu().numpy())) for p, n in zip(parts, sizes, strict=True)]


def broadcast_json(value: Any, device: Any = None) -> Any:
    """Rank 0's ``value`` on every rank, each rank calling it alike (the others' ``value`` is not
    read). JSON as ``all_gather_json``'s, as UTF-8 bytes in tensors on ``device`` (None: this
    rank's, ``local_device``), never pickled."""
    device = local_device() if device is None else torch.device(device)
    if dist.get_rank() == 0:
        data = json.dumps(value).encode()
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=device), src=0)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), src=0)
        return value
    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(n, src=0)
    received = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(received, src=0)
    return json.loads(bytes(received.cpu().numpy()))


def exchange(error: str | None, payload: Any, *, timeout: datetime.timedelta, what: str, consequence: str) -> list[Any]:
    """Every rank's ``payload`` in rank order, once every rank got here (``barrier``) and
    none reported an ``error``; otherwise every rank raises ``RankFailedError`` naming the
    rank that failed and its error (``what`` it was doing, the ``consequence``); a rank whose
    error is a ``RankFailedError`` (it failed because another did) is named last. ``timeout``:
    how long a rank waits for the others. ``payload`` is JSON (``all_gather_json``)."""
    barrier(timeout, consequence)
    reports = all_gather_json([error, payload])
    # The rank that failed first-hand is named, not one that failed because another did.
    failed = sorted(
        ((r, err) for r, (err, _) in enumerate(reports) if err is not None),
        key=lambda f: f[1].startswith(RankFailedError.__name__),
    )
    if failed:
        r, err = failed[0]
        others = f" (and ranks {[f for f, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise RankFailedError(f"rank {r}{others} failed {what}. {consequence} Its error: {err}")
    return [payload for _, payload in reports]
