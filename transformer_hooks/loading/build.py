"""Building a model from groups of canonical tensors: build it on the meta device, then
fill it group by group (read, process in float32, cast, place), then finish it.

Each group's tensors become the model's parameters as they arrive (adopted without a
copy when they are already laid out as the parameter), and the group's temporaries are
freed before the next group is read: memory peaks near one copy of the weights plus one
group's temporaries.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from weights_conversion.groups import Group, load_order
from weights_conversion.sources import CorruptCheckpointError, MissingWeightsError, WeightShapeError

from .. import processing, sites
from ..config import ModelConfig
from ..memory import return_freed_memory
from ..model import HookedTransformer


def build_on_meta(cfg: ModelConfig, tokenizer: Any = None) -> HookedTransformer:
    with torch.device("meta"):
        return HookedTransformer(cfg, tokenizer)


def build_and_fill(
    cfg: ModelConfig,
    options: processing.ProcessingOptions,
    groups: list[Group],
    tokenizer: Any,
    device: Any,
    dtype: torch.dtype,
    desc: str,
    tied: bool,
    device_map: Any = None,
    max_memory: Any = None,
    n_devices: int | None = None,
    offload: str | None = None,
    offload_dir: Any = None,
    pipeline_ranks: int | None = None,
    pipeline_timeout: Any = None,
) -> HookedTransformer:
    """Build the (processed) model on the meta device and stream ``groups`` into it.

    ``cfg`` describes the groups' tensors; processing turns it into the model's config.
    ``tied``: the unembedding is ``W_E.T``; it stays one shared tensor unless processing
    rewrites either side (or the two sides are placed on different devices).
    ``device_map`` / ``max_memory`` / ``n_devices``: placement over devices, resolved and
    checked before any tensor is read (placement.py); each tensor goes straight to its
    group's device. ``offload``: "cpu" or "disk" keeps each block's weights off ``device``
    (offload.py), stored as soon as the block is read. ``pipeline_ranks``: this process
    reads and holds only its stage's groups (pipeline.py); the others stay on the meta device.
    """
    from .offload import BlockOffload, OffloadKind
    from .placement import PlacementError, group_of, resolve_device_map

    model_cfg = processing.processed_config(cfg, options)
    placement = resolve_device_map(model_cfg, device_map, max_memory=max_memory, n_devices=n_devices, dtype=dtype)
    if (
        placement is not None
        and device is not None
        and {torch.device(d).type for d in placement.values()} != {torch.device(device).type}
    ):  # TransformerLens passes device="cuda" with n_devices: that agrees
        raise PlacementError(
            f"device={device!r} disagrees with the placement {placement}; give either a device or a device_map"
        )
    store = None
    if offload is not None:
        if placement is not None:
            raise PlacementError(
                "offload= runs every block on one compute device (device=...); it does not combine with a device_map"
            )
        store = BlockOffload(cast(OffloadKind, offload), device or "cpu", offload_dir)  # BlockOffload checks it
    applied = model_cfg.processing[len(cfg.processing) :]
    process = (lambda group: processing.process_group(cfg, group, options)) if applied else None
    share = tied and not set(applied) & processing.REWRITE_EMBEDDINGS
    stage = None
    if pipeline_ranks is not None and pipeline_ranks != 1:
        from .pipeline import join_pipeline

        if placement is not None or store is not None:
            raise PlacementError(
                "pipeline_ranks splits the blocks over processes, one device per rank; it does not combine "
                "with device_map / n_devices / offload"
            )
        stage = join_pipeline(model_cfg, pipeline_ranks, device, _timedelta(pipeline_timeout))
        stage.dtype = dtype
        device = stage.device
        by_label = _groups_by_label(cfg.n_layers)
        groups = [g for g in groups if stage.owns(by_label[g[0]])]  # the other ranks' tensors are never read
        share = False  # the embeddings and the unembedding live on different ranks
    model = build_on_meta(model_cfg, tokenizer)
    if stage is not None:
        skip = frozenset(name for name, _ in model.named_parameters() if not stage.owns(group_of(name)))
    else:
        skip = frozenset({"unembed.W_U"}) if share else frozenset()
    if placement is not None:
        target: Any = lambda name: placement[group_of(name)]  # noqa: E731
    elif store is not None:
        target = lambda name: "cpu" if name.startswith("blocks.") else device  # noqa: E731
    else:
        target = device
    after_group = None
    if store is not None:

        def after_group(names: list[str]) -> None:
            for layer in sorted({L for n in names if (L := sites.layer_of(n)) is not None}):
                store.keep(model.blocks[layer], layer)

    materialize(
        model,
        groups,
        device=target,
        dtype=dtype,
        process=process,
        n_groups=len(groups),
        desc=desc,
        skip=skip,
        after_group=after_group,
    )
    if share and (placement is None or placement["embed"] == placement["final"]):
        model.tie_embeddings()
    elif share:  # tied, but the unembedding lives on another device: its own copy there
        assert placement is not None
        W_E = model.embed.W_E
        model.unembed.W_U = nn.Parameter(W_E.detach().T.to(placement["final"]), requires_grad=W_E.requires_grad)
    if stage is not None:
        model._stage = stage
        model.cfg = model.cfg.replace(pipeline_map=dict(stage.map))
    model = finish(model, placement["embed"] if placement is not None else device)
    if placement is not None:
        model._set_placement(placement)
    if store is not None:
        store.attach(model.blocks)
        model._offload = store  # type: ignore[assignment]  # a plain attribute: Module.__setattr__ takes any value
    return model


def _groups_by_label(n_layers: int) -> dict[str, str]:
    """The label of each group a load streams (weights_conversion/groups.py) -> its placement group."""
    names = {"embeddings": "embed", "final": "final"}
    return {p.label: names.get(p.kind, f"blocks.{p.layer}") for p in load_order(n_layers)}


def _timedelta(timeout: Any) -> datetime.timedelta:
    from ..scale.process_group import DEFAULT_TIMEOUT

    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))


def materialize(
    model: HookedTransformer,
    groups: Iterable[Group],
    *,
    device: Any,
    dtype: torch.dtype,
    process: Callable[[dict], dict] | None = None,
    n_groups: int | None = None,
    desc: str = "loading",
    skip: frozenset[str] = frozenset(),
    after_group: Callable[[list[str]], None] | None = None,
) -> None:
    """Fill a meta-built model group by group; lists every missing tensor before failing.

    ``device``: a device, or a function of the parameter name giving its device (placement).
    ``process`` takes and returns ``{full name: float32 tensor}`` for one group.
    ``skip``: parameters filled otherwise (a tied ``unembed.W_U`` becomes a view of ``W_E``).
    ``after_group(names)``: called with each group's parameter names once they are filled.
    """
    missing: list[str] = []
    expected = {name for name, _ in model.named_parameters()} - skip
    filled: set[str] = set()
    adopted: set[int] = set()
    bar = tqdm(total=n_groups, desc=desc, unit="group", delay=1.0, leave=False)
    try:
        for label, prefix, thunk in groups:
            group = _read_group(label, prefix, thunk, missing)
            if group is None:
                continue
            if process is not None:
                group = _process_group(label, process, group)
            names = [name for name in group if name not in skip]
            for name in names:
                _assign(model, name, group.pop(name), device(name) if callable(device) else device, dtype, adopted)
                filled.add(name)
            del group
            if after_group is not None:
                after_group(names)
            # glibc would keep the group's freed temporaries, and the next group's tensors rarely fit
            # the holes, so the resident set would grow by one group's temporaries per group
            # (measured: +60 MB on GPT-2 small).
            return_freed_memory()
            bar.update(1)
    finally:
        bar.close()
    if missing:
        raise MissingWeightsError(
            f"the checkpoint is missing {len(missing)} tensor(s) this model needs: "
            f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. "
            f"Is it complete, and of the architecture its config.json names?"
        )
    unfilled = expected - filled
    if unfilled:
        raise MissingWeightsError(f"no weights were provided for: {', '.join(sorted(unfilled))}")


def _read_group(label: str, prefix: str, thunk: Callable[[], dict], missing: list[str]) -> dict | None:
    """{full name: tensor} of one group, or None (and the missing name noted) if a tensor is missing."""
    try:
        return {prefix + k: v for k, v in thunk().items()}
    except KeyError as e:
        missing.append(str(e.args[0]))
        return None
    except (RuntimeError, ValueError) as e:  # a reshape in a converter: the config does not fit the tensors
        if isinstance(e, (CorruptCheckpointError, WeightShapeError)):
            raise
        raise _does_not_fit(label, e) from e


def _process_group(label: str, process: Callable[[dict], dict], group: dict) -> dict:
    for name in group:
        group[name] = group[name].float()  # processing runs in float32; a no-op for float32 tensors
    try:
        return process(group)
    except RuntimeError as e:  # broadcasting a norm weight of the wrong width
        raise _does_not_fit(label, e) from e


def _does_not_fit(label: str, error: Exception) -> WeightShapeError:
    return WeightShapeError(
        f"{label}: the checkpoint's tensors do not fit its config ({error}); the config does not match the weights"
    )


def _assign(
    model: nn.Module, name: str, tensor: torch.Tensor, device: Any, dtype: torch.dtype, adopted: set[int]
) -> None:
    module_name, _, param_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        old = module._parameters[param_name]
        if old is None:
            raise KeyError(param_name)
    except (AttributeError, KeyError) as e:
        raise WeightShapeError(f"converted tensor {name!r} has no parameter in the model") from e
    if tuple(old.shape) != tuple(tensor.shape):
        raise WeightShapeError(
            f"{name}: the checkpoint gives shape {tuple(tensor.shape)}, the config implies "
            f"{tuple(old.shape)}; the config does not match the weights"
        )
    device = torch.device(device or "cpu")
    if _can_adopt(tensor, old, device, dtype, adopted):
        new = tensor  # a fresh buffer already laid out as the parameter: no copy
    else:
        # The parameter's strides are the layout F.linear reads without a copy.
        new = torch.empty_strided(old.shape, old.stride(), dtype=dtype, device=device)
        new.copy_(tensor)
    adopted.add(new.untyped_storage().data_ptr())
    module._parameters[param_name] = nn.Parameter(new, requires_grad=old.requires_grad)


def _can_adopt(
    tensor: torch.Tensor, old: torch.Tensor, device: torch.device, dtype: torch.dtype, adopted: set[int]
) -> bool:
    """Whether ``tensor`` can be the parameter as it is: right dtype, device and strides,
    and sole owner of its memory (not a slice of a memory-mapped file, not a view of a
    buffer another parameter uses)."""
    storage = tensor.untyped_storage()
    return (
        tensor.dtype == dtype
        and tensor.device == device
        and tensor.stride() == old.stride()
        and tensor.storage_offset() == 0
        and storage.nbytes() == tensor.numel() * tensor.element_size()
        and storage.data_ptr() not in adopted
    )


def finish(model: HookedTransformer, device: Any) -> HookedTransformer:
    """Recompute the non-persistent buffers (rotary frequencies, not loaded), note the device, eval mode."""
    for name in ("rotary", "rotary_local"):
        if hasattr(model, name):
            getattr(model, name).inv_freq = getattr(model, name).frequencies().to(device or "cpu")
    model._note_device()
    model.eval()
    return model
