"""Serving a model split over processes (``pipeline_ranks`` under torchrun): rank 0 serves,
the other ranks follow.

Every rank must make the same model calls. Before each batched forward, rank 0's worker
broadcasts the forward's requests (their JSON, never pickled) on the process group, and each
following rank checks and runs the same requests (``jobs.prepare_run`` / ``jobs.run_batch``):
the residual stream passes rank to rank, each rank's interventions fire on its own blocks, and
rank 0 gathers the cached sites. When idle, rank 0 broadcasts a heartbeat now and then, so the
followers' waits never reach the process group's timeout; on shutdown it tells them to stop.

Only ``run`` requests (forwards with sites and interventions) and tokenizing are served this
way. The sweeps, attribution patching, generate and the weight views do run on a split model
when every rank's script calls them (loading/pipeline.py), but the server does not yet
announce them to the followers.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from ..protocol import HookedModel
from . import jobs
from .schema import RunRequest

__all__ = ["HEARTBEAT", "Leader", "follow"]

HEARTBEAT = 60.0  # seconds between messages to idle followers


class Leader:
    """Rank 0's side: broadcasts what every rank runs next.

    Args:
        device: the device the broadcasts go through (the model's).
    """

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)

    def send(self, message: dict[str, Any]) -> None:
        """Broadcast ``message`` (a JSON object) to every rank."""
        data = json.dumps(message).encode()
        dist.broadcast(torch.tensor([len(data)], dtype=torch.long, device=self.device), src=0)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), src=0)

    def forward(self, items: list[jobs.Prepared]) -> None:
        """Tell the followers to run the forward of ``items`` (the batch rank 0 runs now)."""
        self.send({"kind": "run", "requests": [p.request.model_dump(mode="json") for p in items]})


def _receive(device: torch.device) -> dict[str, Any]:
    n = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(n, src=0)
    data = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.cpu().tolist()))


def follow(model: HookedModel) -> None:
    """A following rank: run every forward rank 0 announces on ``model``, until it says stop."""
    device = torch.device(model.device)
    while True:
        message = _receive(device)
        if message["kind"] == "stop":
            return
        if message["kind"] == "run":
            items = [jobs.prepare_run(model, RunRequest.model_validate(r)) for r in message["requests"]]
            jobs.run_batch(model, items, cancel=False)
