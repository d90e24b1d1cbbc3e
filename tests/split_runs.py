"""A workflow on a model split over processes, in tests: ``on_ranks(run, world, args, directory)``
launches ``world`` gloo processes (spawned, one thread each) that each call ``run(world, *args)``
and save what it returns; ``one_process(run, *args)`` calls ``run(1, *args)`` here, with one
thread as the ranks, for comparison. ``run`` is a module-level function (the spawned ranks
import it by name) that loads its model with ``load(path, world)``. ``comparison(run, ...)``
makes a test module's two fixtures from these: ``one_process`` and ``ranks`` (2 and 3)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ranks import free_port, run_ranks

from transformer_hooks import HookedTransformer


def load(path: str, world: int, **kwargs: Any) -> HookedTransformer:
    """The checkpoint ``path`` split over ``world`` ranks (``world`` > 1), else in one process."""
    return HookedTransformer.from_pretrained(path, **({"pipeline_ranks": world} if world > 1 else {}), **kwargs)


def _rank_main(rank: int, world: int, port: int, out: str, run: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run(world, *args), f"{out}.rank{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def on_ranks(run: Callable[..., Any], world: int, args: tuple, directory: Path, timeout: float = 150) -> list[Any]:
    """Each rank's ``run(world, *args)`` of one launch of ``world`` gloo processes, in rank order."""
    out, port = str(Path(directory) / "results"), free_port()
    codes = run_ranks(_rank_main, lambda rank: (rank, world, port, out, run, args), world=world, timeout=timeout)
    assert codes == [0] * world, codes
    return [torch.load(f"{out}.rank{r}") for r in range(world)]


def one_process(run: Callable[..., Any], *args: Any) -> Any:
    """``run(1, *args)`` in this process, with one thread (as the ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(1, *args)
    finally:
        torch.set_num_threads(threads)


def close(got: Any, want: Any, what: str) -> None:
    """``got`` is given and equals ``want`` within 1e-6 (absolute)."""
    assert got is not None, what
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=what)


def comparison(run: Callable[..., Any], *checkpoints: str) -> tuple[Any, Any]:
    """A test module's fixtures ``one_process`` (``run`` in this process) and ``ranks`` ((world,
    each rank's results) of one launch of 2, then 3, gloo processes), ``run`` being given the
    paths of the module's fixtures named ``checkpoints``. Use: ``one_process, ranks = comparison(...)``."""

    @pytest.fixture(scope="module", name="one_process")
    def one_process_fixture(request: Any) -> Any:
        return one_process(run, *(request.getfixturevalue(c) for c in checkpoints))

    @pytest.fixture(scope="module", name="ranks", params=[2, 3], ids=["2-ranks", "3-ranks"])
    def ranks_fixture(request: Any, tmp_path_factory: Any) -> tuple[int, list[Any]]:
        world, paths = request.param, tuple(request.getfixturevalue(c) for c in checkpoints)
        return world, on_ranks(run, world, paths, tmp_path_factory.mktemp(f"ranks{world}"))

    return one_process_fixture, ranks_fixture
