"""Serving a model split over processes (``pipeline_ranks`` under torchrun): rank 0 serves,
the other ranks follow.

Every rank must make the same model calls. Before each batched forward, rank 0's worker
broadcasts the forward's requests (their JSON, never pickled) on the process group, and each
following rank checks and runs the same requests (``jobs.prepare_run`` / ``jobs.run_batch``):
the residual stream passes rank to rank, each rank's interventions fire on its own blocks, and
rank 0 gathers the cached sites. The other jobs (patch sweeps, attribution patching, DLA, the
logit lens, generate, params) go the same way: rank 0 broadcasts the job's kind and request
(``Leader.job``), and every rank runs the same ``jobs.run_*`` call; rank 0 answers, the
followers discard their result (None, or generate's tokens, which every rank gets).

Checks: rank 0 checks a job (``check``) before it broadcasts it, for every error rank 0
alone would meet in the middle of the job (a metric reading a position out of range or
outside ``metric_positions``, an unknown sweep, site or parameter, tokens out of range), so
no bad request leaves the followers waiting for a transfer that never comes. The checks the
library makes on every rank alike before any transfer (generate's context length, ...) may
fail after the broadcast: every rank raises, rank 0 answers 400, the followers log the error
and follow on; so do failures only rank 0 meets after the job's last transfer (decoding the
lens, assembling the DLA). A follower's exception never ends its follow loop. Not recovered: a
failure only one rank meets between two transfers of a job (out of memory, a bug): its peers
wait in that transfer until the pipeline's timeout (then raise ``RankFailedError``; a
follower logs it and follows on), and rank 0 answers 500; restart the server after one.

Cancellation: a job still queued when its client goes away (or its timeout passes) is
dropped, never broadcast. Once broadcast, a job is not cancelled: every rank runs it to the
end (rank 0 then discards the result), since rank 0 stopping alone would leave the followers
waiting in the middle of it. Runs are likewise never stopped mid-forward.

Heartbeat: when idle, rank 0 broadcasts a heartbeat every ``HEARTBEAT`` seconds, so the
followers' waits never reach the process group's timeout; on shutdown it tells them to stop.
While a job runs every rank is inside it (its transfers wait at most the pipeline's timeout,
30 minutes by default), so none is needed then.

Weights: DLA, the logit lens and params read weights of other ranks' blocks. Before such a job
every rank calls ``model.hold_weights`` for exactly the parameters rank 0 lacks and the job
reads (named in the broadcast). From the first DLA job on, rank 0 keeps a copy of every
block's ``attn.W_O`` and norm weights, of the final norm and of the unembedding (``W_U``,
``b_U``: d_model x d_vocab); from the first lens job on, of the final norm and the
unembedding. A params job's copies are dropped when it ends (rank 0 holds them only while it
runs and its answer is encoded), so asking for every parameter does not leave the whole model
on rank 0. ``/health`` reports the bytes of the copies rank 0 holds (``held_weight_bytes``).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel

from ..analysis.dla import dla_inputs
from ..analysis.lens import LENS_SITES
from ..protocol import HookedModel
from ..scale.process_group import broadcast_json
from ..utils import check_index
from . import jobs
from .schema import (
    AttributionRequest,
    DLARequest,
    GenerateRequest,
    LensRequest,
    ParamsRequest,
    PatchRequest,
    RunRequest,
)

__all__ = ["HEARTBEAT", "JOBS", "Leader", "check", "follow"]

HEARTBEAT = 60.0  # seconds between messages to idle followers

# Each job's request schema and the call every rank makes.
JOBS: dict[str, tuple[type[BaseModel], Callable[[HookedModel, Any], Any]]] = {
    "patch": (PatchRequest, jobs.run_patch),
    "attribution": (AttributionRequest, jobs.run_attribution),
    "dla": (DLARequest, jobs.run_dla),
    "lens": (LensRequest, jobs.run_lens),
    "generate": (GenerateRequest, jobs.run_generate),
    "params": (ParamsRequest, jobs.run_params),
}

# The weights DLA and the lens read (beyond the activations): W_O for each head's output, the
# norms for the cached scales (a post-norm passes each head's part), and the unembedding.
_HELD = {
    "dla": ("blocks.*.attn.W_O", "blocks.*.ln*", "ln_final.*", "unembed.*"),
    "lens": ("ln_final.*", "unembed.*"),
}


class Leader:
    """Rank 0's side: broadcasts what every rank runs next.

    Args:
        device: the device the broadcasts go through (the model's).
    """

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)

    def send(self, message: dict[str, Any]) -> None:
        """Broadcast ``message`` (a JSON object) to every rank."""
        broadcast_json(message, self.device)

    def forward(self, items: list[jobs.Prepared]) -> None:
        """Tell the followers to run the forward of ``items`` (the batch rank 0 runs now)."""
        self.send({"kind": "run", "requests": [p.request.model_dump(mode="json") for p in items]})

    def job(self, model: HookedModel, kind: str, req: BaseModel) -> Any:
        """Run the job ``kind`` (a key of ``JOBS``) of ``req`` on every rank; rank 0's result.

        ``req`` must have passed ``check``. The followers are told the job and the weights to
        hold first; every rank then calls ``model.hold_weights`` for those and runs the job.

        Args:
            model: the served model (rank 0's part).
            kind: the job.
            req: its request, checked.
        """
        if isinstance(req, ParamsRequest):
            patterns: Any = jobs.param_names([n for n, _ in model.named_parameters()], req.names)
        else:
            patterns = _HELD.get(kind, ())
        hold = _lacking(model, patterns)
        self.send({"kind": "job", "job": kind, "request": req.model_dump(mode="json"), "hold": hold})
        held: Any = model  # a HookedTransformer split over processes
        # A params job's copies go when it ends; DLA's and the lens's stay for the next one.
        dropped = {n: p for n, p in model.named_parameters() if n in hold} if kind == "params" else {}
        try:
            if hold:
                held.hold_weights(*hold)
            return JOBS[kind][1](model, req)
        finally:
            for name, p in dropped.items():
                module, _, leaf = name.rpartition(".")
                setattr(held.get_submodule(module), leaf, p)  # the meta parameter again: no memory


def _lacking(model: HookedModel, patterns: Any) -> list[str]:
    """The parameters matching ``patterns`` (globs) that this rank lacks (meta tensors)."""
    return [n for n, p in model.named_parameters() if p.is_meta and any(fnmatch.fnmatchcase(n, k) for k in patterns)]


def follow(model: HookedModel) -> None:
    """A following rank: run every forward and job rank 0 announces on ``model``, until it says
    stop. A run or job that fails here (as it did on rank 0) is logged; the loop goes on."""
    device = torch.device(model.device)
    while True:
        message = broadcast_json(None, device)
        kind = message["kind"]
        if kind == "stop":
            return
        try:
            if kind == "run":
                items = [jobs.prepare_run(model, RunRequest.model_validate(r)) for r in message["requests"]]
                jobs.run_batch(model, items, cancel=False)
            elif kind == "job":
                schema, run = JOBS[message["job"]]
                req = schema.model_validate(message["request"])
                if message["hold"]:
                    held: Any = model  # a HookedTransformer split over processes
                    held.hold_weights(*message["hold"])
                run(model, req)  # rank 0 answers; this rank's result (None, or generate's tokens) goes
        except Exception as e:
            what = message.get("job", kind)
            print(f"transformer-hooks serve: follower: {what} failed: {type(e).__name__}: {e}", file=sys.stderr)


# Checks before a job is broadcast ---------------------------------------------------------------
def check(model: HookedModel, kind: str, req: Any) -> None:
    """Raise ``jobs.BadRequest`` for a ``kind`` request ``req`` that would fail in the middle of
    its job on rank 0 alone (so it is never broadcast); nothing runs.

    Args:
        model: the served model.
        kind: the job (a key of ``JOBS``).
        req: its validated request.
    """
    if kind in ("patch", "attribution"):
        _check_sweep(model, kind, req)
    elif kind == "dla":
        _check_dla(model, req)
    elif kind == "lens":
        tokens, _ = jobs._tokens(model, req)
        unknown = [s for s in req.lens_sites or () if s not in LENS_SITES]
        if unknown:
            raise jobs.BadRequest(f"logit lens: unknown lens site(s) {unknown}; choose from {list(LENS_SITES)}")
        if req.pos is not None:
            _index(req.pos, tokens.shape[1], "lens position")
    elif kind == "generate":
        jobs.prepare_generate(model, req)
    elif kind == "params":
        jobs.param_names([n for n, _ in model.named_parameters()], req.names)


def _index(i: int, n: int, what: str) -> int:
    try:
        return check_index(i, n, what, f"tokens of {n} positions")
    except (ValueError, IndexError) as e:
        raise jobs.BadRequest(str(e)) from None


def _check_sweep(model: HookedModel, kind: str, req: Any) -> None:
    jobs._sweep(req.sweep, "get_act_patch_" if kind == "patch" else "get_attr_patch_")
    jobs._metric(model, req.metric)  # its tokens in range
    _, corrupted = jobs.pair_tokens(model, req)
    # The metric runs on rank 0 only (and with metric_positions, the sweep checks on rank 0 that it
    # reads no other position): check its position here.
    n_pos = corrupted.shape[1]
    pos = _index(req.metric.pos, n_pos, "metric position")
    positions = getattr(req, "metric_positions", None)
    if positions is not None and _index(positions, n_pos, "metric_positions") != pos:
        raise jobs.BadRequest(
            f"the metric reads position {req.metric.pos}, outside metric_positions={positions}; "
            f"make them the same, or drop metric_positions"
        )


def _check_dla(model: HookedModel, req: DLARequest) -> None:
    if model.tokenizer is None:
        raise jobs.BadRequest("DLA takes strings: this model has no tokenizer")
    try:
        dla_inputs(model, req.prompt, req.answer, req.contrast, req.pos)
    except (ValueError, IndexError) as e:
        raise jobs.BadRequest(f"dla: {e}") from None
