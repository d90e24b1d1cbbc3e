"""Layer ranges across processes: a model larger than one machine, one contiguous range of
blocks per rank of a ``torch.distributed`` process group (``torchrun``; gloo on CPU, NCCL
on GPU), ``from_pretrained(..., pipeline_ranks=k)``.

    rank 0        embed, blocks [0, b1)      --resid-->
    rank 1        blocks [b1, b2)             --resid-->   ...
    rank k-1      blocks [b_{k-1}, n), final norm + unembed   --output, cache-->  rank 0

Each rank reads and holds only its own groups' weights; the other groups' parameters stay
on the meta device (no memory), and their tensors are never read from the checkpoint.
Every rank runs the model's one forward with the same input (as ``torchrun`` runs the same
script): it skips the blocks it does not own, and ``PipelineStage.enter``, called by the
model's block loop, passes the residual stream [batch, pos, d_model] to the next rank with
point-to-point ``send``/``recv`` at a stage boundary. Its shape and dtype are known to
both sides (the input's batch and length, the model's width and dtype), so only the data
moves. Hooks fire on the rank that owns the site (a hook added on every rank for a site of
another rank's block never fires there). The output (logits, loss, both) and the caches of
``run_with_cache`` are sent to rank 0; the other ranks return None.

The residual stream entering each block is bit for bit what one process computes (the
blocks and their inputs are the same), so logits and caches equal a one-process run.
``stop_at_layer=L`` leaves the stream on the rank that runs block L (a meta tensor of its
shape stands in on the others), and ``start_at_layer=L`` reads its input there, so the two
compose on every rank alike.

The workflows run on a split model when every rank calls them alike (as torchrun runs one
script), with one process's results (tested with two and three gloo processes, fp32, within
1e-6): the ``get_act_patch_*`` sweeps and the stacked batch engine (each site's clean
activation goes from rank 0's cache to the rank that runs the site; the metric runs on rank
0), ablations, steering (``steering_vector`` and ``steering_coeff`` on rank 0; ``steering``
shares them), ``generate`` (each rank keeps the KV cache of its own blocks, the logits of
each step go to every rank, and a generation starts by giving every rank rank 0's random
state, so every rank samples the same tokens), attribution patching (AtP, AtP*, GradDrop,
``attribution_products``) and EAP / EAP-IG: with grad enabled every transfer is an autograd
node, so the gradient of rank 0's metric flows back rank by rank (``BlockStack.grad``;
every tracked send anchors its stand-in among the inputs of ``grad``, so a rank takes the
gradient of what it sent even when none of its own inputs depend on it).
``process_weights_`` processes each rank's own groups (every step works within one: ``W_E``
is centred on rank 0, ``ln_final`` folded into ``W_U`` on the last rank).
Circuit evaluation (``run_circuit``, ``evaluate_circuit``) runs the clean forward one rank's
range of blocks at a time (``BlockStack.process_boundaries``); between ranges the senders'
outputs computed so far go to every rank, so each receiver reads the current run's senders
of earlier ranks (the corrupted run's senders and rank 0's circuit are shared with every
rank). Path patching sends each layer's frozen z from rank 0's caches to the rank that runs
it; the receivers' inputs are recorded and patched there. Distributed alignment search
(``train_das``, ``evaluate_das``): the source activations (and, for a residual site, the
base run's resumed input) go from rank 0's cache to the rank that runs the intervention's
hook, the gradient of rank 0's loss crosses back to the rotation there, and at the end of
``train_das`` every rank's intervention is made the trained one. SAEs: ``splice_sae``, the
SAE's own sites ``<site>.hook_sae_*`` (they belong to the site's block: hooks on them fire
on its rank, and ``run_with_cache`` brings them to rank 0), ``steer_with_feature`` and
``evaluate_sae``, every rank holding the same SAE (``site_width`` measures on the site's rank
and shares the width, so ``check_sae_fits`` passes or fails on every rank alike).
TransformerLens's evaluations (``tl.evals``) and ``utils.test_prompt`` give every rank rank
0's random state first (``BlockStack.same_random_state``), so shuffled loaders and drawn
prompts are the same batches everywhere. ``harvest`` (scale/harvest.py) runs as one harvest:
every rank runs every batch, each batch's sites go to rank 0, and rank 0 alone writes the
shards and manifest, byte for byte a one-process harvest's (its resume key hashes every
rank's weights); the data-parallel ``gather_caches`` and ``patching_sweep`` refuse a split
model, naming the per-prompt call, and ``train_sae(model, ...)`` trains on the rows rank 0
gathers and shares. The HTTP server serves such a model too
(``torchrun --nproc-per-node k -m transformer_hooks serve --pipeline-ranks k``): rank 0
checks each request, then broadcasts it as JSON and every rank runs the same forward or job
(remote/pipeline.py).

Inputs: every rank must pass the same input to a forward (the last rank computes a loss
against its own tokens, and every rank masks and places positions by its own mask). Each
forward compares a fingerprint of every rank's tokens and mask (one small all-gather) and,
if any differ from rank 0's, raises the same ``ValueError`` on every rank.

Results: rank 0 gets each result (the output, the cache, a sweep's values, a steering
vector, an attribution graph) and the other ranks None, as ``run_with_cache``; a call that
takes such a result (a clean cache, a reference cache, a steering vector) accepts None on
the other ranks. ``generate`` returns the tokens on every rank. The values that cross ranks
for the workflows do so through the stack's ``to_sites`` / ``share`` / ``from_sites`` /
``grad`` / ``same_random_state`` (components/stack.py; on one process they hand values back
unchanged).

Weights: another rank's weights are meta tensors here. ``model.hold_weights(*names)``, called
on every rank, gives rank 0 a copy of every block's named parameters (each sent by its
owner), after which the weight views (``W_Q``, ``QK``, ``W_U``, ...) and the cache's
weight-reading methods (``stack_head_results``, ``logit_attrs``, ...) work there; without it,
reading a weight this rank lacks raises ``WeightNotHeldError`` naming that call. Not
available: ``run_with_cache(incl_bwd=True)`` (use the attribution functions),
``model.trace`` (a break on one rank would leave the others waiting: use hooks), moving the
model with ``.to``, placement over devices and offload within a rank.

Failure: every transfer waits at most ``timeout``; a rank that dies (its connection
closes) or hangs makes its peers raise ``RankFailedError`` (``process_group``, re-exported
by ``distributed``) naming it, and no output is returned.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import sites
from ..components.stack import BlockStack, Placement
from ..config import ModelConfig
from ..scale.process_group import DEFAULT_TIMEOUT, RankFailedError, init_distributed, launched_by_torchrun, local_device
from ..scale.process_group import shard_bounds as _bounds
from .build import OneDevice
from .groups import group_names, group_of

PipelineMap = dict[str, int]


class PipelineError(ValueError):
    """A pipeline layout that cannot work (the process group does not match, too many ranks)."""


def pipeline_map(n_layers: int, ranks: int) -> PipelineMap:
    """{group: rank} for ``n_layers`` blocks over ``ranks`` processes: contiguous ranges of blocks
    (sizes differ by at most one), ``embed`` with the first, ``final`` (final norm and
    unembedding) with the last.
    """
    rank_of_block = [rank for rank in range(ranks) for _ in range(*_bounds(n_layers, rank, ranks))]
    ends = {"embed": 0, "final": ranks - 1}
    return {g: rank_of_block[L] if (L := sites.layer_of(g)) is not None else ends[g] for g in group_names(n_layers)}


def join_pipeline(
    cfg: ModelConfig, ranks: int, device: Any = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> "PipelineStage":
    """This process's stage of a ``ranks``-stage pipeline for a model of config ``cfg``, checked
    before any weight is read.

    Joins the process group ``torchrun`` describes if it is not joined yet
    (``distributed.init_distributed``, with ``timeout``). ``device``: this rank's device
    (None: ``local_device()``); ``timeout``: how long a rank waits for another.
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise PipelineError(f"pipeline_ranks must be a positive int, got {ranks!r}")
    if ranks > cfg.n_layers:
        raise PipelineError(
            f"pipeline_ranks={ranks} is more than this model's {cfg.n_layers} blocks; each rank holds at "
            f"least one block: use pipeline_ranks <= {cfg.n_layers}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        if not launched_by_torchrun():
            raise PipelineError(
                f"pipeline_ranks={ranks} splits the model over {ranks} processes of torch.distributed, which "
                f"is not initialised: launch with `torchrun --nproc-per-node {ranks} script.py` (or call "
                f"torch.distributed.init_process_group / transformer_hooks.scale.process_group.init_distributed first)"
            )
        init_distributed(timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != ranks:
        raise PipelineError(
            f"pipeline_ranks={ranks}, but the process group has {world} rank(s); each rank holds one stage: "
            f"launch {ranks} processes (torchrun --nproc-per-node {ranks}) or pass pipeline_ranks={world}"
        )
    return PipelineStage(pipeline_map(cfg.n_layers, ranks), rank, device or local_device(), timeout)


class PipelineBlocks(BlockStack):
    """The block stack of one rank: runs its own blocks, passes the residual stream across
    stage boundaries, embeds only on the first rank, runs the head only on the last, and
    delivers the output (and caches) to rank 0. ``blocks``: the model's blocks (the others'
    on the meta device); ``stage``: this rank's ``PipelineStage``.
    """

    def __init__(self, blocks: Any, stage: "PipelineStage") -> None:
        placement = Placement("pipeline", pipeline_map=dict(stage.map), rank=stage.rank, device=str(stage.device))
        super().__init__(blocks, placement)
        self.stage = stage

    _generating = False  # the current forward has a KV cache: its output goes to every rank

    def check_same_input(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Every rank's forward must see rank 0's ``tokens`` and ``attention_mask``: the last rank computes a loss
        against its own tokens and every rank masks and places positions by its own mask, so a
        rank given another input (its own random draw, its own shuffle) would silently change the
        result. Each rank's fingerprint of them goes to every rank (one small all-gather), and on a
        difference every rank raises alike (``BlockStack.check_same_input``)."""
        self.stage.check_same_input(tokens, attention_mask)

    def run_embed(self, embed: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """``embed()`` on the rank that holds the embeddings; elsewhere a meta tensor of ``shape``."""
        if self.stage.owns("embed"):
            return embed()
        return torch.empty(shape, dtype=self.stage.dtype, device="meta")  # another rank embeds: only the shape goes on

    def forward(
        self, resid: torch.Tensor, mask: Any, rope: list[Any], start: int, stop: int, past_kv_cache: Any = None
    ) -> torch.Tensor:
        """Blocks ``start`` .. ``stop - 1`` as ``BlockStack.forward`` (``resid``, ``mask``, ``rope``,
        ``past_kv_cache``), each on the rank that holds it, the residual stream sent across stage
        boundaries; a meta tensor on ranks that do not hold the result.
        """
        shape = tuple(resid.shape)
        held = None if resid.is_meta else resid
        self._generating = past_kv_cache is not None
        if self._generating and past_kv_cache.length == 0:
            self.stage.share_random_state()  # a new generation: every rank samples what rank 0 samples
        self.stage.new_forward()
        held = self.stage.take_input(start, held)  # the embedding, or start_at_layer's input, where `start` runs
        for layer in range(start, stop):
            held = self.stage.enter(layer, held, shape)  # the stream crosses to the next rank here
            if held is not None:
                kv = past_kv_cache[layer] if past_kv_cache is not None else None  # each rank caches its blocks
                held = self[layer](held, mask, rope[layer], kv)
        held = self.stage.enter(stop, held, shape)
        return torch.empty(shape, dtype=self.stage.dtype, device="meta") if held is None else held

    @property
    def gets_output(self) -> bool:
        """Rank 0 gets the output (``BlockStack.gets_output``)."""
        return self.stage.rank == 0

    def process_boundaries(self) -> list[int]:
        """The first block of each rank's range but rank 0's (``BlockStack.process_boundaries``)."""
        owner = [self.stage.map[f"blocks.{L}"] for L in range(len(self))]
        return [L for L in range(1, len(owner)) if owner[L] != owner[L - 1]]

    @property
    def processes(self) -> int:
        """The number of ranks this model is split over (``BlockStack.processes``)."""
        return self.stage.ranks

    def to_sites(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` on the ranks that run their hooks (``BlockStack.to_sites``)."""
        return self.stage.to_owners(tensors, "activations for the hooks of its blocks")

    def share(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` on every rank (``BlockStack.share``)."""
        return self.stage.share(tensors, "values every rank needs")

    def same_random_state(self) -> None:
        """Rank 0's random state on every rank (``BlockStack.same_random_state``)."""
        self.stage.share_random_state()

    def hold_weights(self, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """On rank 0, copies of the ``named`` parameters it lacks (meta here), each from its
        owner; empty on the other ranks (``BlockStack.hold_weights``)."""
        got = self.stage.from_owners({k: p.detach() for k, p in named.items()}, list(named), "its blocks' weights")
        return {} if got is None else {k: t for k, t in got.items() if named[k].is_meta}

    def grad(self, value: torch.Tensor | None, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """d ``value`` (rank 0's) / d each rank's ``inputs``, the backward crossing the ranks
        (``BlockStack.grad``)."""
        return self.stage.grad(value, inputs)

    def from_sites(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor] | None:
        """The ``names`` of each rank's ``tensors`` on rank 0, None elsewhere (``BlockStack.from_sites``)."""
        return self.stage.from_owners(tensors, names, "results of its blocks")

    def run_head(self, head: Any, resid: torch.Tensor) -> Any:
        """``head(resid)`` on the last rank, delivered to rank 0 (to every rank while generating)."""
        return self.stage.deliver(None if resid.is_meta else head(resid), everyone=self._generating)

    def gather_cache(self, store: dict[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor] | None:
        """Every rank's cached activations ``store`` on rank 0 (on ``device`` if given); None elsewhere."""
        return self.stage.gather_cache(store, device)

    def block_devices(self, default: torch.device) -> list[torch.device]:
        """This rank's blocks on its device; the others' KV caches on the meta device (no memory);
        ``default`` is not used.
        """
        meta = torch.device("meta")
        return [self.stage.device if self.stage.owns(f"blocks.{L}") else meta for L in range(len(self))]


class Pipelined(OneDevice):
    """The load of one rank of a pipeline: only this rank's groups are read (the others stay
    on the meta device), on the device of ``stage``.
    """

    shares_embeddings = False  # the embeddings and the unembedding live on different ranks

    def __init__(self, stage: PipelineStage) -> None:
        super().__init__(stage.device)
        self.stage = stage

    def reads(self, group: str) -> bool:
        """Whether this rank holds ``group``."""
        return self.stage.owns(group)

    def attach(self, model: Any) -> None:
        """Install ``PipelineBlocks`` on ``model``."""
        model.blocks = PipelineBlocks(model.blocks, self.stage)


class PipelineStage:
    """One rank's part of a model split over processes (see the module docstring).

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
    """A 63-bit content hash of ``t`` (its shape, dtype and bytes); -1 for None."""
    if t is None:
        return -1
    data = t.detach().contiguous().cpu()
    digest = hashlib.blake2b(f"{tuple(data.shape)}{data.dtype}".encode(), digest_size=8)
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


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
