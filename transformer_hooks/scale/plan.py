"""Memory plan before download: weights, KV cache, activation-cache and logits bytes per
device, from a model's config alone (no weights are read): a dry run above loading's
placement (loading/groups.py: the same groups, the same ``place_groups``), for a name
resolved as ``from_pretrained`` resolves it (loading/resolve.py).

    config --parameter counts per group (embeddings, each block, final)--> weight bytes
           --site shapes x batch x seq--> KV cache and activation-cache bytes per layer
           --place_groups (blocks whole; embeddings first, final last)--> bytes per device

Figures are exact for this library's model (the tests build models from configs and
compare): weights are the parameters ``HookedTransformer`` holds after the processing
asked for (a tied unembedding becomes its own tensor once ``fold_ln`` rewrites it, as
``loading`` does), and ``checkpoint_parameters`` counts what the Hugging Face checkpoint
stores (the figure model cards publish). The activation cache is the cached sites only;
the logits [batch, seq, d_vocab] are their own column. Working memory of a forward pass beyond the
logits (attention scores of one layer, the MLP hidden of one layer) is listed as
``workspace`` on every device: one block's worth, since blocks run one at a time.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import sites
from ..config import ModelConfig
from ..dtypes import as_dtype
from ..loading.groups import (  # noqa: F401  (re-exported: plan's vocabulary is the loader's)
    PlacementError,
    PlacementMode,
    _groups_label,
    fmt_bytes,
    group_bytes,
    group_names,
    group_of,
    group_parameters,
    parse_bytes,
    place_groups,
)
from ..loading.quantize import CHOICES_TEXT, QUANTIZE_CHOICES, QuantizeError
from ..presets import PUBLISHED_CONFIGS, published_config  # noqa: F401  (re-exported: plan's published configs)

CacheKind = Literal["all", "resid", "none"]


def checkpoint_parameters(hf_config: dict[str, Any]) -> int:
    """Parameters the Hugging Face checkpoint of ``hf_config`` (its config.json dict) stores (the
    figure model cards publish; a tied unembedding counted once): transformers' own model for
    the config, built on the meta device (no memory, no download).
    """
    return _checkpoint_parameters(json.dumps(hf_config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=128)
def _checkpoint_parameters(hf_json: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = json.loads(hf_json)
    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# Activations ------------------------------------------------------------------------------
def site_shapes(cfg: ModelConfig, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Shape of every site ``run_with_cache()`` caches with no filter (every hook point but
    those whose TransformerLens switch is off by default: the per-head expansions and
    ``hook_mlp_in``), from the site table (``sites.py``), for a model of config ``cfg`` run on
    ``batch`` x ``seq`` tokens.
    """

    def shape(name: str) -> tuple[int, ...]:
        site = sites.lookup(name)
        assert site is not None  # hook_names lists only names in the site table
        return site.shape(cfg, batch, seq)

    return {name: shape(name) for name in sites.hook_names(cfg) if sites.tl_flag(name) is None}


def cached_sites(cfg: ModelConfig, batch: int, seq: int, cache: CacheKind) -> dict[str, tuple[int, ...]]:
    """The sites (and shapes) a cache of kind ``cache`` holds for a model of config ``cfg`` run on
    ``batch`` x ``seq`` tokens: ``all`` (the no-filter default), ``resid`` (resid_pre /
    resid_mid / resid_post of every block) or ``none``.
    """
    if cache not in ("all", "resid", "none"):
        raise ValueError(f"cache must be 'all', 'resid' or 'none', got {cache!r}")
    if cache == "none":
        return {}
    shapes = site_shapes(cfg, batch, seq)
    return (
        shapes
        if cache == "all"
        else {k: v for k, v in shapes.items() if sites.split_name(k)[1] in sites.RESIDUAL_STREAM}
    )


# The plan -----------------------------------------------------------------------------------
@dataclass
class DevicePlan:
    """One device's share of a plan, in bytes: the ``groups`` placed there (``embed``,
    ``blocks.{L}``, ``final``), their ``weights``, ``kv_cache``, ``activation_cache`` (the
    cached sites, without the logits), ``logits`` (on the device of the unembedding) and one
    block's ``workspace``; ``capacity``: the device's memory (None: unknown).
    """

    device: str
    groups: list[str] = field(default_factory=list)
    weights: int = 0
    kv_cache: int = 0
    activation_cache: int = 0  # the cached sites (``cache``), without the logits
    logits: int = 0  # the forward's output [batch, seq, d_vocab], on the device of the unembedding
    workspace: int = 0
    capacity: int | None = None

    @property
    def total(self) -> int:
        """Every byte planned on the device."""
        return self.weights + self.kv_cache + self.activation_cache + self.logits + self.workspace

    @property
    def fits(self) -> bool | None:
        """Whether ``total`` fits ``capacity`` (None: capacity unknown)."""
        return None if self.capacity is None else self.total <= self.capacity


@dataclass
class MemoryPlan:
    """What ``plan_memory`` planned: the model's ``cfg`` at ``dtype`` for ``batch`` x ``seq``
    tokens and a ``cache`` of that kind; ``parameters`` in memory (and in the checkpoint,
    ``checkpoint_parameters``, when known), one ``DevicePlan`` per device used, and the
    ``placement`` {group: device}.
    """

    cfg: ModelConfig
    dtype: torch.dtype
    batch: int
    seq: int
    cache: CacheKind
    parameters: int
    checkpoint_parameters: int | None
    devices: list[DevicePlan]
    placement: dict[str, str]
    quantize: str | None = None
    # the same plan under each quantization choice (run_plan fills it; format prints it)
    choices: dict[str | None, MemoryPlan | None] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        """The weights' bytes over all devices."""
        return sum(d.weights for d in self.devices)

    @property
    def kv_cache(self) -> int:
        """The KV cache's bytes over all devices."""
        return sum(d.kv_cache for d in self.devices)

    @property
    def activation_cache(self) -> int:
        """The cached sites' bytes (the logits are counted apart: ``logits``)."""
        return sum(d.activation_cache for d in self.devices)

    @property
    def logits(self) -> int:
        """The logits' bytes ([batch, seq, d_vocab])."""
        return sum(d.logits for d in self.devices)

    @property
    def device_map(self) -> dict[str, str]:
        """This plan's placement, as ``from_pretrained(..., device_map=...)`` takes it."""
        return dict(self.placement)

    @property
    def fits(self) -> bool | None:
        """Whether every device's share fits (None: some capacity unknown)."""
        answers = [d.fits for d in self.devices]
        return None if None in answers else all(answers)

    def format(self) -> str:
        """The ``plan`` command's text: the model, the parameters, and one row per device."""
        name = self.cfg.model_name or self.cfg.original_architecture
        lines = [
            f"memory plan for {name}: {self.cfg.n_layers} layers, d_model {self.cfg.d_model}, "
            f"{str(self.dtype).removeprefix('torch.')}"
            + (f" quantized {self.quantize}" if self.quantize else "")
            + f", batch {self.batch} x seq {self.seq}, cache {self.cache}",
            f"parameters: {self.parameters:,} in memory"
            + (
                f" ({self.checkpoint_parameters:,} in the checkpoint)" if self.checkpoint_parameters is not None else ""
            ),
            f"weights {fmt_bytes(self.weights)}, KV cache (generation) {fmt_bytes(self.kv_cache)}, "
            f"activation cache {fmt_bytes(self.activation_cache)}, logits {fmt_bytes(self.logits)}",
            "",
        ]
        headers = [
            "device",
            "groups",
            "weights",
            "kv_cache",
            "act_cache",
            "logits",
            "workspace",
            "total",
            "capacity",
            "fits",
        ]
        rows = [
            [
                d.device,
                _groups_label(d.groups),
                fmt_bytes(d.weights),
                fmt_bytes(d.kv_cache),
                fmt_bytes(d.activation_cache),
                fmt_bytes(d.logits),
                fmt_bytes(d.workspace),
                fmt_bytes(d.total),
                "?" if d.capacity is None else fmt_bytes(d.capacity),
                {True: "yes", False: "NO", None: "?"}[d.fits],
            ]
            for d in self.devices
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines += [
            "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        verdict = {True: "fits", False: "does NOT fit", None: "fit unknown (no capacity given for some device)"}
        lines += ["", f"verdict: {verdict[self.fits]}"]
        if len(self.devices) > 1:  # the placement, as from_pretrained takes it
            lines += ["", "placement: from_pretrained(..., device_map=" + json.dumps(self.device_map) + ")"]
        if self.choices:
            lines += ["", *self._format_choices()]
        return "\n".join(lines)

    def _format_choices(self) -> list[str]:
        """One row per quantization choice: weights, total per device, fit, placement."""
        devices = list(dict.fromkeys(d.device for p in self.choices.values() if p for d in p.devices))
        headers = ["quantize", "weights", *(f"{d} total" for d in devices), "fits", "placement"]
        rows = []
        for choice, plan in self.choices.items():
            name = choice or "none"
            if plan is None:
                rows.append([name, "n/a", *("-" for _ in devices), "-", "(the matrices' widths do not fit its groups)"])
                continue
            totals = {d.device: fmt_bytes(d.total) for d in plan.devices}
            fits = {True: "yes", False: "NO", None: "?"}[plan.fits]
            where = ", ".join(f"{_groups_label(d.groups)} -> {d.device}" for d in plan.devices)
            rows.append([name, fmt_bytes(plan.weights), *(totals.get(d, "-") for d in devices), fits, where])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        fitting = [c for c, p in self.choices.items() if p is not None and p.fits]
        hint = []
        if self.fits is False and fitting:
            hint = [f"fits with quantize={fitting[0]!r}: from_pretrained(..., quantize={fitting[0]!r})"]
        return [
            "by quantization (from_pretrained(..., quantize=...); embeddings and unembedding are not quantized):",
            "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
            "  ".join("-" * w for w in widths),
            *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows),
            *hint,
        ]


def plan_memory(
    cfg: ModelConfig,
    dtype: torch.dtype | str = torch.float32,
    *,
    batch: int = 1,
    seq: int = 1024,
    cache: CacheKind = "none",
    devices: list[str] | None = None,
    max_memory: dict[str, int] | None = None,
    mode: PlacementMode = "auto",
    hf_config: dict[str, Any] | None = None,
    quantize: str | None = None,
) -> MemoryPlan:
    """Bytes per device for ``cfg`` at ``dtype``.

    Weights, KV cache for generating ``batch`` x ``seq`` tokens, a ``cache`` of one forward on
    ``batch`` x ``seq``, the logits and one block's workspace. A device without a ``max_memory``
    entry has unknown capacity unless it can be asked (CUDA's free memory, the machine's RAM for cpu).

    Args:
        cfg: the model's config as it will be loaded (pass a processed config for processed weights).
        dtype: the weights' dtype (a ``torch.dtype`` or its name).
        batch: sequences per forward.
        seq: tokens per sequence.
        cache: ``"none"``, ``"resid"`` or ``"all"`` (see ``cached_sites``).
        devices: the devices to place on (default: ``max_memory``'s, else ``["cpu"]``).
        max_memory: {device: bytes} capacities.
        mode: ``"auto"``, ``"balanced"`` or ``"sequential"``, as ``loading.groups.place_groups``.
        hf_config: the checkpoint's config.json dict, to count the checkpoint's parameters too.
        quantize: the attention and MLP matrices as ``from_pretrained(..., quantize=...)`` stores
            them (loading/quantize.py), or None.
    """
    dtype = as_dtype(dtype)
    size = dtype.itemsize
    devices = list(devices or (list(max_memory) if max_memory else ["cpu"]))
    params = group_parameters(cfg)
    weights = group_bytes(cfg, dtype, quantize)
    kv_per_layer = 2 * batch * cfg.n_kv_heads * seq * cfg.d_head * size
    act = {g: 0 for g in params}
    for name, shape in cached_sites(cfg, batch, seq, cache).items():
        if name != "unembed.hook_out":  # the cache holds the forward's logits themselves: counted below
            act[group_of(name)] += math.prod(shape) * size
    runtime = {g: weights[g] + (kv_per_layer if g.startswith("blocks.") else 0) + act[g] for g in params}
    logits = batch * seq * cfg.d_vocab_out * size
    runtime["final"] += logits
    workspace = _workspace(cfg, batch, seq, size)
    capacity = {d: (max_memory or {}).get(d, _capacity(d)) for d in devices}
    budget = {d: c - workspace for d, c in capacity.items() if c is not None}
    try:
        placement = place_groups(runtime, devices, budget, mode)
    except PlacementError:  # report what does not fit, device by device, rather than refuse to plan
        placement = place_groups(runtime, devices, None, "balanced")
    plans = {d: DevicePlan(d, capacity=capacity[d]) for d in devices}
    for g, d in placement.items():
        p = plans[d]
        p.groups.append(g)
        p.weights += weights[g]
        p.kv_cache += kv_per_layer if g.startswith("blocks.") else 0
        p.activation_cache += act[g]
        p.logits += logits if g == "final" else 0
    for p in plans.values():
        p.workspace = workspace if p.groups else 0
    used = [plans[d] for d in devices if plans[d].groups]
    return MemoryPlan(
        cfg,
        dtype,
        batch,
        seq,
        cache,
        sum(params.values()),
        checkpoint_parameters(hf_config) if hf_config is not None else None,
        used,
        placement,
        quantize,
    )


def _workspace(cfg: ModelConfig, batch: int, seq: int, size: int) -> int:
    """Temporaries of one block: attention scores and pattern (explicit path), the MLP
    hidden twice (pre and post activation), q/k/v."""
    scores = 2 * batch * cfg.n_heads * seq * seq
    mlp = (3 if cfg.gated_mlp else 2) * batch * seq * cfg.d_mlp
    qkv = batch * seq * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head
    return (scores + mlp + qkv) * size


def _capacity(device: str) -> int | None:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count():
        return torch.cuda.mem_get_info(dev.index or 0)[1]
    if dev.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


# Input -----------------------------------------------------------------------------------------
def parse_max_memory(text: str) -> dict[str, int]:
    """``text`` such as ``"cuda:0=20GiB,cuda:1=20GiB"`` -> {device: bytes}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        if not sep:
            raise ValueError(f"max_memory entry {part!r} is not DEVICE=SIZE (e.g. cuda:0=20GiB)")
        out[device.strip()] = parse_bytes(size)
    return out


def config_for_plan(name_or_config: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any] | None]:
    """(ModelConfig, HF config dict or None) of ``name_or_config``, resolved as ``from_pretrained``
    resolves its name (``loading.resolve.resolve_config``: presets, local directories, GGUF
    files including the embedded default model, repo ids in the HF cache, published configs),
    or of a config.json file. Reads no weights and downloads nothing.
    """
    from ..loading.resolve import resolve_config

    resolved = resolve_config(name_or_config)
    return resolved.cfg, resolved.hf_config


def processed_for_plan(cfg: ModelConfig, processing: bool = True) -> ModelConfig:
    """The config of the model ``from_pretrained`` builds from ``cfg`` (``processing=True``, its
    default processing) or ``from_pretrained_no_processing`` builds (False).
    """
    from ..processing import ProcessingOptions, processed_config

    return processed_config(
        cfg,
        ProcessingOptions()
        if processing
        else ProcessingOptions(
            fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        ),
    )


def run_plan(
    name_or_config: str,
    *,
    dtype: str = "float32",
    devices: Iterable[str] | None = None,
    max_memory: str | dict[str, int] | None = None,
    batch: int = 1,
    seq: int = 1024,
    cache: CacheKind = "none",
    mode: PlacementMode = "auto",
    processing: bool = True,
    quantize: str | None = None,
) -> MemoryPlan:
    """The ``plan`` command's work: read the config of ``name_or_config``, plan (with the weights
    quantized as ``quantize`` says), and plan each quantization choice (none, int8, int4).

    ``max_memory`` may be ``parse_max_memory``'s text; ``processing`` plans the processed
    model (``processed_for_plan``); ``dtype``, ``devices``, ``batch``, ``seq``, ``cache`` and
    ``mode`` as in ``plan_memory``.
    """
    cfg, hf = config_for_plan(name_or_config)
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise QuantizeError(f"quantize={quantize!r} is not a choice: {CHOICES_TEXT}")
    processed = processed_for_plan(cfg, processing)
    kwargs: dict[str, Any] = dict(
        batch=batch,
        seq=seq,
        cache=cache,
        devices=list(devices) if devices else None,
        max_memory=max_memory,
        mode=mode,
    )
    plan = plan_memory(processed, dtype, hf_config=hf, quantize=quantize, **kwargs)
    for choice in dict.fromkeys([None, "int8", "int4", quantize]):
        try:
            plan.choices[choice] = (
                plan if choice == quantize else plan_memory(processed, dtype, quantize=choice, **kwargs)
            )
        except QuantizeError:  # int4 of a model whose widths no group size divides
            plan.choices[choice] = None
    return plan
