"""The block stack: how a model's blocks run, and the record of where its weights are.

The model's forward is input -> ``blocks.run_embed`` -> ``blocks(...)`` -> ``blocks.run_head``;
``BlockStack`` runs every block in order on the device its weights are on. An execution
mode set up by ``loading/`` installs its own stack holding the same block modules (so
every parameter and hook keeps its name) and its ``Placement`` record:

- ``loading/placement.py``: ``PlacedBlocks``, each block on its own device (the residual
  stream, mask and rotary tables move to a block's device before it runs, and nowhere else);
- ``loading/offload.py``: block weights kept off the compute device, brought in by
  pre-forward hooks on each block (the plain stack runs them);
- ``loading/pipeline.py``: ``PipelineBlocks``, one range of blocks per process.

The stack also moves the values a workflow needs between processes (``gets_output``,
``processes``, ``process_boundaries``, ``to_sites``, ``share``, ``from_sites``, ``grad``,
``hold_weights``, ``same_random_state``): on one process they hand values back unchanged;
split over processes, the pipeline's stack sends them rank to rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .kv_cache import KVCache
from .masks import AttentionMask

PlacementKind = Literal["one device", "devices", "offload", "pipeline"]


@dataclass(frozen=True)
class Placement:
    """Where a model's weights are and how its blocks run (set by ``loading/``; read-only).

    ``kind``: "one device" (the default), "devices" (``device_map``: {group: device} over
    the groups ``embed``, ``blocks.{L}``, ``final``), "offload" (``offload``: "cpu" or
    "disk", blocks brought to ``device`` as they run), or "pipeline" (``pipeline_map``:
    {group: rank}, this process being ``rank``). ``device``: where inputs go when it is not
    where the embeddings are (a pipeline rank's device, an offload's compute device)."""

    kind: PlacementKind = "one device"
    device_map: Mapping[str, str] | None = None
    pipeline_map: Mapping[str, int] | None = None
    rank: int | None = None
    offload: Literal["cpu", "disk"] | None = None
    offload_dir: str | None = None
    device: str | None = None


ONE_DEVICE = Placement()


class WeightNotHeldError(RuntimeError):
    """A weight this process does not hold (a meta tensor): another rank of a model split over
    processes holds it."""


def held(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t``, or a clear error if it is a meta tensor: the weight ``name`` is held by another
    rank of a model split over processes (``pipeline_ranks``)."""
    if t.is_meta:
        leaf = name.split(".", 2)[2] if name.startswith("blocks.") and name.count(".") >= 2 else name
        call = f"model.hold_weights({leaf!r})" if "." in leaf else "model.hold_weights()"
        raise WeightNotHeldError(
            f"{name} is not held by this process: on a model split over processes (pipeline_ranks) each rank "
            f"holds only its own blocks' weights. Call {call} on every rank first: rank 0 then holds a copy "
            f"of every block's (model.hold_weights() copies them all)"
        )
    return t


class BlockStack(nn.ModuleList):
    """The model's blocks (an ``nn.ModuleList``: ``blocks[L]`` is block L), run in order
    where their weights are. Subclasses (execution modes, installed by ``loading/``) change
    where blocks, the embeddings and the head run; the model's forward never branches on them.

    Args:
        blocks: the block modules, in order.
        placement: the record of where the weights are (``ONE_DEVICE`` by default).
    """

    placement: Placement = ONE_DEVICE

    def __init__(self, blocks: Iterable[nn.Module] = (), placement: Placement = ONE_DEVICE) -> None:
        super().__init__(blocks)
        self.placement = placement

    def check_call(self, start_at_layer: Any, stop_at_layer: Any, past_kv_cache: Any) -> None:
        """Refuse what this mode cannot run (nothing, on one process). ``start_at_layer``,
        ``stop_at_layer`` and ``past_kv_cache`` are the forward's, unchecked (the model checks them after).
        """

    def check_same_input(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Refuse a forward whose processes were given different inputs (nothing to compare on one
        process): the forward's ``tokens`` [batch, pos] and ``attention_mask`` (None: no padding)."""

    def run_embed(self, embed: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The residual stream entering block 0: ``embed()`` (``shape`` serves modes where
        another process embeds)."""
        return embed()

    def forward(
        self,
        resid: torch.Tensor,
        mask: AttentionMask,
        rope: list[Any],
        start: int,
        stop: int,
        past_kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Blocks ``start`` .. ``stop - 1`` on ``resid`` [batch, pos, d_model], with the attention
        ``mask``, ``rope[L]`` (block L's rotary tables) and ``past_kv_cache`` (None: no cache).
        """
        for layer in range(start, stop):
            kv = past_kv_cache[layer] if past_kv_cache is not None else None
            resid = self.run_block(layer, resid, mask, rope[layer], kv)
        return resid

    def run_block(self, layer: int, resid: torch.Tensor, mask: AttentionMask, cos_sin: Any, kv: Any) -> torch.Tensor:
        """Block ``layer`` on ``resid`` with ``mask``, its rotary tables ``cos_sin`` and its KV cache ``kv``."""
        return self[layer](resid, mask, cos_sin, kv)

    def run_head(self, head: Callable[[torch.Tensor], Any], resid: torch.Tensor) -> Any:
        """The model's output from the residual stream after the last block: ``head(resid)``."""
        return head(resid)

    def gather_cache(self, store: dict[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor] | None:
        """The cached activations ``store`` of every block, those gathered from elsewhere put on
        ``device`` (``run_with_cache(device=...)``); here ``store`` itself, which has them all.
        """
        return store

    # Values that cross processes (split over processes: loading/pipeline.py). The workflows
    # call these on every process alike; on one process they hand values back unchanged.
    @property
    def gets_output(self) -> bool:
        """Whether this process gets the forward's output (and ``run_with_cache``'s cache):
        always on one process; rank 0 of a model split over processes."""
        return True

    def process_boundaries(self) -> list[int]:
        """The blocks where the forward moves to another process (each the first block of a
        process's range): none on one process. A workflow that must exchange values between
        blocks of different processes runs the forward in segments split here
        (``stop_at_layer`` / ``start_at_layer``)."""
        return []

    @property
    def processes(self) -> int:
        """How many processes run this model's one forward: 1, or k for a model split over k
        processes. Those k must all run the same forward, so work that gives each rank of the
        process group its own inputs (data-parallel) cannot run on such a model."""
        return 1

    def to_sites(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``tensors`` keyed by hook name, given where the output is (``gets_output``), on the
        process that runs each hook (a meta tensor of its shape stands in elsewhere)."""
        assert tensors is not None, "the process that gets the output gives the tensors"
        return tensors

    def share(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``tensors`` given where the output is (``gets_output``), on every process."""
        assert tensors is not None, "the process that gets the output gives the tensors"
        return tensors

    def from_sites(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor] | None:
        """The tensors ``names`` (keyed by hook name; each process's ``tensors`` hold those of the
        sites it runs) on the process that gets the output, in that order; None on the others."""
        return {k: tensors[k] for k in names}

    def grad(self, value: torch.Tensor | None, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """d value / d inputs (None where an input does not reach it), after a forward with grad
        enabled; ``value`` is given where the output is (split over processes: rank 0, None
        elsewhere, each rank's inputs being its own sites' activations)."""
        assert value is not None, "the process that gets the output gives the value"
        return list(torch.autograd.grad(value, inputs, allow_unused=True))

    def same_random_state(self) -> None:
        """Give every process rank 0's random state (torch's CPU generator, the device's, and
        Python's ``random``), before work that draws at random on every process alike (a
        shuffled data loader, random prompts), so that every process draws the same; on one
        process there is nothing to do."""

    def hold_weights(self, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Copies of the named parameters this process lacks (split over processes: on rank
        0, each from the rank that holds it); here, none."""
        return {}

    def block_devices(self, default: torch.device) -> list[torch.device]:
        """The device each block runs on (where its KV cache lives): ``default`` for all on one device."""
        return [default] * len(self)
