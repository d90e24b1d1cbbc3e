"""The placement vocabulary: the groups a model is placed, offloaded and split in, and
where a load puts them. The one definition; placement.py, offload.py, pipeline.py, the
loader and ``scale/plan.py`` (the dry run) read it.

Groups are placed whole: ``embed`` (token and learned position embeddings, rotary
tables), ``blocks.{L}`` (one block), ``final`` (final norm and unembedding).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Literal

import torch

from weights_conversion.groups import load_order

from .. import sites
from ..config import ModelConfig
from ..model import HookedTransformer
from .quantize import MATRIX, is_quantized_parameter, quantized_matrix_bytes

PlacementMode = Literal["auto", "balanced", "sequential"]


class PlacementError(ValueError):
    """A placement that cannot work (unknown group or device, does not fit, modes that do not combine)."""


# Module names outside the blocks, by the group each belongs to (what a device map may name).
GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "embed": ("embed", "pos_embed", "rotary", "rotary_local", "hook_embed", "hook_pos_embed"),
    "final": ("ln_final", "unembed"),
}
_MODULE_GROUP = {module: group for group, modules in GROUP_MODULES.items() for module in modules} | {"final": "final"}


def group_names(n_layers: int) -> list[str]:
    """Every group of a model of ``n_layers`` blocks, in the order the forward visits them."""
    return ["embed", *(f"blocks.{L}" for L in range(n_layers)), "final"]


def group_of(module_name: str) -> str:
    """The placement group of ``module_name``, a parameter, module or hook name
    (``blocks.3.attn.W_Q`` -> ``blocks.3``, ``ln_final.hook_scale`` -> ``final``); a
    ``KeyError`` for any other name.
    """
    layer = sites.layer_of(module_name)
    if layer is not None:
        return f"blocks.{layer}"
    head = module_name.split(".", 1)[0]
    if head not in _MODULE_GROUP:
        raise KeyError(f"{module_name!r} belongs to no placement group")
    return _MODULE_GROUP[head]


def group_of_part(kind: str, layer: int | None) -> str:
    """The placement group of a group a load streams (weights_conversion/groups.py's ``Part``: its ``kind`` and
    ``layer``).
    """
    return {"embeddings": "embed", "final": "final"}.get(kind, f"blocks.{layer}")


def groups_by_label(n_layers: int) -> dict[str, str]:
    """The label of each group a load of a model of ``n_layers`` blocks streams -> its placement group."""
    return {p.label: group_of_part(p.kind, p.layer) for p in load_order(n_layers)}


def modules_of_group(model: HookedTransformer, group: str) -> list[torch.nn.Module]:
    """The submodules of ``model`` that make up a placement group."""
    layer = sites.layer_of(group)
    if layer is not None:
        return [model.blocks[layer]]
    return [getattr(model, n) for n in GROUP_MODULES[group] if hasattr(model, n)]


# Parameters -----------------------------------------------------------------------------
def group_parameters(cfg: ModelConfig, shared_unembed: bool | None = None) -> dict[str, int]:
    """Parameters per placement group of a model of config ``cfg``: ``embed`` (W_E, W_pos),
    ``blocks.{L}``, ``final`` (ln_final, W_U, b_U), as ``HookedTransformer`` holds them (every
    bias a tensor, zero if the checkpoint has none), counted on a model built on the meta device
    (no memory).

    ``shared_unembed``: W_U is a view of W_E (a tied checkpoint whose processing leaves
    both as they are); None reads it from the config: tied and not rewritten by processing.
    """
    if shared_unembed is None:
        from ..processing import REWRITE_EMBEDDINGS

        shared_unembed = cfg.tie_word_embeddings and not set(cfg.processing) & REWRITE_EMBEDDINGS
    counts = dict(_meta_facts(_shape_key(cfg))[0])
    if shared_unembed:
        counts["final"] -= cfg.d_model * cfg.d_vocab
    return counts


def _shape_key(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without the fields no parameter's shape depends on (one meta build serves a
    model's aliases and its instruct variant)."""
    return cfg.replace(device=None, model_name="", bos_token_id=None, eos_token_id=None, pad_token_id=None)


@functools.lru_cache(maxsize=128)
def _meta_facts(
    cfg: ModelConfig,
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, tuple[int, int]], ...]]:
    """From one model built on the meta device (no memory): parameters per placement group,
    and (name, [out, in] shape) of every matrix a quantized load quantizes."""
    counts = dict.fromkeys(group_names(cfg.n_layers), 0)
    matrices = []
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    for name, p in model.named_parameters():
        counts[group_of(name)] += p.numel()
        if is_quantized_parameter(name):
            n_out, n_in = MATRIX[name.rpartition(".")[2]](p).shape
            matrices.append((name, (n_out, n_in)))
    return tuple(counts.items()), tuple(matrices)


def group_bytes(cfg: ModelConfig, dtype: torch.dtype, quantize: str | None = None) -> dict[str, int]:
    """Weight bytes per placement group of a model of config ``cfg`` with parameters in
    ``dtype``; with ``quantize`` (loading/quantize.py), each block's attention and MLP matrices
    as that scheme stores them."""
    sizes = {g: n * dtype.itemsize for g, n in group_parameters(cfg).items()}
    if quantize is not None:
        for name, (n_out, n_in) in _meta_facts(_shape_key(cfg))[1]:
            stored = quantized_matrix_bytes(n_out, n_in, quantize, dtype)
            sizes[group_of(name)] += stored - n_out * n_in * dtype.itemsize
    return sizes


def place_groups(
    group_bytes: dict[str, int],
    devices: list[str],
    max_memory: dict[str, int] | None = None,
    mode: PlacementMode = "auto",
) -> dict[str, str]:
    """Device of each group (``embed``, ``blocks.{L}``, ``final``), blocks in order and whole.

    ``balanced``: cut the run of groups into contiguous pieces of about equal bytes, one
    per device; ``sequential``: fill each device up to its ``max_memory`` before the next;
    ``auto`` (as transformers' ``device_map="auto"``): balanced if that fits ``max_memory``,
    else sequential. The embeddings go on the first device; the final norm and unembedding
    on the last device used. Raises ``PlacementError`` if the groups cannot fit ``max_memory``.
    ``group_bytes``: each group's size; ``devices``: in order; ``mode``: as above.
    """
    if not devices:
        raise PlacementError("no devices to place the model on")
    if mode not in ("auto", "balanced", "sequential"):
        raise PlacementError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got {mode!r}")
    if mode == "auto":
        try:
            return place_groups(group_bytes, devices, max_memory, "balanced")
        except PlacementError:
            return place_groups(group_bytes, devices, max_memory, "sequential")
    order = group_names(sum(g.startswith("blocks.") for g in group_bytes))
    if set(order) != set(group_bytes):
        raise PlacementError(f"groups {sorted(group_bytes)} are not embed, blocks.0..N-1 and final")
    limit = {d: (max_memory or {}).get(d, math.inf) for d in devices}
    placement: dict[str, str] = {}
    if mode == "balanced":
        share, before = sum(group_bytes.values()) / len(devices), 0
        for g in order:
            i = min(len(devices) - 1, int((before + group_bytes[g] / 2) // share)) if share else 0
            placement[g] = devices[0 if g == "embed" else len(devices) - 1 if g == "final" else i]
            before += group_bytes[g]
    else:
        i, used = 0, 0
        for g in order:
            while used + group_bytes[g] > limit[devices[i]] and g != "embed" and i + 1 < len(devices):
                i, used = i + 1, 0
            placement[g] = devices[i]
            used += group_bytes[g]
    for d in devices:
        held = sum(group_bytes[g] for g, where in placement.items() if where == d)
        if held > limit[d]:
            raise PlacementError(
                f"the model does not fit max_memory: {d} would hold {fmt_bytes(held)} "
                f"({_groups_label([g for g in order if placement[g] == d])}), more than its {fmt_bytes(limit[d])}; "
                f"give more devices or memory, offload, or use a smaller dtype"
            )
    return placement


def _groups_label(groups: list[str]) -> str:
    blocks = [L for g in groups if (L := sites.layer_of(g)) is not None]
    parts = ["embed"] if "embed" in groups else []
    if blocks:
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
    if "final" in groups:
        parts.append("final")
    return ", ".join(parts) or "-"


# Sizes ---------------------------------------------------------------------------------------
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``text`` such as ``"20GiB"``, ``"24GB"``, ``"1.5e9"`` (or an int) -> bytes; ValueError otherwise."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 20GiB, 24GB or 1.5e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    """``n`` bytes for people: ``"1.50 GiB"`` (binary units), or ``"512 B"``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
