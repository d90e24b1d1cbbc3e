"""Tests that run the ranks of one ``torch.distributed`` group (gloo, on the CPU) as spawned
processes: a free port for the group's rendezvous, and starting the ranks and waiting for
them with a deadline (a rank still running at the deadline fails the test: it hung)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    target: Callable[..., None], args_of: Callable[[int], tuple], world: int = 2, timeout: float = 60
) -> list[int | None]:
    """Run ``target(*args_of(rank))`` in one spawned process per rank; the exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(rank)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [rank for rank, p in enumerate(procs) if p.exitcode is None]
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert not hung, f"ranks {hung} hung (still running after {timeout} s)"
    return [p.exitcode for p in procs]
