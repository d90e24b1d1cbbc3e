"""The execution mode a load applies, chosen from its options and checked before any
weight is read: one device (build.py), placement over devices (placement.py), offload
(offload.py) or one stage of a pipeline over processes (pipeline.py)."""

from __future__ import annotations

import datetime
from typing import Any, cast

import torch

from ..config import ModelConfig
from .build import OneDevice
from .groups import PlacementError
from .options import LoadOptions


def execution_mode(cfg: ModelConfig, options: LoadOptions, device: Any, dtype: torch.dtype) -> OneDevice:
    """The mode ``options`` ask for, for a model of (processed) config ``cfg`` in ``dtype``.
    At most one of placement, offload and pipeline; ``device``: the compute device asked for
    (None: the default)."""
    from .offload import BlockOffload, Offloaded, OffloadKind
    from .placement import Placed, resolve_device_map

    placement = resolve_device_map(
        cfg,
        options.device_map,
        max_memory=options.max_memory,
        n_devices=options.n_devices,
        dtype=dtype,
        quantize=options.quantize,
    )
    if (
        placement is not None
        and device is not None
        and {torch.device(d).type for d in placement.values()} != {torch.device(device).type}
    ):  # TransformerLens passes device="cuda" with n_devices: that agrees
        raise PlacementError(
            f"device={device!r} disagrees with the placement {placement}; give either a device or a device_map"
        )
    if options.offload is not None and placement is not None:
        raise PlacementError(
            "offload= runs every block on one compute device (device=...); it does not combine with a device_map"
        )
    if options.pipeline_ranks is not None and options.pipeline_ranks != 1:
        from .pipeline import Pipelined, join_pipeline

        if placement is not None or options.offload is not None:
            raise PlacementError(
                "pipeline_ranks splits the blocks over processes, one device per rank; it does not combine "
                "with device_map / n_devices / offload"
            )
        stage = join_pipeline(cfg, options.pipeline_ranks, device, _timedelta(options.pipeline_timeout))
        stage.dtype = dtype
        return Pipelined(stage)
    if placement is not None:
        return Placed(placement)
    if options.offload is not None:
        store = BlockOffload(cast(OffloadKind, options.offload), device or "cpu", options.offload_dir)
        return Offloaded(store, device)
    return OneDevice(device)


def _timedelta(timeout: Any) -> datetime.timedelta:
    from ..scale.process_group import DEFAULT_TIMEOUT

    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))


def current_mode(model: Any) -> OneDevice:
    """The mode a built model runs in, as a load would apply it (for rebuilding it:
    ``process_weights_``): its placement over devices, its pipeline stage, or one device."""
    from .pipeline import PipelineBlocks, Pipelined
    from .placement import Placed

    if isinstance(model.blocks, PipelineBlocks):
        return Pipelined(model.blocks.stage)
    placed = model.placement.device_map
    return Placed(dict(placed)) if placed is not None else OneDevice(model.device)
