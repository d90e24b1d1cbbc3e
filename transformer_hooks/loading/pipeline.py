"""Layer ranges across processes: a model larger than one machine, one contiguous range of
blocks per rank of a ``torch.distributed`` process group (``torchrun``; gloo on CPU, NCCL
on GPU), ``from_pretrained(..., pipeline_ranks=k)``.

    rank 0        embed, blocks [0, b1)      --resid-->
    rank 1        blocks [b1, b2)             --resid-->   ...
    rank k-1      blocks [b_{k-1}, n), final norm + unembed   --output, cache-->  rank 0

Each rank reads and holds only its own groups' weights; the other groups' parameters stay
on the meta device (no memory), and their tensors are never read from the checkpoint.
Every rank runs the model's one forward with the same input (as ``torchrun`` runs the same
script): it skips the blocks it does not own, and ``PipelineStage.enter`` (stage.py), called by the
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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import sites
from ..components.stack import BlockStack, Placement
from ..config import ModelConfig
from ..scale.process_group import DEFAULT_TIMEOUT, init_distributed, launched_by_torchrun, local_device
from ..scale.process_group import shard_bounds as _bounds
from .build import OneDevice
from .groups import group_names
from .stage import PipelineMap, PipelineStage


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
