"""Memory plan before download: weights, KV cache and activation-cache bytes per device,
from a model's config alone (no weights are read).

    config --parameter counts per group (embeddings, each block, final)--> weight bytes
           --site shapes x batch x seq--> KV cache and activation-cache bytes per layer
           --place_groups (blocks whole; embeddings first, final last)--> bytes per device

Figures are exact for this library's model (the tests build models from configs and
compare): weights are the parameters ``HookedTransformer`` holds after the processing
asked for (a tied unembedding becomes its own tensor once ``fold_ln`` rewrites it, as
``loading`` does), and ``checkpoint_parameters`` counts what the Hugging Face checkpoint
stores (the figure model cards publish). Working memory of a forward pass beyond the
logits (attention scores of one layer, the MLP hidden of one layer) is listed as
``workspace`` on every device: one block's worth, since blocks run one at a time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import sites
from .config import ModelConfig
from .dtypes import as_dtype
from .model import HookedTransformer

CacheKind = Literal["all", "resid", "none"]
PlacementMode = Literal["auto", "balanced", "sequential"]

# Published configs (each model's config.json on the hub, as HF dicts), so a plan for
# them needs no download. Parameter counts their model cards give: GPT-2 124M,
# Pythia-2.8B 2.78e9, Llama-3.2-1B 1.24e9, Llama-3.1-8B 8.03e9, Llama-3.1-70B 70.6e9.
_LLAMA3 = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=128001,
    attention_bias=False,
    mlp_bias=False,
)
_LLAMA31_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        model_type="gpt2",
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
        n_ctx=1024,
        vocab_size=50257,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    ),
    "pythia-2.8b": dict(
        model_type="gpt_neox",
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=10240,
        vocab_size=50304,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling=dict(_LLAMA31_ROPE, factor=32.0),
    ),
    "llama-3.1-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "llama-3.1-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_scaling=_LLAMA31_ROPE,
    ),
}
_ALIASES = {
    "gpt2-small": "gpt2",
    "openai-community/gpt2": "gpt2",
    "eleutherai/pythia-2.8b": "pythia-2.8b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b",
}


# Placement groups: blocks are placed whole, the embeddings and the final norm + unembedding each as one group.
_GROUP_KEY = re.compile(r"^(embed|final|blocks\.\d+)$")
# Module names a user may write, and the group each belongs to.
_ALIASES = {
    "embed": "embed",
    "pos_embed": "embed",
    "rotary": "embed",
    "rotary_local": "embed",
    "hook_embed": "embed",
    "hook_pos_embed": "embed",
    "ln_final": "final",
    "unembed": "final",
    "final": "final",
}


def group_names(n_layers: int) -> list[str]:
    return ["embed", *(f"blocks.{L}" for L in range(n_layers)), "final"]


def group_of(module_name: str) -> str:
    """The placement group of a parameter or module name (``blocks.3.attn.W_Q`` -> ``blocks.3``)."""
    layer = sites.layer_of(module_name)
    if layer is not None:
        return f"blocks.{layer}"
    head = module_name.split(".", 1)[0]
    if head not in _ALIASES:
        raise KeyError(f"{module_name!r} belongs to no placement group")
    return _ALIASES[head]


# Parameters -----------------------------------------------------------------------------
def group_parameters(cfg: ModelConfig, shared_unembed: bool | None = None) -> dict[str, int]:
    """Parameters per placement group: ``embed`` (W_E, W_pos), ``blocks.{L}``, ``final``
    (ln_final, W_U, b_U), as ``HookedTransformer`` holds them (every bias a tensor, zero
    if the checkpoint has none), counted on a model built on the meta device (no memory).

    ``shared_unembed``: W_U is a view of W_E (a tied checkpoint whose processing leaves
    both as they are); None reads it from the config: tied and not rewritten by processing.
    """
    if shared_unembed is None:
        from .processing import REWRITE_EMBEDDINGS

        shared_unembed = cfg.tie_word_embeddings and not set(cfg.processing) & REWRITE_EMBEDDINGS
    counts = dict(_meta_counts(cfg.replace(device=None, device_map=None)))
    if shared_unembed:
        counts["final"] -= cfg.d_model * cfg.d_vocab
    return counts


@functools.lru_cache(maxsize=16)
def _meta_counts(cfg: ModelConfig) -> tuple[tuple[str, int], ...]:
    counts = dict.fromkeys(group_names(cfg.n_layers), 0)
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    for name, p in model.named_parameters():
        counts[group_of(name)] += p.numel()
    return tuple(counts.items())


def checkpoint_parameters(hf_config: dict[str, Any]) -> int:
    """Parameters the Hugging Face checkpoint stores (the figure model cards publish; a tied
    unembedding counted once): transformers' own model for the config, built on the meta
    device (no memory, no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# Activations ------------------------------------------------------------------------------
def site_shapes(cfg: ModelConfig, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Shape of every site ``run_with_cache()`` caches with no filter (every hook point but
    those whose TransformerLens switch is off by default: the per-head expansions and
    ``hook_mlp_in``), from the site table (``sites.py``)."""
    from . import sites

    def shape(name: str) -> tuple[int, ...]:
        site = sites.lookup(name)
        assert site is not None  # hook_names lists only names in the site table
        return site.shape(cfg, batch, seq)

    return {name: shape(name) for name in sites.hook_names(cfg) if sites.tl_flag(name) is None}


_RESID = re.compile(r"hook_resid_(pre|mid|post)$")


def cached_sites(cfg: ModelConfig, batch: int, seq: int, cache: CacheKind) -> dict[str, tuple[int, ...]]:
    """The sites a cache of kind ``cache`` holds: ``all`` (the no-filter default), ``resid``
    (resid_pre / resid_mid / resid_post of every block) or ``none``."""
    if cache not in ("all", "resid", "none"):
        raise ValueError(f"cache must be 'all', 'resid' or 'none', got {cache!r}")
    if cache == "none":
        return {}
    shapes = site_shapes(cfg, batch, seq)
    return shapes if cache == "all" else {k: v for k, v in shapes.items() if _RESID.search(k)}


def _group_of_site(name: str) -> str:
    layer = sites.layer_of(name)
    if layer is not None:
        return f"blocks.{layer}"
    return "final" if name.startswith("ln_final.") else "embed"


# Placement --------------------------------------------------------------------------------
class PlacementError(ValueError):
    pass


def _group_order(n_layers: int) -> list[str]:
    return ["embed", *(f"blocks.{L}" for L in range(n_layers)), "final"]


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
    order = _group_order(sum(g.startswith("blocks.") for g in group_bytes))
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


# The plan -----------------------------------------------------------------------------------
@dataclass
class DevicePlan:
    device: str
    groups: list[str] = field(default_factory=list)
    weights: int = 0
    kv_cache: int = 0
    activation_cache: int = 0
    workspace: int = 0
    capacity: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activation_cache + self.workspace

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity


@dataclass
class MemoryPlan:
    cfg: ModelConfig
    dtype: torch.dtype
    batch: int
    seq: int
    cache: CacheKind
    parameters: int
    checkpoint_parameters: int | None
    devices: list[DevicePlan]
    placement: dict[str, str]

    @property
    def weights(self) -> int:
        return sum(d.weights for d in self.devices)

    @property
    def kv_cache(self) -> int:
        return sum(d.kv_cache for d in self.devices)

    @property
    def activation_cache(self) -> int:
        return sum(d.activation_cache for d in self.devices)

    @property
    def fits(self) -> bool | None:
        answers = [d.fits for d in self.devices]
        return None if None in answers else all(answers)

    def format(self) -> str:
        name = self.cfg.model_name or self.cfg.original_architecture
        lines = [
            f"memory plan for {name}: {self.cfg.n_layers} layers, d_model {self.cfg.d_model}, "
            f"{str(self.dtype).removeprefix('torch.')}, batch {self.batch} x seq {self.seq}, cache {self.cache}",
            f"parameters: {self.parameters:,} in memory"
            + (
                f" ({self.checkpoint_parameters:,} in the checkpoint)" if self.checkpoint_parameters is not None else ""
            ),
            f"weights {fmt_bytes(self.weights)}, KV cache (generation) {fmt_bytes(self.kv_cache)}, "
            f"activation cache {fmt_bytes(self.activation_cache)}",
            "",
        ]
        headers = ["device", "groups", "weights", "kv_cache", "act_cache", "workspace", "total", "capacity", "fits"]
        rows = [
            [
                d.device,
                _groups_label(d.groups),
                fmt_bytes(d.weights),
                fmt_bytes(d.kv_cache),
                fmt_bytes(d.activation_cache),
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
        return "\n".join(lines)


def _groups_label(groups: list[str]) -> str:
    blocks = [L for g in groups if (L := sites.layer_of(g)) is not None]
    parts = ["embed"] if "embed" in groups else []
    if blocks:
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
    if "final" in groups:
        parts.append("final")
    return ", ".join(parts) or "-"


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
) -> MemoryPlan:
    """Bytes per device for ``cfg`` (the model's config as it will be loaded: pass a
    processed config for processed weights) at ``dtype``: weights, KV cache for
    generating ``batch`` x ``seq`` tokens, a ``cache`` of one forward on ``batch`` x
    ``seq``, the logits and one block's workspace. ``devices`` default to one, ``cpu``;
    a device without a ``max_memory`` entry has unknown capacity unless it can be asked
    (CUDA's free memory, the machine's RAM for cpu)."""
    dtype = as_dtype(dtype)
    size = dtype.itemsize
    devices = list(devices or (list(max_memory) if max_memory else ["cpu"]))
    params = group_parameters(cfg)
    kv_per_layer = 2 * batch * cfg.n_kv_heads * seq * cfg.d_head * size
    act = {g: 0 for g in params}
    for name, shape in cached_sites(cfg, batch, seq, cache).items():
        act[_group_of_site(name)] += math.prod(shape) * size
    runtime = {g: params[g] * size + (kv_per_layer if g.startswith("blocks.") else 0) + act[g] for g in params}
    logits = batch * seq * cfg.d_vocab * size
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
        p.weights += params[g] * size
        p.kv_cache += kv_per_layer if g.startswith("blocks.") else 0
        p.activation_cache += act[g] + (logits if g == "final" else 0)
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
    """``"20GiB"``, ``"24GB"``, ``"1.5e9"`` or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 20GiB, 24GB or 1.5e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_max_memory(text: str) -> dict[str, int]:
    """``"cuda:0=20GiB,cuda:1=20GiB"`` -> {device: bytes}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        if not sep:
            raise ValueError(f"max_memory entry {part!r} is not DEVICE=SIZE (e.g. cuda:0=20GiB)")
        out[device.strip()] = parse_bytes(size)
    return out


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def published_config(name: str) -> dict[str, Any] | None:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return dict(PUBLISHED_CONFIGS[key]) if key in PUBLISHED_CONFIGS else None


def config_for_plan(name_or_config: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any] | None]:
    """(ModelConfig, HF config dict or None) from a published model's name, a config.json,
    a Hugging Face directory or a converted checkpoint directory. Reads no weights."""
    import weights_conversion
    from weights_conversion.converted import CONVERTED_CONFIG

    path = Path(name_or_config)
    hf = published_config(str(name_or_config))
    if hf is None and path.is_dir():
        if (path / CONVERTED_CONFIG).is_file():
            meta = json.loads((path / CONVERTED_CONFIG).read_text())
            return ModelConfig.from_dict(meta["model_config"]), None
        path = path / "config.json"
    if hf is None and path.is_file():
        data = json.loads(path.read_text())
        if "model_config" in data:  # a converted checkpoint's config file
            return ModelConfig.from_dict(data["model_config"]), None
        hf = data
    if hf is None:
        raise ValueError(
            f"no config for {str(name_or_config)!r}: give a config.json, a model directory, or one of "
            f"the built-in published configs {sorted(PUBLISHED_CONFIGS)}"
        )
    cfg = weights_conversion.config_from_hf(hf)
    return cfg.replace(model_name=str(name_or_config)), hf


def processed_for_plan(cfg: ModelConfig, processing: bool = True) -> ModelConfig:
    """The config of the model ``from_pretrained`` builds (default processing) or
    ``from_pretrained_no_processing`` builds."""
    from .processing import ProcessingOptions, processed_config

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
) -> MemoryPlan:
    """The ``plan`` command's work: read the config, plan, return the plan."""
    cfg, hf = config_for_plan(name_or_config)
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    return plan_memory(
        processed_for_plan(cfg, processing),
        dtype,
        batch=batch,
        seq=seq,
        cache=cache,
        devices=list(devices) if devices else None,
        max_memory=max_memory,
        mode=mode,
        hf_config=hf,
    )


def add_plan_parser(sub: Any) -> None:
    """Register ``plan`` on the CLI's subparsers."""
    p = sub.add_parser(
        "plan", help="memory per device for a model (weights, KV cache, activation cache), from its config alone"
    )
    p.add_argument(
        "model",
        help=f"config.json, model directory, converted checkpoint, or one of {', '.join(sorted(PUBLISHED_CONFIGS))}",
    )
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--devices", default=None, help="comma-separated devices, e.g. cuda:0,cuda:1 (default: cpu)")
    p.add_argument("--max-memory", default=None, help="per-device capacity, e.g. cuda:0=20GiB,cuda:1=20GiB")
    p.add_argument(
        "--placement",
        default="auto",
        choices=("auto", "balanced", "sequential"),
        help="balanced: about equal bytes per device; sequential: fill each device in order; "
        "auto (default): balanced if it fits, else sequential",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument(
        "--cache",
        default="none",
        choices=("all", "resid", "none"),
        help="activation cache of one forward: every site, the residual stream, or none",
    )
    p.add_argument("--no-processing", action="store_true", help="plan for unprocessed weights")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: Any) -> int:
    plan = run_plan(
        args.model,
        dtype=args.dtype,
        devices=args.devices.split(",") if args.devices else None,
        max_memory=args.max_memory,
        batch=args.batch,
        seq=args.seq,
        cache=args.cache,
        mode=args.placement,
        processing=not args.no_processing,
    )
    print(plan.format())
    return 0 if plan.fits is not False else 1
