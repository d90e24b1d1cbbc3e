"""Where each part of a model lives: ``device_map`` / ``max_memory`` / ``n_devices`` ->
{group: device}, checked, before any weight is read.

Groups are placed whole: ``embed`` (token and learned position embeddings, rotary
tables), ``blocks.{L}`` (one block), ``final`` (final norm and unembedding). The model
moves the residual stream to a block's device before the block runs, so every hook of
the block sees its activation there; components never move tensors.

Accepted forms (transformers' names, TransformerLens 3's ``n_devices``):

- ``"balanced"``: about equal bytes of weights per device; ``"sequential"``: fill the
  devices in order up to ``max_memory`` (default: 90% of each GPU's free memory);
  ``"auto"``: balanced if that fits, else sequential (transformers' meaning);
- ``n_devices=k``: balanced over the first k GPUs (TransformerLens's split);
- a dict: ``{"embed": "cuda:0", "blocks.0": 0, ..., "ln_final": "cuda:1", "unembed": "cuda:1"}``
  (ints are CUDA indices; ``""`` places everything not named; ``final`` names both
  ``ln_final`` and ``unembed``, which must share a device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch

from ..components.masks import AttentionMask
from ..components.stack import BlockStack, Placement
from ..config import ModelConfig
from .build import OneDevice
from .groups import (  # noqa: F401  (group_names, group_of: re-exported, placement's vocabulary)
    GROUP_MODULES,
    PlacementError,
    PlacementMode,
    fmt_bytes,
    group_bytes,
    group_names,
    group_of,
    modules_of_group,
    parse_bytes,
    place_groups,
)

DeviceMap = dict[str, str]


def check_device(device: Any) -> str:
    """A device name that exists on this machine, or a ``PlacementError`` that says why not."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PlacementError(f"unknown device {device!r} in the device map: {e}") from None
    if dev.type == "meta":
        raise PlacementError(
            "the device map places weights on 'meta', which holds no data; use a real device "
            "(or offload= for weights kept off the compute device)"
        )
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise PlacementError(
                f"the device map names {device!r}, but this machine has "
                f"{count} CUDA device(s){'' if count else ' (CUDA is not available)'}"
            )
        return f"cuda:{index}"
    if dev.type not in ("cpu", "mps", "xpu"):
        raise PlacementError(
            f"device {device!r} in the device map is not one this library places weights on (cpu, cuda:N, mps, xpu)"
        )
    if dev.type == "cpu":
        return "cpu"
    return str(dev)


def check_compute_device(device: Any) -> Any:
    """``device`` as given (None: the CPU), or a ``PlacementError`` saying plainly that this
    machine has no such device (``device="cuda"`` without a GPU)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PlacementError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = "built with CUDA, but no GPU is visible" if torch.backends.cuda.is_built() else "built without CUDA"
            raise PlacementError(
                f"device={device!r}, but this machine has no CUDA GPU (this torch {torch.__version__} is {built}); "
                f"load with device='cpu' (the default) or on a machine with a GPU"
            )
        if (dev.index or 0) >= count:
            raise PlacementError(
                f"device={device!r}, but this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PlacementError(f"device={device!r}, but MPS (Apple GPUs) is not available here; use device='cpu'")
    return device


def device_map_keys(n_layers: int) -> list[str]:
    """Every key a device map may have for a model of ``n_layers`` blocks."""
    modules = [m for group in GROUP_MODULES.values() for m in group]
    return ["", *group_names(n_layers), *(m for m in modules if m not in ("embed",))]


def check_device_map(cfg: ModelConfig, device_map: Mapping[str, Any]) -> DeviceMap:
    """The user's ``device_map`` dict for a model of config ``cfg``, as {group: device}: every block
    placed, every key known and written as the model names it (``blocks.1``, not
    ``blocks.01``), every device real; ``PlacementError`` naming the fault otherwise.
    """
    out: dict[str, str] = {}
    rest = None
    valid = device_map_keys(cfg.n_layers)
    for key, device in device_map.items():
        if key == "":
            rest = check_device(device)
            continue
        if not isinstance(key, str) or key not in valid:
            raise PlacementError(
                f"device map key {key!r} names no part of this model; the keys are: {_keys_label(cfg.n_layers)}"
            )
        group = group_of(key)
        dev = check_device(device)
        if group in out and out[group] != dev:
            raise PlacementError(
                f"device map puts {key!r} on {dev} but another part of {group} on {out[group]}; "
                f"a group is placed whole (ln_final and unembed together; embed and pos_embed "
                f"together)"
            )
        out[group] = dev
    unplaced = [g for g in group_names(cfg.n_layers) if g not in out]
    if unplaced and rest is None:
        raise PlacementError(
            f"the device map leaves {', '.join(unplaced)} unplaced; give each a device (or '' for everything not named)"
        )
    return {g: out[g] if rest is None else out.get(g, rest) for g in group_names(cfg.n_layers)}


def _keys_label(n_layers: int) -> str:
    modules = ", ".join(m for group in GROUP_MODULES.values() for m in group if m != "embed")
    return (
        f"embed, blocks.0 .. blocks.{n_layers - 1} (no leading zeros), final, the module names {modules}, "
        f"or '' for everything not named"
    )


def resolve_device_map(
    cfg: ModelConfig,
    device_map: str | Mapping[str, Any] | None = None,
    *,
    max_memory: Mapping[Any, Any] | None = None,
    n_devices: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> DeviceMap | None:
    """{group: device} for a model of config ``cfg`` (the processed config: its weights' bytes,
    quantized as ``quantize`` says, decide "auto"), or None when nothing asks for placement.

    Args:
        cfg: the model's config.
        device_map: ``"auto"``, ``"balanced"``, ``"sequential"`` (see ``groups.place_groups``)
            or a {group or module: device} dict.
        max_memory: {device: bytes or "20GiB"}; with a string map, the devices to use.
        n_devices: use this many devices (TransformerLens's even split when alone).
        dtype: the weights' dtype (their bytes).
        quantize: the quantization scheme of the load (``loading/quantize.py``), or None.
    """
    if device_map is None and n_devices is None:
        return None
    if isinstance(device_map, Mapping):
        if n_devices is not None:
            raise PlacementError("give either a device_map dict or n_devices, not both")
        placement = check_device_map(cfg, device_map)
        if max_memory:
            limits = {check_device(d): parse_bytes(b) for d, b in max_memory.items()}
            _check_fits(cfg, placement, limits, dtype, quantize)
        return placement
    if device_map not in (None, "auto", "balanced", "sequential"):
        raise PlacementError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got {device_map!r}")
    mode = cast(PlacementMode, device_map or "balanced")  # n_devices alone: TransformerLens's even split
    limits = {check_device(d): parse_bytes(b) for d, b in (max_memory or {}).items()}
    if limits:
        devices = list(limits)
    elif torch.cuda.is_available():
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        limits = {d: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i, d in enumerate(devices)}
    else:
        devices = ["cpu"]
    if n_devices is not None:
        if n_devices < 1 or n_devices > len(devices):
            raise PlacementError(
                f"n_devices={n_devices}, but {len(devices)} device(s) are available ({', '.join(devices)})"
            )
        devices = devices[:n_devices]
    sizes = group_bytes(cfg, dtype, quantize)
    return place_groups(sizes, devices, {d: limits[d] for d in devices if d in limits}, mode)


def _check_fits(
    cfg: ModelConfig, placement: DeviceMap, limits: dict[str, int], dtype: torch.dtype, quantize: str | None
) -> None:
    sizes = group_bytes(cfg, dtype, quantize)
    for device, limit in limits.items():
        held = sum(sizes[g] for g, d in placement.items() if d == device)
        if held > limit:
            raise PlacementError(
                f"the device map puts {fmt_bytes(held)} of weights on {device}, more than its "
                f"max_memory {fmt_bytes(limit)}"
            )


def devices_in_order(placement: DeviceMap) -> list[str]:
    """The distinct devices of a placement, in the order the forward pass visits them."""
    return list(dict.fromkeys(placement.values()))


def place_model(
    model: Any,
    device_map: str | Mapping[str, Any] | None = None,
    *,
    max_memory: Mapping[Any, Any] | None = None,
    n_devices: int | None = None,
) -> Any:
    """Move a built ``model``'s groups to the devices of a placement (in place; returns it) and
    record it in ``model.placement``. ``from_pretrained(device_map=...)`` places each tensor as it
    is read instead; this serves models already in memory. ``device_map``, ``max_memory`` and
    ``n_devices`` as in ``resolve_device_map``.
    """
    placement = resolve_device_map(model.cfg, device_map, max_memory=max_memory, n_devices=n_devices, dtype=model.dtype)
    if placement is None:
        return model
    tied = model.unembed.W_U.untyped_storage().data_ptr() == model.embed.W_E.untyped_storage().data_ptr()
    if tied and placement["embed"] != placement["final"]:
        # A tied unembedding on another device is its own copy there (W_U reads no gradient back into W_E).
        model.unembed.W_U = torch.nn.Parameter(
            model.embed.W_E.detach().T.clone(), requires_grad=model.embed.W_E.requires_grad
        )
    for group, device in placement.items():
        for module in modules_of_group(model, group):
            for sub in module.modules():  # nn.Module.to without the model's own _apply bookkeeping
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.device != torch.device(device):
                        sub._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
                for name, b in list(sub._buffers.items()):
                    if b is not None:
                        sub._buffers[name] = b.to(device)
    install_placement(model, placement)
    return model


def install_placement(model: Any, placement: DeviceMap | None) -> None:
    """Make ``model`` run its blocks where ``placement`` put them (None: on one device)."""
    model.blocks = BlockStack(model.blocks) if placement is None else PlacedBlocks(model.blocks, placement)


class PlacedBlocks(BlockStack):
    """Blocks on several devices: the residual stream, the mask and the rotary tables move to a
    block's device before it runs (made once per forward per device), and to the final norm's
    device before the head; nowhere else. ``blocks``: the model's blocks; ``placement``:
    {group: device}.
    """

    def __init__(self, blocks: Any, placement: DeviceMap) -> None:
        super().__init__(blocks, Placement("devices", device_map=dict(placement)))
        self.devices = [torch.device(placement[f"blocks.{L}"]) for L in range(len(self))]
        self.final_device = torch.device(placement["final"])
        self._copies: dict[tuple[torch.device, int], tuple[AttentionMask, Any]] = {}

    def forward(
        self, resid: torch.Tensor, mask: AttentionMask, rope: list[Any], start: int, stop: int, kv: Any = None
    ) -> torch.Tensor:
        """``BlockStack.forward`` (``resid``, ``mask``, ``rope``, ``start``, ``stop``, KV cache ``kv``),
        with the per-device copies of the mask and rotary tables made once per forward.
        """
        self._copies = {}
        try:
            return super().forward(resid, mask, rope, start, stop, kv)
        finally:
            self._copies = {}

    def run_block(self, layer: int, resid: torch.Tensor, mask: AttentionMask, cos_sin: Any, kv: Any) -> torch.Tensor:
        """Block ``layer`` on its device: ``resid``, ``mask`` and
        ``cos_sin`` moved there first; ``kv``: its KV cache.
        """
        device = self.devices[layer]
        return self[layer](resid.to(device), *self._moved_to(device, mask, cos_sin), kv)

    def run_head(self, head: Any, resid: torch.Tensor) -> Any:
        """``head(resid)`` with ``resid`` moved to the final norm's device."""
        return head(resid.to(self.final_device))

    def block_devices(self, default: torch.device) -> list[torch.device]:
        """The device of each block (``default`` is not used)."""
        return list(self.devices)

    def _moved_to(self, device: torch.device, mask: AttentionMask, cos_sin: Any) -> tuple[AttentionMask, Any]:
        """The mask and rotary tables on ``device``."""
        if device == mask.device:
            return mask, cos_sin
        key = (device, id(cos_sin))
        if key not in self._copies:
            key_is_real = mask.key_is_real.to(device) if mask.key_is_real is not None else None
            self._copies[key] = (
                AttentionMask(mask.q_len, mask.k_len, key_is_real, device),
                tuple(t.to(device) for t in cos_sin) if cos_sin is not None else None,
            )
        return self._copies[key]


class Placed(OneDevice):
    """The load of a model placed over devices (``placement``: {group: device}): each group's
    tensors go straight to its device.
    """

    def __init__(self, placement: DeviceMap) -> None:
        super().__init__(placement["embed"])
        self.placement = placement

    def device_of(self, group: str) -> Any:
        """The device ``group`` is placed on."""
        return self.placement[group]

    def attach(self, model: Any) -> None:
        """Install ``PlacedBlocks`` on ``model``."""
        install_placement(model, self.placement)
