"""Building a model from groups of canonical tensors: build it on the meta device, then
fill it group by group (read, process in float32, cast, place), then finish it.

Each group's tensors become the model's parameters as they arrive (adopted without a
copy when they are already laid out as the parameter), and the group's temporaries are
freed before the next group is read: memory peaks near one copy of the weights plus one
group's temporaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from weights_conversion.groups import Group
from weights_conversion.sources import CorruptCheckpointError, MissingWeightsError, WeightShapeError

from .. import processing
from ..config import ModelConfig
from ..memory import return_freed_memory
from ..model import HookedTransformer
from ..progress import tqdm
from .groups import group_of, groups_by_label
from .quantize import Scheme, quantize_parameters


def build_on_meta(cfg: ModelConfig, tokenizer: Any = None, dtype: torch.dtype | None = None) -> HookedTransformer:
    """The model of ``cfg`` (with ``tokenizer``) on the meta device (no
    memory), its parameters in ``dtype`` if given.
    """
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer)
    return model.to(dtype) if dtype is not None and dtype != model.dtype else model


class OneDevice:
    """The execution mode a load applies: where each group's tensors go as they are read,
    which groups this process reads, and the block stack installed once they are in.

    This one keeps every weight on ``device``; placement.py (``Placed``), offload.py
    (``Offloaded``) and pipeline.py (``Pipelined``) define the others."""

    # whether a tied unembedding may stay a view of W_E (not when another process holds W_E)
    shares_embeddings = True

    def __init__(self, device: Any) -> None:
        self.device = device

    def reads(self, group: str) -> bool:
        """Whether this process holds (and reads) the placement group ``group``."""
        return True

    def device_of(self, group: str) -> Any:
        """Where the tensors of ``group`` go as they are read."""
        return self.device

    def after_group(self, model: HookedTransformer, names: list[str]) -> None:
        """Called with each group's parameter ``names`` once they are filled in ``model``."""

    def attach(self, model: HookedTransformer) -> None:
        """Install this mode's block stack on the filled model (the plain one: nothing to do)."""


def build_and_fill(
    cfg: ModelConfig,
    options: processing.ProcessingOptions,
    groups: list[Group],
    tokenizer: Any,
    dtype: torch.dtype,
    desc: str,
    tied: bool,
    mode: OneDevice,
    quantize: Scheme | None = None,
) -> HookedTransformer:
    """Build the (processed) model on the meta device, stream ``groups`` into it as ``mode``
    places them, and attach the mode.

    ``quantize``: each group's attention and MLP matrices are quantized as soon as the group
    is in (quantize.py), so the full-precision copy of one group at most is held at a time.

    ``cfg`` describes the groups' tensors; processing turns it into the model's config.
    ``tied``: the unembedding is ``W_E.T``; it stays one shared tensor unless processing
    rewrites either side (or the two sides are placed on different devices: then a copy).
    ``options``: the processing to apply; ``tokenizer``: the model's; ``dtype``: the
    parameters'; ``desc``: the progress bar's label; ``mode``: the execution mode.
    """
    model_cfg = processing.processed_config(cfg, options)
    applied = model_cfg.processing[len(cfg.processing) :]
    process = (lambda group: processing.process_group(cfg, group, options)) if applied else None
    share = tied and mode.shares_embeddings and not set(applied) & processing.REWRITE_EMBEDDINGS
    by_label = groups_by_label(cfg.n_layers)
    # the other ranks' tensors are never read (a group of all the weights, as processing takes, is kept)
    groups = [g for g in groups if g[0] not in by_label or mode.reads(by_label[g[0]])]
    model = build_on_meta(model_cfg, tokenizer, dtype)
    skip = {name for name, _ in model.named_parameters() if not mode.reads(group_of(name))}
    if share:
        skip.add("unembed.W_U")

    def after_group(names: list[str]) -> None:
        quantize_parameters(model, names, quantize)  # before the mode moves or writes the group
        mode.after_group(model, names)

    materialize(
        model,
        groups,
        device=lambda name: mode.device_of(group_of(name)),
        dtype=dtype,
        process=process,
        n_groups=len(groups),
        desc=desc,
        skip=frozenset(skip),
        after_group=after_group,
    )
    final = mode.device_of("final")
    if share and torch.device(mode.device_of("embed") or "cpu") == torch.device(final or "cpu"):
        model.tie_embeddings()
    elif share:  # tied, but the unembedding lives on another device: its own copy there
        W_E = model.embed.W_E
        model.unembed.W_U = nn.Parameter(W_E.detach().T.to(final), requires_grad=W_E.requires_grad)
    model = finish(model, mode.device_of("embed"))
    mode.attach(model)
    model._note_device()
    return model


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
    ``groups``: (label, prefix, thunk) triples, each thunk reading one group's tensors;
    ``dtype``: the parameters'; ``n_groups`` and ``desc``: the progress bar's total and label.
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
    """Recompute ``model``'s non-persistent buffers (rotary frequencies, not loaded) on ``device``,
    note the device, eval mode; returns the model."""
    for name in ("rotary", "rotary_local"):
        if hasattr(model, name):
            getattr(model, name).inv_freq = getattr(model, name).frequencies().to(device or "cpu")
    model._note_device()
    model.eval()
    return model
